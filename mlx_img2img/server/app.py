"""The HTTP side: AUTOMATIC1111's routes, the native jobs API, errors, authentication and body limits.

Handlers never touch a model: they decode and check bodies (in the thread pool, off the event loop, so
/progress answers while they work), queue jobs on the engine and read job state. Every error is a JSON
body ``{"error", "detail"}`` with a 4xx status for what the client got wrong.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .. import __version__
from ..request import BY_NAME, RequestError
from . import a1111
from .engine import Engine, Job, QueueFullError, error_status, one_line
from .inputs import DEFAULT_MAX_PIXELS, NATIVE_FIELDS, native_work
from .models import UnknownModelError

DEFAULT_MAX_BODY = 64 * 2**20
SSE_KEEPALIVE_SECONDS = 15.0
REASONS = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge",
           422: "UnprocessableEntity", 429: "TooManyRequests", 500: "InternalServerError",
           503: "ServiceUnavailable"}


@dataclass(frozen=True)
class Limits:
    max_body: int = DEFAULT_MAX_BODY  # bytes of a request body
    max_pixels: int = DEFAULT_MAX_PIXELS  # of an input image


class ApiError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def error_response(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": REASONS.get(status, "Error"), "detail": detail}, status, headers=headers)


class Guard:
    """ASGI middleware: HTTP Basic authentication (when credentials are set) and the body size limit, before
    any route sees the request."""

    def __init__(self, app: Any, credentials: list[tuple[str, str]], max_body: int):
        self.app, self.credentials, self.max_body = app, credentials, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.credentials and not self._authorized(headers.get("authorization", "")):
            return await error_response(401, "give the user and password of --api-auth (HTTP Basic)",
                                        {"WWW-Authenticate": 'Basic realm="mlx-img2img"'})(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:  # read the body here, so that a stream without a length is bounded too
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorized(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return any(secrets.compare_digest(user, u) & secrets.compare_digest(password, p) for u, p in self.credentials)

    async def _too_large(self, scope: dict, receive: Callable, send: Callable) -> None:
        await error_response(413, f"the body is over the limit of {self.max_body:,} bytes")(scope, receive, send)


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON") from None


async def _off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a body's decoding and checks in the thread pool; a request error is a 400."""
    try:
        return await run_in_threadpool(fn, *args)
    except UnknownModelError as e:
        raise ApiError(400, str(e)) from None
    except (RequestError, ValueError, TypeError) as e:
        raise ApiError(400, one_line(e)) from None
    except Exception as e:  # noqa: BLE001 - a listed model that cannot be read: the server's side
        raise ApiError(error_status(e), one_line(e)) from None


def _cpu_timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`fn(*args)` and the CPU time its thread spent on it."""
    start = time.thread_time()
    return fn(*args), time.thread_time() - start


def _submit(engine: Engine, job: Job) -> Job:
    try:
        return engine.submit(job)
    except QueueFullError as e:
        raise ApiError(429, str(e)) from None


def _native_schema() -> dict:
    """The native job body's JSON schema, from the request fields (so a client generator sees them)."""
    kinds = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}
    properties: dict[str, Any] = {"image": {"type": "string", "description": "The input image, base64 (PNG, JPEG, "
                                            "WebP...), with or without a data: URL prefix."}}
    for name in NATIVE_FIELDS:
        f = BY_NAME[name]
        kind = next((k for k in kinds if k in str(_annotation(name))), "string")
        properties[name] = {"type": kinds[kind], "description": f.help}
        if f.default is not None:
            properties[name]["default"] = f.default
        if f.choices:
            properties[name]["enum"] = list(f.choices)
    properties["model"] = {"type": "string", "description": "The title of a listed model (GET /v1/models); "
                           "default: the current one."}
    properties["refiner"] = {"type": "string", "description": "The title of a listed refiner model."}
    properties["mask"] = {"type": "string", "description": "Inpainting: a mask image, base64 (white: repaint)."}
    return {"type": "object", "required": ["image", "prompt"], "properties": properties}


def _annotation(name: str) -> str:
    from ..request import Request as Settings

    return str(Settings.__dataclass_fields__[name].type)


def create_app(engine: Engine, credentials: list[tuple[str, str]] | None = None, limits: Limits = Limits()) -> Any:
    """The ASGI application over a started engine."""
    app = FastAPI(title="mlx-img2img", version=__version__,
                  description="Stable Diffusion image-to-image on MLX: AUTOMATIC1111's API and a native jobs API.")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.detail)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(400, f"{where}: {first.get('msg', 'invalid')}")

    # ------------------------------------------------------------------------------ AUTOMATIC1111

    @app.post("/sdapi/v1/img2img", tags=["AUTOMATIC1111"], response_class=Response,
              responses={200: {"content": {"application/json": {}}}})
    async def img2img(request: Request) -> Response:
        """Runs to the end (or an interrupt) and answers with the images, base64 PNGs with their parameters.
        The Server-Timing header tells where the time went (milliseconds)."""
        start = time.perf_counter()
        body = await _json(request)
        read = time.perf_counter()
        work, decode_cpu = await _off_loop(_cpu_timed, a1111.img2img_work, body, engine.catalog, engine.current,
                                           limits.max_pixels, engine.controlnets, dict(engine.defaults))
        decoded = time.perf_counter()
        job = _submit(engine, Job(work, kind="a1111"))
        done = await _wait(job)
        waited = time.perf_counter()
        answer = a1111.img2img_answer(done, body)  # the images are encoded already: this only joins them
        joined = time.perf_counter() - waited
        # wall times, and the CPU time of decoding and encoding (what they cost on an idle machine)
        timing = {"read": read - start, "decode": decoded - read, "queue": done.started - done.created,
                  "generation": done.finished - done.started - done.encode_seconds,
                  "encode": done.encode_seconds + joined, "decode-cpu": decode_cpu, "encode-cpu": done.encode_cpu}
        return Response(answer, media_type="application/json", headers={"Server-Timing": ", ".join(
            f"{k};dur={v * 1000:.1f}" for k, v in timing.items())})

    @app.get("/sdapi/v1/progress", tags=["AUTOMATIC1111"])
    async def progress(skip_current_image: bool = False) -> dict:
        return await run_in_threadpool(a1111.progress_of, engine.running(), skip_current_image,
                                       engine.queued_images())

    @app.post("/sdapi/v1/interrupt", tags=["AUTOMATIC1111"])
    async def interrupt() -> dict:
        engine.stop_running("interrupt")
        return {}

    @app.post("/sdapi/v1/skip", tags=["AUTOMATIC1111"])
    async def skip() -> dict:
        engine.stop_running("skip")
        return {}

    @app.get("/sdapi/v1/sd-models", tags=["AUTOMATIC1111"])
    async def sd_models() -> list[dict]:
        return a1111.sd_models(engine.catalog)

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["AUTOMATIC1111"])
    async def refresh_checkpoints() -> None:
        await run_in_threadpool(engine.catalog.refresh)

    @app.get("/sdapi/v1/options", tags=["AUTOMATIC1111"])
    async def get_options() -> dict:
        rng = engine.defaults.get("randn_source", "GPU")
        return {"sd_model_checkpoint": engine.current.title, "sd_checkpoint_hash": None, "samples_format": "png",
                "live_previews_enable": engine.preview != "none",
                "show_progress_every_n_steps": engine.preview_every or 1, "randn_source": rng,
                "CLIP_stop_at_last_layers": engine.defaults.get("CLIP_stop_at_last_layers", 1),
                "sd_vae": engine.defaults.get("sd_vae", "Automatic")}

    @app.post("/sdapi/v1/options", tags=["AUTOMATIC1111"])
    async def set_options(request: Request) -> None:
        """Acted on: sd_model_checkpoint (loads that model, after the jobs queued before); randn_source,
        CLIP_stop_at_last_layers and sd_vae (the default of later requests). Other settings are ignored."""
        body = await _json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        defaults = await _off_loop(a1111.kept_options, body, engine.catalog)  # checked before any is kept
        engine.defaults.update(defaults)
        if body.get("sd_model_checkpoint") is not None:
            entry = await _off_loop(engine.catalog.find, body["sd_model_checkpoint"], "sd_model_checkpoint")
            try:
                await run_in_threadpool(engine.switch, entry)
            except Exception as e:  # noqa: BLE001 - a listed model that cannot be loaded
                raise ApiError(error_status(e), one_line(e)) from None

    @app.get("/sdapi/v1/samplers", tags=["AUTOMATIC1111"])
    async def samplers() -> list[dict]:
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers", tags=["AUTOMATIC1111"])
    async def schedulers() -> list[dict]:
        return a1111.schedulers()

    @app.get("/sdapi/v1/loras", tags=["AUTOMATIC1111"])
    async def loras() -> list:
        """The models folder's LoRAs, for <lora:NAME:WEIGHT> in prompts."""
        return await run_in_threadpool(engine.catalog.loras)

    @app.post("/sdapi/v1/refresh-loras", tags=["AUTOMATIC1111"])
    async def refresh_loras() -> None:
        await run_in_threadpool(engine.catalog.refresh)

    @app.get("/sdapi/v1/embeddings", tags=["AUTOMATIC1111"])
    async def embeddings() -> dict:
        """The models folder's embeddings: those that fit the current model, and the others (skipped)."""
        return await _off_loop(engine.catalog.embeddings, engine.current)

    @app.get("/sdapi/v1/sd-vae", tags=["AUTOMATIC1111"])
    async def sd_vae() -> list:
        """The models folder's VAEs, for override_settings.sd_vae (and sd_vae in POST /sdapi/v1/options)."""
        return [{"model_name": e.title, "filename": e.filename}
                for e in await run_in_threadpool(a1111.vae_entries, engine.catalog)]

    @app.get("/controlnet/model_list", tags=["AUTOMATIC1111"])
    async def controlnet_models() -> dict:
        """The ControlNet extension's list: the ControlNets of serve --controlnet, by title."""
        return {"model_list": [e.title for e in engine.controlnets]}

    @app.get("/controlnet/module_list", tags=["AUTOMATIC1111"])
    async def controlnet_modules() -> dict:
        return {"module_list": list(a1111.CONTROL_MODULES)}

    @app.get("/controlnet/version", tags=["AUTOMATIC1111"])
    async def controlnet_version() -> dict:
        return {"version": 2}

    @app.get("/sdapi/v1/scripts", tags=["AUTOMATIC1111"])
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.post("/sdapi/v1/png-info", tags=["AUTOMATIC1111"])
    async def png_info(request: Request) -> dict:
        body = await _json(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return await _off_loop(a1111.png_info_of, body.get("image"), limits.max_pixels)

    # ------------------------------------------------------------------------------ native

    @app.post("/v1/jobs", status_code=202, tags=["jobs"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": _native_schema()}}}})
    async def create_job(request: Request) -> dict:
        """Queue a job; answers at once with its id (429 when the queue is full)."""
        body = await _json(request)
        work = await _off_loop(native_work, body, engine.catalog, engine.current, limits.max_pixels)
        return _job_state(_submit(engine, Job(work)), images=False)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str) -> dict:
        """The job's state; its images (base64 PNGs) once it is done."""
        job = _find(job_id)
        return await run_in_threadpool(_job_state, job, True)

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    async def cancel_job(job_id: str) -> dict:
        """Cancel a queued job, or a running one at its next step."""
        job = _find(job_id)
        engine.cancel(job)
        return _job_state(job, images=False)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str) -> StreamingResponse:
        """Server-Sent Events: queued, started, step (with a preview, base64 PNG), image, then done, failed or
        cancelled, after which the stream ends."""
        job = _find(job_id)
        return StreamingResponse(_sse(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models", tags=["jobs"])
    async def models() -> dict:
        return {"current": engine.current.title, "loaded": engine.loaded_titles,
                "models": [{"title": e.title, "filename": e.filename} for e in engine.catalog.entries()]}

    @app.get("/v1/health", tags=["jobs"])
    async def health() -> dict:
        running = engine.running()
        return {"status": "ok", "version": __version__, "running": running.id if running else None,
                "queued": engine.queued(), "queue_size": engine.queue_size}

    def _find(job_id: str) -> Job:
        job = engine.job(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r:.40} (finished jobs are kept for a while only)")
        return job

    return Guard(app, credentials or [], limits.max_body)


async def _wait(job: Job) -> Job:
    await asyncio.wrap_future(job.ended)
    if job.error is not None:
        raise ApiError(job.error.status, str(job.error))
    if job.status == "cancelled":
        raise ApiError(503, "the job was cancelled (the server is stopping, or it was cancelled by id)")
    return job


def _job_state(job: Job, images: bool) -> dict:
    with job._lock:
        state = {"id": job.id, "status": job.status, "progress": job.progress(), "image": job.image_no,
                 "images_total": len(job.work.seeds), "step": job.step, "steps": job.total,
                 "seeds": job.work.seeds, "model": job.work.model.title, "interrupted": job.interrupted,
                 "error": str(job.error) if job.error else None, "created": job.created, "started": job.started,
                 "finished": job.finished}
        if images:
            state["images"] = list(job.encoded) if job.status == "done" else []
    return state


async def _sse(job: Job) -> Any:
    """The job's events as SSE; a step's preview is attached when it is the newest event. Previews are made
    while a stream is open (engine.Job.wants_preview)."""
    cursor = 0
    with job._lock:
        job.watchers += 1
    try:
        while True:
            events = await job.events_after(cursor, SSE_KEEPALIVE_SECONDS)
            if not events:
                yield ": keep-alive\n\n"
                continue
            for i, event in enumerate(events):
                data = dict(event)
                if data["event"] == "step" and data.pop("preview") and i == len(events) - 1:
                    preview = await run_in_threadpool(job.preview_base64, a1111.png_base64)
                    if preview is not None:
                        data["preview"] = preview
                if data["event"] == "done":
                    data["images"] = (await run_in_threadpool(_job_state, job, True))["images"]
                yield f"event: {data['event']}\ndata: {json.dumps(data)}\n\n"
                if data["event"] in ("done", "failed", "cancelled"):
                    return
            cursor += len(events)
    finally:
        with job._lock:
            job.watchers -= 1
