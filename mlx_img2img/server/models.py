"""The server's models: the listed ones (what a request may name) and the resident ones (loaded).

The trust rule: a request names a model by the title of a listed model, never by a path or a hub id. The
list is the `-m` model and every checkpoint of the models folder (library.ModelsFolder: `--models-dir`, its
AUTOMATIC1111/ComfyUI subfolders; a diffusers folder or a single-file `.safetensors` checkpoint), each titled
by its folder or file name. LoRAs (`<lora:NAME:WEIGHT>` in a prompt) and embeddings are that folder's too,
found by name only (generation.plan_extras); GET /sdapi/v1/loras and /sdapi/v1/embeddings list them.

`Resident` keeps up to `keep` pipelines loaded (least recently used first out) and unloads one idle for
longer than `idle_unload` seconds. It is used only by the worker thread: MLX arrays belong to the thread
that made them.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import library as lib
from ..generation import ModelInfo
from ..loading import open_source
from ..request import RequestError

MAX_LISTED_IN_ERRORS = 10


class UnknownModelError(RequestError):
    """A request named a model that is not listed."""


@dataclass(frozen=True)
class ModelEntry:
    """A listed model. `title` is what clients name it by (A1111's title and sd_model_checkpoint); `source`
    is what is loaded (a preset name, hub id, folder or file given to the server, never by a request)."""

    title: str
    source: str
    filename: str

    @property
    def model_name(self) -> str:
        return self.title.removesuffix(".safetensors")


def _title_of(name: str) -> str:
    path = Path(name).expanduser()
    return path.resolve().name if path.exists() else name


def list_models_dir(folder: lib.ModelsFolder) -> list[ModelEntry]:
    """The checkpoints of the models folder (diffusers folders and .safetensors files), by name."""
    return [ModelEntry(path.name, str(path), str(path)) for path, _ in folder.files("checkpoint")]


def first_of_each_title(entries: list[ModelEntry]) -> list[ModelEntry]:
    """`entries` with each title once: the first entry of a title wins."""
    by_title: dict[str, ModelEntry] = {}
    for e in entries:
        by_title.setdefault(e.title, e)
    return list(by_title.values())


class Catalog:
    """The listed models, with their plan-time info (configs only, read once per model), and the models
    folder their LoRAs and embeddings come from (`models_dir`; None: MLX_IMG2IMG_MODELS or the default)."""

    def __init__(self, default: str, models_dir: Path | None = None, dtype: str = "float32",
                 offline: bool | None = None):
        self.folder = lib.ModelsFolder(models_dir)
        self.models_dir, self.dtype, self.offline = self.folder.root, dtype, offline
        default = self.folder.resolve_checkpoint(default, "-m")
        self._default = ModelEntry(_title_of(default), default, str(Path(default).expanduser())
                                   if Path(default).expanduser().exists() else default)
        self._lock = threading.Lock()
        self._infos: dict[ModelEntry, ModelInfo] = {}
        self.refresh()

    def refresh(self) -> None:
        """List the models folder again (A1111's refresh-checkpoints and refresh-loras)."""
        with self._lock:
            self.folder.refresh()
        entries = first_of_each_title([self._default] + list_models_dir(self.folder))  # -m's model first
        with self._lock:
            self._entries = entries
            self._infos = {e: i for e, i in self._infos.items() if e in entries}

    @property
    def default(self) -> ModelEntry:
        return self._default

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries)

    def find(self, name: Any, what: str = "model") -> ModelEntry:
        """The listed model a request names: by title, model name (the file name without .safetensors) or
        an A1111 title with its hash ("name [abc123]"), case-insensitively. Anything else is refused."""
        if not isinstance(name, str) or not name.strip():
            raise UnknownModelError(f"{what}: give the title of a listed model (GET /sdapi/v1/sd-models)")
        wanted = name.strip()
        if wanted.endswith("]") and " [" in wanted:
            wanted = wanted[: wanted.rindex(" [")]
        wanted = wanted.lower()
        for e in self.entries():
            if wanted in (e.title.lower(), e.model_name.lower()):
                return e
        titles = [e.title for e in self.entries()][:MAX_LISTED_IN_ERRORS]
        raise UnknownModelError(f"{what}: {name!r:.80} is not a listed model; the listed ones: {', '.join(titles)}")

    def info(self, entry: ModelEntry) -> ModelInfo:
        """What planning needs of a model (its configs), read once; no weights are loaded."""
        with self._lock:
            known = self._infos.get(entry)
        if known is not None:
            return known
        info = ModelInfo.of_source(open_source(entry.source, dtype=self.dtype, offline=self.offline))
        info = replace(info, name=entry.title)
        with self._lock:
            self._infos[entry] = info
        return info


    def loras(self) -> list[dict]:
        """AUTOMATIC1111's GET /sdapi/v1/loras: name (what <lora:NAME> takes), alias, path, the file's metadata
        (its header's, as AUTOMATIC1111 shows it)."""
        return [{"name": i.name, "alias": i.alias, "path": str(i.path), "metadata": i.metadata}
                for i in self.folder.items("lora")]

    def embeddings(self, current: ModelEntry) -> dict[str, dict]:
        """AUTOMATIC1111's GET /sdapi/v1/embeddings: those that fit the current model ("loaded": usable in its
        prompts) and the others ("skipped"), with their width and vector count, from their headers."""
        model = self.info(current)
        answer: dict[str, dict] = {"loaded": {}, "skipped": {}}
        for item in self.folder.items("embedding"):
            shape = vectors = None
            usable = False
            if not item.problem:
                tensors, _ = lib.read_header(item.path)
                first = next(iter(tensors.values())).shape if tensors else ()
                shape, vectors = (first[-1] if first else None), (first[0] if len(first) == 2 else 1)
                # SDXL's pairs fit SDXL models; one table fits a model whose text is as wide (SD 1.x: 768)
                pair = set(lib.SDXL_TABLES) <= set(tensors)
                usable = model.is_sdxl if pair else (not model.is_sdxl and shape == model.context_width)
            answer["loaded" if usable else "skipped"][item.name] = {
                "step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": shape, "vectors": vectors}
        return answer


@dataclass(frozen=True)
class LoadSettings:
    """How every model is loaded: the command line's precision and memory options."""

    dtype: str = "float32"
    quantize: int | None = None
    low_memory: bool = False
    vae_tile: int | None = None
    offline: bool | None = None


class Resident:
    """Loaded pipelines by model (worker thread only)."""

    def __init__(self, settings: LoadSettings, keep: int = 1, idle_unload: float | None = None):
        self.settings, self.keep, self.idle_unload = settings, max(1, keep), idle_unload
        self._pipes: OrderedDict[ModelEntry, tuple[Any, float]] = OrderedDict()

    def loaded(self) -> list[ModelEntry]:
        return list(self._pipes)

    def get(self, entries: list[ModelEntry]) -> list[Any]:
        """The pipelines of these models, loading what is not resident; others are unloaded first to stay
        within `keep` (the ones asked for are never unloaded for each other)."""
        missing = [e for e in entries if e not in self._pipes]
        room = self.keep - len(missing)
        for old in [e for e in self._pipes if e not in entries][: max(0, len(self._pipes) - max(room, 0))]:
            self._unload(old)
        now = time.monotonic()
        for e in missing:
            self._pipes[e] = (self._load(e), now)
        pipes = []
        for e in entries:
            self._pipes[e] = (self._pipes[e][0], now)
            self._pipes.move_to_end(e)
            pipes.append(self._pipes[e][0])
        return pipes

    def unload_idle(self) -> list[ModelEntry]:
        """Unload the models unused for longer than `idle_unload` seconds; returns them."""
        if not self.idle_unload:
            return []
        now = time.monotonic()
        idle = [e for e, (_, used) in self._pipes.items() if now - used > self.idle_unload]
        for e in idle:
            self._unload(e)
        return idle

    def clear(self) -> None:
        for e in list(self._pipes):
            self._unload(e)

    def _load(self, entry: ModelEntry) -> Any:
        from ..pipeline import Img2ImgPipeline

        s = self.settings
        source = open_source(entry.source, dtype=s.dtype, offline=s.offline)
        return Img2ImgPipeline.from_source(source, dtype=s.dtype, quantize=s.quantize, low_memory=s.low_memory,
                                           vae_tile=s.vae_tile)

    def _unload(self, entry: ModelEntry) -> None:
        import mlx.core as mx

        del self._pipes[entry]
        gc.collect()
        mx.clear_cache()
