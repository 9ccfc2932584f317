"""Jobs, the bounded queue and the one worker thread that does all model work.

MLX arrays belong to the thread that made them, so every load, generation and preview runs on the worker
thread; the HTTP side only queues jobs and reads their state (under each job's lock). A job is planned
(its request checked against the models' configs) before it is queued, so a bad request is the client's
error at once, and runs through the one generation path (generation.Planner) image by image.

Stopping: "cancel" (DELETE, shutdown) stops the job at its next step and keeps nothing of the running
image; "interrupt" (A1111) stops it and keeps what it has, the running image as far as it got; "skip"
(A1111) ends the running image that way and goes on with the next.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import threading
import time
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from PIL import Image

from .. import __version__, images, inpaint
from ..control import preprocess
from ..errors import ModelFormatError
from ..events import StepEvent
from ..generation import Planner, image_settings
from ..preview import PREVIEW_MODES, Pacer, Previewer, load_taesd, make_previewer
from ..request import Request
from .models import Catalog, LoadSettings, ModelEntry, Resident

TERMINAL = ("done", "failed", "cancelled")
STOPS = ("cancel", "interrupt", "skip")
IDLE_CHECK_SECONDS = 5.0
# Previews are made only while someone looks: an open event stream, or a /progress read this recent.
PREVIEW_INTEREST_SECONDS = 10.0
KEEP_EXTRAS = 2  # VAEs and ControlNets kept loaded on the worker besides the models (least recently used out)


class QueueFullError(Exception):
    """The queue holds as many jobs as it may: the client should retry later (429)."""


class JobFailed(Exception):
    """A job ended in an error; `status` is the HTTP status it maps to (400: the request's fault)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def error_status(e: BaseException) -> int:
    """400 for what the request got wrong (settings, images), 500 for the rest (a broken model, a bug)."""
    from ..errors import ImageInputError, NumericalError

    return 400 if isinstance(e, ValueError | TypeError | ImageInputError | NumericalError) else 500


def one_line(e: BaseException) -> str:
    return " ".join((str(e) or type(e).__name__).split())


@dataclass
class Work:
    """What a job generates, settled before it is queued: the checked request (its seed decided), the plan,
    the models by their listed entries, the input images and one seed per output image."""

    request: Request
    planner: Planner
    model: ModelEntry
    refiner: ModelEntry | None
    inputs: list[Image.Image]
    seeds: list[int]
    mask: Image.Image | None = None  # inpainting (white: repaint), at the first input's size
    vae: ModelEntry | None = None  # a listed VAE in place of the model's own (A1111's sd_vae)
    controls: list[ControlUnit] = field(default_factory=list)


@dataclass
class ControlUnit:
    """One ControlNet of a job: the listed model, its control image (None: the input) and how that image is
    preprocessed (control.PREPROCESSORS), with the Canny thresholds. Weight and window are the request's."""

    entry: ModelEntry
    image: Image.Image | None
    preprocess: str
    thresholds: tuple[float, float]


class Job:
    """One queued request and everything the HTTP side may read of it."""

    def __init__(self, work: Work, kind: str = "native"):
        self.id = uuid.uuid4().hex
        self.work, self.kind = work, kind
        self.status = "queued"
        self.created, self.started, self.finished = time.time(), None, None
        self.images: list[Image.Image] = []
        self.settings: list[dict] = []  # per image: what its PNG stores
        self.encoded: list[str] = []  # per image: its PNG with its settings, base64, made once by the worker
        self.encode_seconds = self.encode_cpu = 0.0  # the worker's wall and CPU time encoding them
        self.error: JobFailed | None = None
        self.image_no = 0  # the image being generated, from 0
        self.step, self.total = 0, 0
        self.preview: Image.Image | None = None
        self.preview_step = 0
        self.watchers = 0  # open event streams
        self.preview_read = float("-inf")  # time.monotonic() of the last /progress read of the preview
        self._preview_base64: str | None = None
        self.stop: str | None = None
        self.interrupted = self.skipped = False
        self.events: list[dict] = []
        # set when the job ends; holds nothing (the job holding it as its own result would be a reference cycle:
        # its images freed only by the garbage collector's rare full passes, not as the history lets it go)
        self.ended: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    # ------------------------------------------------------------------------------- read by the HTTP side

    def progress(self) -> float:
        """Done fraction over all its images."""
        n = max(1, len(self.work.seeds))
        if self.status == "done":
            return 1.0
        step = self.step / self.total if self.total else 0.0
        return min(1.0, (self.image_no + step) / n)

    def wants_preview(self) -> bool:
        return self.watchers > 0 or time.monotonic() - self.preview_read < PREVIEW_INTEREST_SECONDS

    def preview_base64(self, encode: Callable[[Image.Image], str]) -> str | None:
        """The newest preview, encoded once however many clients read it; marks it as read."""
        with self._lock:
            self.preview_read = time.monotonic()
            preview, cached, step = self.preview, self._preview_base64, self.preview_step
        if preview is None or cached is not None:
            return cached
        text = encode(preview)
        with self._lock:
            if self.preview_step == step:
                self._preview_base64 = text
        return text

    async def events_after(self, cursor: int, timeout: float) -> list[dict]:
        """The events after the first `cursor` ones, waiting up to `timeout` seconds for one."""
        loop, flag = asyncio.get_running_loop(), asyncio.Event()
        with self._lock:
            if len(self.events) > cursor or self.status in TERMINAL:
                return self.events[cursor:]
            self._waiters.add((loop, flag))
        try:
            await asyncio.wait_for(flag.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiters.discard((loop, flag))
        with self._lock:
            return self.events[cursor:]

    def request_stop(self, how: str) -> bool:
        """Ask the job to stop (see the module's docstring); False when it has ended already."""
        with self._lock:
            if self.status in TERMINAL:
                return False
            if how != "skip" or self.stop is None:
                self.stop = how if self.stop != "cancel" else "cancel"
            if how == "interrupt":
                self.interrupted = True
            if how == "skip":
                self.skipped = True
            return True

    # ------------------------------------------------------------------------------- written by the worker

    def emit(self, kind: str, **data: Any) -> None:
        with self._lock:
            self.events.append({"event": kind, "job": self.id, **data})
            waiters = list(self._waiters)
        for loop, flag in waiters:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that loop is closed: its client went away
                pass

    def end(self, status: str, error: JobFailed | None = None) -> None:
        with self._lock:
            self.status, self.error, self.finished = status, error, time.time()
        if error is not None:
            self.emit("failed", error=str(error), status=error.status)
        else:
            self.emit(status, images=len(self.images), seeds=self.work.seeds[: len(self.images)])
        self.ended.set_result(None)


@dataclass
class _Call:
    """A function for the worker thread (loading a model), with its caller's future."""

    fn: Callable[[], Any]
    future: concurrent.futures.Future


class Engine:
    """The queue and the worker thread; `current` is the model used where a request names none (A1111's
    sd_model_checkpoint)."""

    def __init__(self, catalog: Catalog, load: LoadSettings, keep_models: int = 1,
                 idle_unload: float | None = None, preview: str = "cheap", preview_every: int | None = None,
                 queue_size: int = 16, history: int = 64, memory_limit_gb: float | None = None,
                 controlnets: list[ModelEntry] | None = None):
        if preview not in PREVIEW_MODES:
            raise ValueError(f"preview must be one of {', '.join(PREVIEW_MODES)}, not {preview!r}")
        self.catalog, self.load = catalog, load
        self.current = catalog.default
        self.preview, self.preview_every = preview, preview_every  # None: paced (preview.Pacer)
        self.controlnets = list(controlnets or [])  # the listed ones (serve --controlnet)
        self.defaults: dict[str, Any] = {}  # request values set through POST /sdapi/v1/options (rng, clip_skip)
        self.queue_size, self.history, self.memory_limit_gb = queue_size, history, memory_limit_gb
        self._resident = Resident(load, keep_models, idle_unload)
        self._queue: deque[Job | _Call] = deque()
        self._cond = threading.Condition()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="mlx-img2img worker", daemon=True)
        self.loaded_titles: list[str] = []  # read by the HTTP side
        self._taesd_decoders: dict[bool, Any] = {}  # worker thread only
        self._extras: OrderedDict[tuple, Any] = OrderedDict()  # loaded VAEs and ControlNets, worker thread only

    # ------------------------------------------------------------------------------- the HTTP side

    def start(self, load_default: bool = True) -> None:
        """Start the worker; with `load_default`, load the current model now and raise its error here."""
        self._thread.start()
        if self.memory_limit_gb:
            self.call(lambda: _set_memory_limit(self.memory_limit_gb))
        if load_default:
            self.call(lambda: self._pipes([self.current]))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread after the jobs queued before it; its result or its error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is stopping")
            self._queue.append(_Call(fn, future))
            self._cond.notify()
        return future.result()

    def switch(self, entry: ModelEntry) -> None:
        """Make `entry` the current model, loaded (after the jobs queued before)."""
        self.call(lambda: self._pipes([entry]))
        self.current = entry

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is stopping")
            waiting = sum(isinstance(item, Job) for item in self._queue)
            if waiting >= self.queue_size:
                raise QueueFullError(f"the queue is full ({self.queue_size} jobs waiting); retry later")
            self._jobs[job.id] = job
            while len(self._jobs) > self.history + self.queue_size + 1:  # forget the oldest finished ones
                oldest = next((k for k, j in self._jobs.items() if j.status in TERMINAL), None)
                if oldest is None:
                    break
                del self._jobs[oldest]
            self._queue.append(job)
            self._cond.notify()
        job.emit("queued", position=waiting)
        return job

    def job(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def running(self) -> Job | None:
        return self._running

    def queued(self) -> int:
        with self._cond:
            return sum(isinstance(item, Job) for item in self._queue)

    def queued_images(self) -> int:
        """The images of the jobs waiting (A1111's job_count counts them with the running job's)."""
        with self._cond:
            return sum(len(item.work.seeds) for item in self._queue if isinstance(item, Job))

    def cancel(self, job: Job) -> bool:
        """Cancel a queued job at once, or a running one at its next step; False when it has ended."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                job.end("cancelled")
                return True
        return job.request_stop("cancel")

    def stop_running(self, how: str) -> bool:
        """Interrupt or skip the running job (A1111's interrupt and skip); False when none runs."""
        job = self._running
        return job.request_stop(how) if job is not None else False

    def stop(self) -> None:
        """Stop without waiting: queued jobs are cancelled, the running one at its next step; the worker ends
        after it."""
        with self._cond:
            self._stopping = True
            pending, self._queue = list(self._queue), deque()
            self._cond.notify()
        for item in pending:
            if isinstance(item, Job):
                item.end("cancelled")
            else:
                item.future.set_exception(RuntimeError("the server is stopping"))
        running = self._running
        if running is not None:
            running.request_stop("cancel")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop, wait for the worker to end, and free the models."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            # The models still loaded are freed here, once the worker has ended: MLX aborts the process at
            # exit ("terminate called without an active exception") when they are freed by the thread that
            # built them as it ends, or live on until the interpreter exits.
            self._extras.clear()
            self._resident.clear()

    # ------------------------------------------------------------------------------- the worker thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._stopping:
                    self._cond.wait(IDLE_CHECK_SECONDS)
                if self._stopping and not self._queue:
                    break
                item = self._queue.popleft() if self._queue else None
                if isinstance(item, Job):
                    self._running = item
            if item is None:
                self._resident.unload_idle()
                self.loaded_titles = [e.title for e in self._resident.loaded()]
            elif isinstance(item, _Call):
                try:
                    item.future.set_result(item.fn())
                except Exception as e:  # noqa: BLE001 - handed to the caller
                    item.future.set_exception(e)
            else:
                try:
                    self._run(item)
                finally:
                    self._running = None

    def _pipes(self, entries: list[ModelEntry]) -> list[Any]:
        pipes = self._resident.get(entries)
        self.loaded_titles = [e.title for e in self._resident.loaded()]
        return pipes

    def _run(self, job: Job) -> None:
        w = job.work
        if job.stop == "cancel":
            job.end("cancelled")
            return
        with job._lock:
            job.status, job.started = "running", time.time()
        job.emit("started", images=len(w.seeds), model=w.model.title)
        try:
            pipes = self._pipes([w.model] + ([w.refiner] if w.refiner else []))
            pipe, refiner = pipes[0], (pipes[1] if w.refiner else None)
            previewer = make_previewer(self.preview, pipe.is_sdxl, pipe.vae.config.latent_channels,
                                       self._taesd(pipe.is_sdxl))
            with self._job_parts(pipe, w):
                self._images(job, pipe, refiner, previewer)
        except Exception as e:  # noqa: BLE001 - the job fails, the server goes on
            job.end("failed", JobFailed(one_line(e), error_status(e)))
            return
        job.end("cancelled" if job.stop == "cancel" else "done")

    def _images(self, job: Job, pipe: Any, refiner: Any, previewer: Previewer | None) -> None:
        w, r = job.work, job.work.request
        for i, seed in enumerate(w.seeds):
            if job.stop in ("cancel", "interrupt"):
                break
            with job._lock:
                job.image_no, job.step, job.total = i, 0, w.planner.steps(r.strength)
            fitted = images.fit_image(w.inputs[i % len(w.inputs)], r.width, r.height, r.resize)
            work = images.model_size(fitted.size, w.planner.max_side)
            mask = None if w.mask is None else images.fit_image(w.mask, r.width, r.height, r.resize, fill=0)
            pacer = Pacer(self.preview_every)
            control = [preprocess(fitted if u.image is None else u.image, u.preprocess, *u.thresholds)
                       for u in w.controls]
            outcome = w.planner.run(pipe, refiner, images.resize_to(fitted, work), r.prompt or "", r.strength,
                                    seed, on_step=partial(self._on_step, job, previewer=previewer, pacer=pacer),
                                    mask=None if mask is None else images.resize_to(mask, work),
                                    control=control or None)
            with job._lock:  # a skip ends this image only
                how, job.stop = job.stop, (job.stop if job.stop != "skip" else None)
            if how == "cancel" or outcome.image is None:
                continue
            image = images.resize_to(outcome.image, fitted.size)
            if mask is not None:  # at the output's size too: the resize back must not move a kept pixel
                image = inpaint.keep_unmasked(fitted, image, mask, r.mask_blur)
            settings = settings_of(w, seed, fitted.size, work, self.load)
            start, cpu = time.perf_counter(), time.thread_time()
            encoded = png_base64(image, settings)  # once, here: every answer and event re-uses it
            with job._lock:
                job.images.append(image)
                job.settings.append(settings)
                job.encoded.append(encoded)
                job.encode_seconds += time.perf_counter() - start
                job.encode_cpu += time.thread_time() - cpu
            job.emit("image", index=len(job.images) - 1, seed=seed)

    @contextmanager
    def _job_parts(self, pipe: Any, w: Work) -> Iterator[None]:
        """The job's VAE and ControlNets on the pipeline while it runs; its own ones again afterwards."""
        own_vae, own_nets = pipe.vae, pipe.controlnets
        try:
            if w.vae is not None:
                pipe.vae = self._extra(("vae", w.vae, pipe.is_sdxl), lambda: _load_vae(pipe, w.model, w.vae, self.load))
            if w.controls:
                nets = [self._extra(("controlnet", u.entry), partial(_load_controlnet, u.entry, self.load))
                        for u in w.controls]
                for unit, net in zip(w.controls, nets, strict=True):
                    try:
                        pipe._check_controlnet(net, unit.entry.title)
                    except ModelFormatError as e:  # a listed one of another family: the request's choice (400)
                        raise ValueError(one_line(e)) from None
                pipe.controlnets = nets
            yield
        finally:
            pipe.vae, pipe.controlnets = own_vae, own_nets

    def _extra(self, key: tuple, load: Callable[[], Any]) -> Any:
        """A loaded VAE or ControlNet, kept for the next jobs (up to KEEP_EXTRAS)."""
        if key not in self._extras:
            while len(self._extras) >= KEEP_EXTRAS:
                self._extras.popitem(last=False)
            self._extras[key] = load()
        self._extras.move_to_end(key)
        return self._extras[key]

    def _taesd(self, is_sdxl: bool) -> Any:
        """The family's tiny decoder for --preview taesd, loaded once; None where it is not cached."""
        if self.preview != "taesd":
            return None
        if is_sdxl not in self._taesd_decoders:
            self._taesd_decoders[is_sdxl] = load_taesd(is_sdxl)
        return self._taesd_decoders[is_sdxl]

    def _on_step(self, job: Job, event: StepEvent, previewer: Previewer | None, pacer: Pacer) -> bool:
        preview = None
        if previewer is not None and job.wants_preview() and pacer.due(event.index, event.total):
            preview = pacer.make(previewer, event.x0)
        with job._lock:
            job.step, job.total = event.index, event.total
            if preview is not None:
                job.preview, job.preview_step, job._preview_base64 = preview, job.preview_step + 1, None
            stop = job.stop is not None
        job.emit("step", image=job.image_no, step=event.index, total=event.total, model=event.model,
                 preview=preview is not None)
        return stop


def png_base64(image: Image.Image, settings: dict | None = None) -> str:
    """A PNG as base64 text, with the parameters chunk (and our settings) when `settings` are given. zlib's
    fastest level with its run-length strategy: on PNG's filtered rows it is faster than the default strategy
    at level 1 (a third, on a 512-pixel image) and compresses as well as level 6; an answer is not an archive."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=images.png_info(settings) if settings else None, compress_level=1,
               compress_type=zlib.Z_RLE)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def settings_of(w: Work, seed: int, size: tuple[int, int], work: tuple[int, int], load: LoadSettings) -> dict:
    """The settings an image's PNG stores (generation.image_settings, as the command line's): the models by
    their listed titles, the ControlNet units as AUTOMATIC1111's ControlNet extension writes them."""
    # the request as the image was made: its models by their titles, the load settings the server started with
    # (a body may not set them), and no prediction type (the listed models load as they are); the units'
    # preprocessor where they share one (the command line's one --control-preprocess; each unit's is in its field)
    modules = {u.preprocess for u in w.controls}
    r = replace(w.request, model=w.model.title, refiner=w.refiner.title if w.refiner else None,
                vae=w.vae.title if w.vae else None, controlnet=[u.entry.title for u in w.controls] or None,
                control_preprocess=modules.pop() if len(modules) == 1 else None,
                dtype=load.dtype, quantize=load.quantize, low_memory=load.low_memory, vae_tile=load.vae_tile,
                prediction_type=None)
    units: dict[str, str] = {}
    for k, u in enumerate(w.controls):
        scale = r.control_scale[k] if len(r.control_scale) > 1 else r.control_scale[0]
        units[f"ControlNet {k}"] = (f"Module: {u.preprocess}, Model: {u.entry.title}, Weight: {scale:g}, "
                                    f"Guidance Start: {r.control_start:g}, Guidance End: {r.control_end:g}")
    return image_settings(r, w.planner, r.prompt or "", r.strength, seed, size, work, w.model.title,
                          f"mlx-img2img {__version__}", refiner_name=r.refiner,
                          mask=None if w.mask is None else {}, control_fields=units or None)


def _load_vae(pipe: Any, model: ModelEntry, vae: ModelEntry, load: LoadSettings) -> Any:
    """A listed VAE for `pipe` (a file takes the model's VAE config), in the dtype its own VAE runs in."""
    from ..loading import LoadOptions, load_component, open_source
    from ..models.vae import AutoencoderKL, VAEConfig

    source = open_source(model.source, dtype=load.dtype, offline=load.offline, vae=vae.source)
    module = AutoencoderKL(VAEConfig.from_dict(source.config("vae")))
    dtype = pipe.vae.decoder.conv_in.weight.dtype  # the model's own VAE's (SDXL's upcast one: float32)
    return load_component(source, "vae", module, LoadOptions(dtype=load.dtype), dtype=dtype, quantize=False)


def _load_controlnet(entry: ModelEntry, load: LoadSettings) -> Any:
    from ..loading import LoadOptions
    from ..loading.controlnet import load_controlnet

    return load_controlnet(entry.source, LoadOptions(dtype=load.dtype, quantize=load.quantize), load.offline)


def _set_memory_limit(gigabytes: float) -> None:
    import mlx.core as mx

    mx.set_memory_limit(int(gigabytes * 2**30))
