"""How work runs on MLX's CPU backend: batch parts on parallel streams, BLAS threads, whether to compile.

MLX's CPU backend runs each stream's kernels on one thread. A batch of sequences (the text encoder's
prompts) is split over one stream per core, so that their element-wise work runs side by side; a batch
of maps (the UNet's guidance halves, several images) runs as one part, where its matrix products are
the time (models/activations.py made the activations cheap). OpenBLAS (where loaded, see blas.py) gets
the machine's cores shared out between the parts (never a count read from the current load: the thread
count moves the last bits of a result, and a seed must give the same pixels every time). No model call
is compiled on the CPU (only the activations and the softmax are: models/activations.py). All of it is
behind the CPU device check: on a GPU the batch stays one compiled call, as before. README, Performance,
has the measurements behind each choice.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import mlx.core as mx
from mlx.utils import tree_map

from . import blas

# MLX streams belong to the thread that made them: each thread gets its own (a server's worker thread and
# the caller's thread would otherwise share streams one of them cannot use). They are kept for the whole
# process, as one shared list was: freeing them as their thread ends aborts MLX at exit.
_streams_of: dict[threading.Thread, list[mx.Stream]] = {}


def on_cpu() -> bool:
    """Whether MLX computes on the CPU backend (the default device is the CPU)."""
    return mx.default_device().type == mx.cpu


# A batch of maps (NHWC: UNet, ControlNet, VAE latents) runs as one part with every BLAS thread: split
# over streams it was slower at every size measured (the guided UNet call at 32x32 and 64x64 latents,
# batch 2 and 4), and no faster for the VAE decode of several images (README, Performance). Tests set this
# to split their tiny maps as a batch of sequences is split.
SPLIT_MAPS = False


def cpu_parts(batch: int, maps: bool = False) -> int:
    """The most parts a batch runs in: one per core on the CPU (at most one per sample), one for a batch
    of maps (unless SPLIT_MAPS), one on a GPU."""
    if not on_cpu() or (maps and not SPLIT_MAPS):
        return 1
    return max(1, min(batch, os.cpu_count() or 1))


def fit_blas_threads(parts: int = 1) -> None:
    """Size OpenBLAS (where loaded) for `parts` parallel parts on the CPU: the machine's cores shared out
    between the parts. The setting holds for what is evaluated next, also for stages that do not go
    through `map_batch`. It depends on the machine only, never on its current load: OpenBLAS's thread
    count can move the last bits of a result, and the same seed must give the same pixels every time."""
    if on_cpu():
        blas.set_threads(max(1, (os.cpu_count() or 1) // max(1, parts)))


def _streams(n: int) -> list[mx.Stream]:
    streams = _streams_of.setdefault(threading.current_thread(), [])
    while len(streams) < n:
        streams.append(mx.new_stream(mx.cpu))
    return streams[:n]


def _on_streams(makers: list[Callable[[], Any]]) -> list[Any]:
    """What each of `makers` makes, each made (its graph built, not evaluated) on its own CPU stream."""
    outputs = []
    for stream, make in zip(_streams(len(makers)), makers, strict=True):
        with mx.stream(stream):
            outputs.append(make())
    return outputs


def map_batch(fn: Callable[..., Any], batch: int, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, computed as `cpu_parts(batch)` slices along axis 0 of the arrays whose first
    dimension is `batch` (others are passed whole), each on its own stream, then concatenated. Arguments
    and results may be lists, tuples or dicts of arrays (a ControlNet's residuals): each array is sliced
    and concatenated alike. Every sample is independent in these models, so the result equals the single call.

    On the CPU, OpenBLAS gets the idle cores shared out between the parts (`fit_blas_threads`); the graph
    is evaluated right after it is built, under that setting. Where the first argument is an NHWC batch of
    maps, the batch is one part (`cpu_parts`)."""
    first = args[0] if args else None
    parts = cpu_parts(batch, maps=isinstance(first, mx.array) and first.ndim == 4)
    fit_blas_threads(parts)
    if on_cpu():
        blas.advise()  # once: the Python API's warning where MLX is still on its reference BLAS
    if parts == 1:
        return fn(*args, **kwargs)
    bounds = [batch * i // parts for i in range(parts + 1)]

    def part(lo: int, hi: int) -> Callable[[], Any]:
        def piece(a: Any) -> Any:
            return a[lo:hi] if isinstance(a, mx.array) and a.ndim and a.shape[0] == batch else a

        sliced_args, sliced_kwargs = tree_map(piece, (list(args), kwargs))
        return partial(fn, *sliced_args, **sliced_kwargs)

    outputs = _on_streams([part(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)])
    return tree_map(lambda *pieces: mx.concatenate(pieces, axis=0), outputs[0], *outputs[1:])


def evaluate_in_parts(parts: list[Callable[[], mx.array]]) -> list[mx.array]:
    """The arrays `parts` make, each made on its own CPU stream and all evaluated together, OpenBLAS's
    threads shared out between them for that evaluation and set back after it (the work of one image cut
    into independent pieces, such as bands of a convolution's output rows; one piece per core at most)."""
    if len(parts) == 1:
        y = parts[0]()
        mx.eval(y)
        return [y]
    before = blas.threads()
    fit_blas_threads(len(parts))
    outputs = _on_streams(parts)
    mx.eval(outputs)
    if before is not None:
        blas.set_threads(before)
    return outputs


def compile_if_it_pays(fn: Callable[..., mx.array]) -> Callable[..., mx.array]:
    """`fn` compiled with mx.compile where that is measured to pay off, else `fn` itself.

    Not on the CPU backend: there the compiled guided UNet call was slower at small latents and no faster
    at larger ones, and each new shape cost a long first call (tracing and kernel compilation). On a GPU
    it stays compiled, as before; that has not been measured (no GPU here). The device is read when the
    function is called, so a pipeline built before a device change follows it."""
    compiled = mx.compile(fn)

    def call(*args, **kwargs):
        return (fn if on_cpu() else compiled)(*args, **kwargs)

    return call


fit_blas_threads()  # at import: the first stages (prompt encoding, VAE encode) run before any map_batch
