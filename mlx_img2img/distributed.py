"""One series shared by the processes of MLX's own launcher (``mlx.launch``, or ``mpirun``).

Without a launcher nothing here touches MLX's distributed layer: ``mx.distributed.init()`` would try every
backend (an installed MPI among them), so it is called only where a launcher's variables say that one
started this process. A plain run gets a ``Share`` of one process that takes every input, in order.

A launched run's processes each load the model once and take inputs until none is left:

- when the output folder is one folder for all of them (a shared or network folder, or one Mac), they claim
  inputs as they go: an input is the first process's to create its claim file (``O_CREAT | O_EXCL``) in a
  hidden folder of this run inside the output folder, so a fast Mac takes more inputs than a slow one;
- otherwise (each Mac writes its own local folder) input i goes to process i % size, fixed in advance.

MLX's collectives cannot hand out work as it goes: every one of them is a call that all processes make
together, and there is no receive from whichever process asks first, so a process would wait for the
slowest at every input. They serve only where all processes meet anyway: the seed and the run's token at
the start (which also makes sure that every process has finished its checks before any writes), and the
totals at the end, which the first process prints as one summary. An error in one process stops that
process only: its input in progress is reported as failed, the others go on. A killed process stops the
whole launch (the launcher ends the others); running the same command again resumes as on one machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Img2ImgError
from .jobs import Runner, Totals

# Set in each process by mlx.launch (ring, jaccl, nccl: MLX_RANK) or by an MPI launcher.
LAUNCHER_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
CLAIMS_PREFIX = ".mlx-img2img-claims-"


class DistributedError(Img2ImgError):
    """The processes of a launched run cannot work together (no backend, different inputs)."""


@dataclass
class Group:
    """The processes of a launched run: this one's rank, how many, and MLX's group for the collectives."""

    rank: int
    size: int
    handle: Any

    def all_sum(self, values: list[int]) -> list[int]:
        import mlx.core as mx

        # The CPU stream: the ring and MPI backends run their collectives there, on any device.
        total = mx.distributed.all_sum(mx.array(values, dtype=mx.int64), group=self.handle, stream=mx.cpu)
        return [int(v) for v in total.tolist()]

    def all_gather(self, data: bytes) -> list[bytes]:
        """Every process's bytes, in rank order (each may send a different length)."""
        import mlx.core as mx

        sizes = self.all_sum([len(data) if r == self.rank else 0 for r in range(self.size)])
        padded = np.zeros(max(1, *sizes), dtype=np.uint8)
        padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = mx.distributed.all_gather(mx.array(padded), group=self.handle, stream=mx.cpu)
        rows = np.array(rows).reshape(self.size, -1)
        return [bytes(row[:n]) for row, n in zip(rows, sizes, strict=True)]

    def first(self, value: int) -> int:
        """The first process's ``value``, in every process (a non-negative integer below 2**62)."""
        return self.all_sum([value if self.rank == 0 else 0])[0]


def join() -> Group | None:
    """The launched run this process is part of, or None: a plain run, never touching MLX's distributed layer."""
    if not any(name in os.environ for name in LAUNCHER_VARIABLES):
        return None
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and not Path(hostfile).read_text().strip():  # `mlx.launch -n 1`: a ring of one, nothing to share
        return None
    import mlx.core as mx

    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise DistributedError(f"started by a launcher, but MLX's distributed backend did not start: {e}") from e
    return Group(group.rank(), group.size(), group) if group.size() > 1 else None


class Share:
    """Which inputs of a series this process takes, and the series' totals. Make it with ``start``."""

    def __init__(self, group: Group | None, inputs: list[Path], claims: Path | None = None):
        self.group, self.inputs, self.claims = group, inputs, claims
        self.rank = group.rank if group else 0
        self.size = group.size if group else 1
        self.taken = 0
        self.current: Path | None = None  # the input being made, while take() has handed it out
        self.stopped: str | None = None  # why this process stopped early

    @classmethod
    def start(cls, group: Group | None, folder: Path, inputs: list[Path]) -> Share:
        """This process's share of ``inputs`` (written into ``folder``). A launched run's processes all meet
        here, so call it after every check and before anything is written."""
        if group is None:
            return cls(None, inputs)
        # The same inputs in the same order in every process, or an input would go to none or to two.
        names = zlib.crc32("\0".join(p.name for p in inputs).encode())
        if len(set(group.all_sum([names if r == group.rank else 0 for r in range(group.size)]))) > 1:
            raise DistributedError("the processes of this launch see different inputs; give each the same files "
                                   "(the same folder, or copies of it)")
        token = group.first(secrets.randbelow(2**62))
        claims = folder / f"{CLAIMS_PREFIX}{token:x}"
        if group.rank == 0:
            _remove_claims(folder)  # of earlier runs that were killed
            claims.mkdir()
        group.all_sum([0])  # the first has made it
        shared = group.all_sum([int(claims.is_dir())])[0] == group.size
        if group.rank == 0 and not shared:
            claims.rmdir()
        return cls(group, inputs, claims if shared else None)

    def how(self) -> str:
        """How a launched run shares its inputs, in one line."""
        n = f"{len(self.inputs)} input(s) shared by {self.size} processes"
        if self.claims is not None:
            return f"{n}: one output folder, each takes the next input when it is free"
        return f"{n}: each has its own output folder, so input i goes to process i mod {self.size}"

    def take(self) -> Iterator[Path]:
        """The inputs this process makes, in order: claimed as it goes in a shared folder, every size-th
        otherwise; all of them in a plain run."""
        for i, source in enumerate(self.inputs):
            if self._claim(i) if self.claims is not None else i % self.size == self.rank:
                self.taken += 1
                self.current = source
                yield source
                self.current = None

    def _claim(self, index: int) -> bool:
        assert self.claims is not None
        try:
            fd = os.open(self.claims / str(index), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:  # who has it, for a curious user
            f.write(f"{self.rank} {socket.gethostname()} {os.getpid()}\n")
        return True

    @contextmanager
    def errors_stop_this_process(self, runner: Runner, describe: Callable[[BaseException], str]) -> Iterator[None]:
        """A launched run: an error ends this process's part (its input in progress failed, with ``describe``'s
        line) and the others go on. A plain run: errors are raised, as ever."""
        if self.group is None:
            yield
            return
        try:
            yield
        except Exception as e:  # noqa: BLE001 - whatever stops this process, the others finish the series
            why = describe(e)
            if not isinstance(e, (Img2ImgError, OSError, ValueError)):  # a bug, not a setting: say what kind
                why = f"{type(e).__name__}: {why}"
            if self.current is not None:
                runner.failed.append((self.current, why))
            self.stopped = f"process {self.rank + 1} of {self.size} ({socket.gethostname()}) stopped: {why}"
            print(f"{self.stopped}; the others go on", file=sys.stderr, flush=True)  # now, and in the summary

    def totals(self, runner: Runner) -> Totals:
        """The series' totals: this process's, or on a launched run every process's added up (every process
        must call this)."""
        mine = runner.totals()
        if self.group is None:
            return mine
        sys.stdout.flush()  # this process's lines ("wrote ...") before the first one's summary
        sys.stderr.flush()
        data = {**asdict(mine), "taken": self.taken, "stopped": [self.stopped] if self.stopped else []}
        parts = [json.loads(b) for b in self.group.all_gather(json.dumps(data).encode())]
        if self.rank == 0 and self.claims is not None:
            shutil.rmtree(self.claims, ignore_errors=True)  # every process is past its last claim
        order = {str(p): i for i, p in enumerate(self.inputs)}
        failed = sorted((tuple(f) for p in parts for f in p["failed"]), key=lambda f: order.get(f[0], len(order)))
        return Totals(
            written=sum(p["written"] for p in parts),
            skipped=sum(p["skipped"] for p in parts),
            failed=failed,
            not_started=len(self.inputs) - sum(p["taken"] for p in parts),
            stopped=[s for p in parts for s in p["stopped"]],
            by_process=[p["written"] for p in parts],
        )

    def done(self) -> None:
        """The last meeting: no process ends (which makes the launcher stop the others) while the first one is
        still printing the summary."""
        if self.group is not None:
            self.group.all_sum([0])


def _remove_claims(folder: Path) -> None:
    for old in folder.glob(f"{CLAIMS_PREFIX}*"):
        if old.is_dir() and all(p.name.isdigit() for p in old.iterdir()):  # only what this module makes
            shutil.rmtree(old, ignore_errors=True)
