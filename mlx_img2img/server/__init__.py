"""A local HTTP server that keeps models loaded: AUTOMATIC1111's API and a native jobs API.

    models.py  the listed models (what a request may name: the trust rule) and the resident ones
    engine.py  jobs, the bounded queue and the one worker thread that does all model work
    inputs.py  bodies into planned work: images decoded within limits, the native job JSON
    a1111.py   AUTOMATIC1111's JSON <-> the request type; its info, progress and lists
    app.py     the routes (FastAPI on uvicorn), errors, authentication, body limits

Generation goes through the one path (request.Request -> generation.Planner -> Img2ImgPipeline); nothing
here builds a schedule or composes a run.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .app import Limits, create_app
from .engine import Engine
from .models import Catalog, LoadSettings, ModelEntry, first_of_each_title

DEFAULT_PORT = 7860  # AUTOMATIC1111's, so that its clients find the server where they look


@dataclass
class ServerOptions:
    model: str
    host: str | None = None
    port: int = DEFAULT_PORT
    listen: bool = False
    api_auth: str | None = None
    models_dir: Path | None = None
    keep_models: int = 1
    idle_unload_minutes: float | None = None
    queue_size: int = 16
    preview: str = "cheap"
    preview_every: int | None = None  # None: paced to a share of the time (preview.Pacer)
    controlnets: tuple[str, ...] = ()  # what requests may name (serve --controlnet)
    load: LoadSettings = LoadSettings()
    memory_limit_gb: float | None = None
    limits: Limits = Limits()


def parse_credentials(text: str | None) -> list[tuple[str, str]]:
    """--api-auth USER:PASS[,USER:PASS...]"""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError("--api-auth: give USER:PASSWORD (several separated by commas)")
        pairs.append((user, password))
    return pairs


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_address(host: str | None, listen: bool) -> str:
    """Loopback unless --listen: then every interface, or --host. Another --host needs --listen."""
    if host is None:
        return "0.0.0.0" if listen else "127.0.0.1"
    if not listen and not is_loopback(host):
        raise ValueError(f"--host {host}: not a loopback address; add --listen to serve other machines")
    return host


def controlnet_entry(name: str) -> ModelEntry:
    """A ControlNet of serve --controlnet (a folder, a .safetensors file, a preset or a hub repo id), titled by
    its folder or file name."""
    path = Path(name).expanduser()
    if path.exists():
        return ModelEntry(path.resolve().name, str(path), str(path))
    if path.suffix or name.startswith((".", "/", "~")):
        raise ValueError(f"--controlnet {name}: no such file or folder")
    return ModelEntry(name, name, name)


def build(options: ServerOptions) -> tuple[Engine, Any]:
    """The engine (started: the model is loaded, or its error raised) and the ASGI application."""
    catalog = Catalog(options.model, options.models_dir, options.load.dtype, options.load.offline)
    catalog.info(catalog.default)  # a missing or broken model: one error now, not at the first request
    idle = options.idle_unload_minutes * 60 if options.idle_unload_minutes else None
    # what requests may name: serve --controlnet's, then the models folder's ControlNets (a title once: the first)
    controlnets = first_of_each_title([controlnet_entry(name) for name in options.controlnets] + [
        ModelEntry(item.name, str(item.path), str(item.path)) for item in catalog.folder.items("controlnet")
        if not item.problem])
    engine = Engine(catalog, options.load, options.keep_models, idle, options.preview, options.preview_every,
                    options.queue_size, memory_limit_gb=options.memory_limit_gb, controlnets=controlnets)
    engine.start()
    return engine, create_app(engine, parse_credentials(options.api_auth), options.limits)


def serve(options: ServerOptions, say: Callable[[str], None], log_level: str = "info") -> None:
    """Serve until Ctrl-C or SIGTERM: then the running job stops at its next step and the server ends."""
    import uvicorn

    host = bind_address(options.host, options.listen)
    credentials = parse_credentials(options.api_auth)
    if not is_loopback(host) and not credentials:
        say(f"warning: serving on {host} without --api-auth: anyone who can reach this machine can use it")
    engine, app = build(options)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # stop the running job at its next step first: in-flight requests then answer at once and the
            # graceful shutdown does not wait for a whole generation
            engine.stop()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=options.port, log_level=log_level, access_log=False,
                            lifespan="off", timeout_graceful_shutdown=10)
    say(f"Serving {engine.current.title} on http://{host}:{options.port} (AUTOMATIC1111 API at /sdapi/v1, "
        f"jobs at /v1, schema at /openapi.json)")
    try:
        Server(config).run()
    finally:
        engine.shutdown()


__all__ = ["ServerOptions", "LoadSettings", "Limits", "build", "serve", "create_app", "Engine", "Catalog"]
