"""The models folder: the checkpoints, VAEs, LoRAs, embeddings and ControlNets a user already has, by name.

One folder (``--models-dir``, else ``MLX_IMG2IMG_MODELS``, else a per-platform default) with subfolders named
as AUTOMATIC1111 and ComfyUI name theirs, so it can point at a folder either tool already filled:

    checkpoints   Stable-diffusion/ (A1111), checkpoints/, diffusers/ (ComfyUI), and the folder's own top level
    VAEs          VAE/, vae/
    LoRAs         Lora/, loras/, LyCORIS/
    embeddings    embeddings/
    ControlNets   ControlNet/ (A1111), controlnet/ (ComfyUI)

each also under ``models/``, so the install folder of either tool works too (A1111 keeps its embeddings beside
its ``models/`` folder). Subfolders of these are searched (names are file stems, as both tools show them).

What a file is and which model family it fits is read from its safetensors header alone, never from its
tensors: listing a folder of 20 GB costs a few kilobytes per file. Only what lies in the folder is opened:
only ``.safetensors`` files (and diffusers folders, for checkpoints and ControlNets); a linked file or model
folder is an entry like any other, but linked folders are not searched.

Also here: AUTOMATIC1111's ``<lora:NAME:WEIGHT>`` prompt tags, and the hashes it writes into images
(``Lora hashes``: the SHA-256 of a LoRA file's tensor data, after its header; ``TI hashes``: of the whole
embedding file; 12 hex digits each).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFormatError
from .loading.embeddings import SDXL_TABLES
from .loading.lora import KOHYA_PREFIXES, PEFT_PAIRS, UNSUPPORTED
from .loading.single_file import (
    CONFIGS,
    FAMILY_BY_CONTEXT_WIDTH,
    FAMILY_NAMES,
    PICKLE_SUFFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    detect_family,
    refuse_pickle,
)
from .weights import CONTROLNET_PRESETS, PRESETS, read_json, safetensors_header

ENV_VAR = "MLX_IMG2IMG_MODELS"
KINDS = ("checkpoint", "vae", "lora", "embedding", "controlnet")
KIND_NAMES = {"checkpoint": "checkpoints", "vae": "VAEs", "lora": "LoRAs", "embedding": "embeddings",
              "controlnet": "ControlNets"}
# The subfolders of each kind: AUTOMATIC1111's names first, then ComfyUI's.
SUBFOLDERS = {"checkpoint": ("Stable-diffusion", "checkpoints", "diffusers"), "vae": ("VAE", "vae"),
              "lora": ("Lora", "loras", "LyCORIS"), "embedding": ("embeddings",),
              "controlnet": ("ControlNet", "controlnet")}
SUFFIX = ".safetensors"
MAX_DEPTH = 6  # subfolder levels searched below a kind's folder
MAX_FILES = 20_000  # per kind: a folder with more is not a models folder
SHORT_HASH = 12  # AUTOMATIC1111's short hashes (Lora hashes, TI hashes)
SD2_TEXT_WIDTH = 1024
# <lora:NAME:WEIGHT> and AUTOMATIC1111's other "extra networks" (lyco is its other name for lora)
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_TAGS = ("lora", "lyco")


class ModelsFolderError(ValueError):
    """A name that the models folder cannot resolve (unknown, ambiguous), or a file that does not fit."""


def default_models_dir() -> Path:
    """~/Library/Application Support/mlx-img2img/models on macOS; $XDG_DATA_HOME/mlx-img2img/models (default
    ~/.local/share) elsewhere."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlx-img2img" / "models"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mlx-img2img" / "models"


def models_dir(given: str | os.PathLike | None = None) -> Path:
    """The models folder: the one given, else $MLX_IMG2IMG_MODELS, else the default."""
    chosen = given if given not in (None, "") else os.environ.get(ENV_VAR) or default_models_dir()
    return Path(chosen).expanduser()


def is_path_like(name: str) -> bool:
    """A name that is meant as a path (a separator, a home folder, a file suffix), not a name to look up."""
    return ("/" in name or "\\" in name or name.startswith(("~", "."))
            or name.lower().endswith((SUFFIX, *PICKLE_SUFFIXES)))


# ---------------------------------------------------------------------------------------------- headers

class _Shape:
    """A tensor known by its header entry only: what the key-based detectors read (its shape)."""

    def __init__(self, shape: list[int]):
        self.shape = tuple(shape)


def read_header(path: Path) -> tuple[dict[str, _Shape], dict[str, str]]:
    """The tensors (by key, shapes only) and the metadata of a safetensors file, from its header; a clear
    ModelFormatError for a file that is not safetensors or is truncated. The tensor data is not read."""
    refuse_pickle(path)
    if path.suffix.lower() != SUFFIX:
        raise ModelFormatError(f"{path.name}: not a .safetensors file")
    header, _ = safetensors_header(path, path.name)
    metadata = header.pop("__metadata__", None) or {}
    try:
        tensors = {k: _Shape(v["shape"]) for k, v in header.items()}
    except (KeyError, TypeError) as e:
        raise ModelFormatError(f"{path.name} is not a valid safetensors file ({e})") from None
    return tensors, {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


_hashes: dict[tuple[str, int, int, bool], str] = {}


def file_hash(path: Path, after_header: bool) -> str:
    """SHA-256 (hex) of a file, or of its tensor data only (`after_header`: AUTOMATIC1111's LoRA hash, which
    leaves out the header so that edited metadata keeps the hash). Remembered per file, size and time."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, after_header)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            if after_header:
                f.seek(8 + safetensors_header(path, path.name)[1])
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


# ---------------------------------------------------------------------------------------------- what a file is

_TO_K = re.compile(r"attn2[._]to_k(?:\.lora_down\.weight|\.lora_A\.weight|\.lora\.down\.weight)$")
_TEXT_Q = re.compile(r"q_proj(?:\.lora_down\.weight|\.lora_A\.weight|\.lora\.down\.weight)$")


@dataclass(frozen=True)
class Item:
    """One file (or diffusers folder) of the models folder, as its header describes it. `family`: "sd1",
    "sd2", "sdxl", "sdxl-refiner", or None where the header does not tell; `problem`: why it cannot be used."""

    kind: str
    name: str
    path: Path
    family: str | None = None
    detail: str = ""
    problem: str | None = None
    metadata: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    evidence: tuple[str, ...] = ()  # a few keys that tell the family, for messages

    @property
    def family_name(self) -> str:
        if self.kind == "vae" and self.family is None and not self.problem:
            return "SD 1.x/2.x/SDXL"  # one VAE architecture for all three: the shapes cannot tell them apart
        return FAMILY_NAMES.get(self.family or "", "unknown family")

    @property
    def alias(self) -> str:
        """AUTOMATIC1111's alias of a LoRA: the name it was trained under, else the file's name."""
        return self.metadata.get("ss_output_name") or self.name


# ControlNet single files: the original layout (1.0/1.1), its prefix-less variant and the diffusers layout
CONTROLNET_MARKERS = ("control_model.", "input_hint_block.", "controlnet_cond_embedding.")


def _kind_of(keys: set[str]) -> str | None:
    if any(k.startswith(CONTROLNET_MARKERS) for k in keys):
        return "controlnet"
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return "checkpoint"
    if any(k.startswith(tuple(KOHYA_PREFIXES)) or k.endswith(tuple(p[0] for p in PEFT_PAIRS))
           or any(m in k for m in UNSUPPORTED) for k in keys):
        return "lora"
    if any(k.startswith(("encoder.", "decoder.", VAE_PREFIX)) for k in keys):
        return "vae"
    if "emb_params" in keys or set(SDXL_TABLES) <= keys or (0 < len(keys) <= 16 and not any("." in k for k in keys)):
        return "embedding"
    return None


def _width_family(width: int | None) -> str | None:
    return FAMILY_BY_CONTEXT_WIDTH.get(width) if width is not None else None


def _lora_family(tensors: dict[str, _Shape], metadata: dict[str, str]) -> tuple[str | None, str, tuple[str, ...]]:
    """A LoRA's family from its keys: the text width its cross-attention to_k layers take, else its text
    encoders (two: SDXL; one by width); then kohya's training metadata, as AUTOMATIC1111 reads it. Also a
    description and a few of the keys that told."""
    to_k = [(k, t.shape[1]) for k, t in tensors.items() if _TO_K.search(k) and len(t.shape) >= 2]
    if to_k:
        return _width_family(to_k[0][1]), f"text width {to_k[0][1]}", tuple(sorted(k for k, _ in to_k)[:3])
    two = sorted(k for k in tensors if k.startswith(("lora_te2_", "text_encoder_2.")))
    if two:
        return "sdxl", "two text encoders", tuple(two[:3])
    text = [(k, t.shape[1]) for k, t in tensors.items() if _TEXT_Q.search(k) and len(t.shape) >= 2]
    if text and text[0][1] in (768, SD2_TEXT_WIDTH):
        width = text[0][1]
        family = "sd2" if width == SD2_TEXT_WIDTH else "sd1"
        return family, f"text width {width}", tuple(sorted(k for k, _ in text)[:3])
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "sdxl", "training metadata", ("ss_base_model_version",)
    if str(metadata.get("ss_v2", "")) == "True":
        return "sd2", "training metadata", ("ss_v2",)
    return None, "", ()


def _embedding_family(tensors: dict[str, _Shape]) -> tuple[str | None, str]:
    if set(SDXL_TABLES) <= set(tensors):
        return "sdxl", "clip_l and clip_g vectors"
    shapes = [t.shape for t in tensors.values()]
    widths = {s[-1] for s in shapes if s}
    if len(widths) == 1:
        (width,) = widths
        vectors = shapes[0][0] if len(shapes[0]) == 2 else 1
        return (_width_family(width) if width in (768, SD2_TEXT_WIDTH) else None), f"{vectors} x {width}"
    return None, ""


def inspect_file(path: Path, kind: str | None = None) -> Item:
    """What a .safetensors file is (by its header): `kind` is where it was found (None: at the folder's top,
    judged by its keys). A file that cannot be read is listed with its problem."""
    name = path.name[: -len(SUFFIX)] if path.name.lower().endswith(SUFFIX) else path.stem
    try:
        tensors, metadata = read_header(path)
    except (ModelFormatError, OSError) as e:  # listed with its problem; using it says the same
        return Item(kind or "checkpoint", name, path, problem=" ".join(str(e).split()))
    found = _kind_of(set(tensors))
    kind = kind or found or "checkpoint"
    if found is not None and found != kind:
        return Item(kind, name, path, problem=f"this is a {found} file, not a {kind}", metadata=metadata)
    if kind == "checkpoint":
        try:
            family = detect_family(tensors, path.name)  # type: ignore[arg-type]
        except ModelFormatError:
            return Item(kind, name, path, problem="not a Stable Diffusion checkpoint in the original layout")
        conv_in = tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
        inpainting = conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] == 9
        return Item(kind, name, path, family, "inpainting" if inpainting else "", metadata=metadata)
    if kind == "lora":
        unsupported = next((v for k, v in UNSUPPORTED.items() if any(k in key for key in tensors)), None)
        family, why, keys = _lora_family(tensors, metadata)
        return Item(kind, name, path, family, why, f"{unsupported}: not supported" if unsupported else None,
                    metadata, keys)
    if kind == "controlnet":  # its family by the text width its cross-attention takes, as a LoRA's
        width = next((t.shape[1] for k, t in tensors.items() if k.endswith("attn2.to_k.weight") and len(t.shape) == 2),
                     None)
        return Item(kind, name, path, _width_family(width), f"text width {width}" if width else "", metadata=metadata)
    if kind == "vae":
        conv = next((t for k, t in tensors.items() if k.endswith("decoder.conv_in.weight")), None)
        channels = conv.shape[1] if conv is not None and len(conv.shape) == 4 else None
        problem = None if channels in (None, 4) else f"{channels} latent channels: not an SD 1.x/2.x/SDXL VAE"
        return Item(kind, name, path, None, f"{channels} latent channels" if channels else "", problem, metadata)
    family, why = _embedding_family(tensors)
    return Item(kind, name, path, family, why, metadata=metadata, evidence=tuple(sorted(tensors)[:3]))


def inspect_folder(path: Path) -> Item:
    """A diffusers model folder (its family from the UNet's config) or ControlNet folder (from its own)."""
    if _is_controlnet_folder(path):
        try:
            config = read_json(path / "config.json")
        except ModelFormatError as e:
            return Item("controlnet", path.name, path, problem=" ".join(str(e).split()))
        kind, width = config.get("_class_name"), config.get("cross_attention_dim")
        if kind not in (None, "ControlNetModel"):
            why = f"not a ControlNetModel folder (its config says {kind!s:.40})"
            return Item("controlnet", path.name, path, problem=why)
        family = _width_family(width) if isinstance(width, int) else None
        return Item("controlnet", path.name, path, family, "diffusers folder")
    try:
        config = read_json(path / "unet" / "config.json")
        width = config.get("cross_attention_dim")
        family = _width_family(width) if isinstance(width, int) else None
        inpainting = config.get("in_channels") == 9
        return Item("checkpoint", path.name, path, family, "diffusers folder" + (", inpainting" if inpainting else ""))
    except ModelFormatError as e:
        return Item("checkpoint", path.name, path, problem=" ".join(str(e).split()))


def fits(item_family: str | None, model_family: str | None, kind: str) -> bool:
    """Whether a LoRA or embedding of `item_family` fits a model of `model_family` (unknown: it may; the load
    checks every layer). An SDXL embedding's clip_g vectors also fit the refiner."""
    if item_family is None or model_family is None or item_family == model_family:
        return True
    return kind == "embedding" and (item_family, model_family) == ("sdxl", "sdxl-refiner")


# ---------------------------------------------------------------------------------------------- the folder

def _is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()


def _is_controlnet_folder(path: Path) -> bool:
    """A diffusers ControlNetModel folder: its config.json and weights, no pipeline around it."""
    return (path / "config.json").is_file() and not _is_diffusers_folder(path) and any(path.glob("*" + SUFFIX))


MODEL_FOLDERS = {"checkpoint": _is_diffusers_folder, "controlnet": _is_controlnet_folder}  # folders as entries
# the kinds a model flag names (-m, --refiner, --controlnet): what they are called in errors, their presets
NAMED_MODELS = {"checkpoint": ("model folder", PRESETS), "controlnet": ("ControlNet folder, file", CONTROLNET_PRESETS)}


class ModelsFolder:
    """The models folder's files by kind. Listing reads names only; `items` reads each file's header."""

    def __init__(self, root: str | os.PathLike | None = None, lora_dir: str | os.PathLike | None = None):
        self.root = models_dir(root)
        self.lora_dir = Path(lora_dir).expanduser() if lora_dir else None
        self._files: dict[str, list[tuple[Path, bool]]] = {}
        self._top: dict[Path, str] | None = None

    def folders(self, kind: str) -> list[Path]:
        """The existing folders of a kind (each once, also where the file system ignores case)."""
        if kind == "lora" and self.lora_dir is not None:
            candidates = [self.lora_dir]
        else:
            candidates = [base / sub for base in (self.root, self.root / "models") for sub in SUBFOLDERS[kind]]
        found: list[Path] = []
        for folder in candidates:
            if folder.is_dir() and not any(_same(folder, f) for f in found):
                found.append(folder)
        return found

    def where(self, kind: str) -> str:
        """Where a kind is looked for, for messages."""
        if kind == "lora" and self.lora_dir is not None:
            return str(self.lora_dir)
        subs = "|".join(SUBFOLDERS[kind])
        return f"{self.root}/{{{subs}}}" + (" (and its top level)" if kind == "checkpoint" else "")

    def files(self, kind: str) -> list[tuple[Path, bool]]:
        """(path, found at the top level) of every candidate of a kind: .safetensors files (and diffusers
        folders, for checkpoints and ControlNets) in its folders, and the files at the folder's top level whose
        keys say they are of this kind."""
        if kind not in self._files:
            found = [(p, False) for folder in self.folders(kind) for p in self._walk(folder, MODEL_FOLDERS.get(kind))]
            if not (kind == "lora" and self.lora_dir is not None):
                found += [(p, True) for p, k in self._top_level().items() if k == kind]
            self._files[kind] = found
        return self._files[kind]

    def _top_level(self) -> dict[Path, str]:
        """The folder's own top-level files and diffusers folders, by the kind their keys say."""
        if self._top is None:
            self._top = {}
            if self.root.is_dir():
                for p in sorted(self.root.iterdir(), key=lambda p: p.name.lower()):
                    if p.is_file() and p.name.lower().endswith(SUFFIX) and not p.name.startswith("."):
                        self._top[p] = inspect_file(p).kind
                    elif p.is_dir() and _is_diffusers_folder(p):
                        self._top[p] = "checkpoint"
        return self._top

    def _walk(self, folder: Path, model_folder: Callable[[Path], bool] | None) -> list[Path]:
        """The .safetensors files below `folder`, and the folders that `model_folder` says are one entry."""
        out: list[Path] = []
        for top, dirs, names in os.walk(folder, followlinks=False):
            depth = len(Path(top).relative_to(folder).parts)
            if model_folder and top != str(folder) and model_folder(Path(top)):
                out.append(Path(top))
                dirs.clear()
                continue
            if model_folder:  # a linked model folder is one entry; other linked folders are not searched
                out += [Path(top) / d for d in sorted(dirs) if (Path(top) / d).is_symlink()
                        and model_folder(Path(top) / d)]
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
            out += [Path(top) / n for n in sorted(names, key=str.lower) if n.lower().endswith(SUFFIX)
                    and not n.startswith(".")]
            if len(out) > MAX_FILES:
                raise ModelsFolderError(f"{folder}: over {MAX_FILES} files; is this a models folder?")
        return out

    def items(self, kind: str) -> list[Item]:
        """Every file of a kind with what its header says (for listings)."""
        return [inspect_folder(p) if p.is_dir() else inspect_file(p, kind) for p, _ in self.files(kind)]

    def names(self, kind: str) -> list[str]:
        return [_name(p) for p, _ in self.files(kind)]

    def find(self, kind: str, name: str) -> Item | None:
        """The file of a kind named `name` (its stem; the .safetensors suffix may be given): an exact match,
        else the one that matches ignoring case, else (a LoRA) the one whose alias it is, which reads the
        headers. Two files of the name are refused, naming both."""
        wanted = name[: -len(SUFFIX)] if name.lower().endswith(SUFFIX) else name
        paths = [p for p, _ in self.files(kind)]
        same = [p for p in paths if _name(p) == wanted] or [p for p in paths if _name(p).lower() == wanted.lower()]
        if len(same) > 1:
            raise ModelsFolderError(f"{name!r} names {len(same)} {KIND_NAMES[kind]}: "
                                    f"{', '.join(str(p) for p in same[:4])}; give the path of the one to use")
        if not same and kind == "lora":  # AUTOMATIC1111 also takes a LoRA's alias (the name it was trained as)
            same = [i.path for i in self.items(kind) if i.alias != i.name and i.alias == wanted]
        if len(same) > 1:
            raise ModelsFolderError(f"{name!r} is the alias of {len(same)} LoRAs: "
                                    f"{', '.join(str(p) for p in same[:4])}; give the file's name")
        if not same:
            return None
        path = same[0]
        return inspect_folder(path) if path.is_dir() else inspect_file(path, kind)

    def not_found(self, kind: str, name: str, what: str, extra: list[str] = ()) -> ModelsFolderError:
        """The error for a name that is in no folder of its kind, with the nearest names."""
        names = list(dict.fromkeys([*self.names(kind), *extra]))
        near = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        hint = f"; near names: {', '.join(near)}" if near else (
            f" ({len(names)} {KIND_NAMES[kind]} there)" if names else f" (no {KIND_NAMES[kind]} there)")
        return ModelsFolderError(f"{what}: no {kind} named {name!r} in {self.where(kind)}{hint}")

    def resolve(self, kind: str, name: str, what: str, paths: bool = True) -> Item:
        """A file of this kind for a name or (with `paths`) a path; usable (its header read and fine) or a
        clear error."""
        if paths and (is_path_like(name) or Path(name).expanduser().exists()):
            path = Path(name).expanduser()
            if not path.exists():
                raise ModelsFolderError(f"{what}: no such file: {path}")
            item = inspect_folder(path) if path.is_dir() else inspect_file(path, kind)
        else:
            item = self.find(kind, name)
            if item is None:
                raise self.not_found(kind, name, what)
        if item.problem:
            raise ModelsFolderError(f"{what}: {item.path}: {item.problem}")
        return item

    def resolve_name(self, kind: str, name: str, what: str) -> str:
        """A path as it is (opening it says what is wrong with it); a name: the file of the folder."""
        if is_path_like(name) or Path(name).expanduser().exists():
            return name
        return str(self.resolve(kind, name, what).path)

    def resolve_checkpoint(self, name: str, what: str = "--model") -> str:
        """What to open for a -m NAME: a path, a preset or a hub repo id as given (opening it says what is
        wrong with it), else a checkpoint of the folder by name; anything else is refused (`_named_model`)."""
        item = self._named_model("checkpoint", name, what)
        return name if item is None else str(item.path)

    def resolve_controlnet(self, name: str, what: str = "--controlnet") -> str:
        """What to load for a --controlnet NAME: as `resolve_checkpoint`, and a ControlNet of the folder that
        cannot be used is refused now, not after the model has loaded."""
        item = self._named_model("controlnet", name, what)
        if item is not None and item.problem:
            raise ModelsFolderError(f"{what}: {item.path}: {item.problem}")
        return name if item is None else str(item.path)

    def _named_model(self, kind: str, name: str, what: str) -> Item | None:
        """The checkpoint or ControlNet of the folder that a model flag's NAME names; None where NAME is taken
        as given: a path, a preset or a hub repo id (a name with a slash). Anything else is refused, with the
        presets and the nearest names."""
        noun, presets = NAMED_MODELS[kind]
        if Path(name).expanduser().exists() or name in presets or is_path_like(name):
            return None
        item = self.find(kind, name)
        if item is None:
            error = self.not_found(kind, name, what, list(presets))
            raise ModelsFolderError(f"no such {noun}, preset or hub repo id: {name!r} (presets: "
                                    f"{', '.join(presets)}); {str(error).removeprefix(what + ': ')}")
        return item

    def refresh(self) -> None:
        self._files.clear()
        self._top = None


def _name(path: Path) -> str:
    return path.name[: -len(SUFFIX)] if path.name.lower().endswith(SUFFIX) else path.name


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- prompt tags

def lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]], list[str]]:
    """AUTOMATIC1111's extra-network tags taken out of a prompt: the prompt without them (the rest of the text
    as it was), the LoRAs asked for (``<lora:NAME>``: weight 1; ``<lora:NAME:W>``; ``te=``/``unet=`` named
    weights, which must agree: one weight is applied to both), and the tags of other kinds (ignored)."""
    loras: list[tuple[str, float]] = []
    others: list[str] = []

    def take(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2).split(":")
        if kind.lower() not in LORA_TAGS:
            others.append(m.group(0))
            return ""
        name = args[0].strip()
        positional = [a for a in args[1:] if "=" not in a]
        named = dict(a.split("=", 1) for a in args[1:] if "=" in a)
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise ModelsFolderError(f"{m.group(0)}: the weight must be a number") from None
        if te != unet:
            raise ModelsFolderError(f"{m.group(0)}: separate text-encoder and UNet weights are not supported; "
                                    "give one weight")
        if not name:
            raise ModelsFolderError(f"{m.group(0)}: give the LoRA's name")
        loras.append((name, te))
        return ""

    return EXTRA_NETWORK.sub(take, prompt), loras, others


def parse_hash_list(text: Any) -> dict[str, str]:
    """AUTOMATIC1111's ``"name: hash, name: hash"`` (Lora hashes, TI hashes) as {name: hash}; what is not
    in that form is left out."""
    out: dict[str, str] = {}
    if not isinstance(text, str):
        return out
    for part in text.split(","):
        name, _, value = part.rpartition(":")
        value = value.strip().lower()
        if name.strip() and re.fullmatch(r"[0-9a-f]{8,64}", value):
            out[name.strip()] = value
    return out


_vocabulary: set[str] = set()


def is_clip_word(name: str) -> bool:
    """Whether an embedding's name is a token of CLIP's vocabulary (the same for every family; shipped): such
    a name cannot be given an embedding's vectors here (AUTOMATIC1111 matches token sequences instead)."""
    if not _vocabulary:
        _vocabulary.update(json.loads((CONFIGS / "clip" / "vocab.json").read_text(encoding="utf-8")))
    return name.lower() in _vocabulary


def embedding_in_text(name: str, text: str) -> bool:
    """Whether an embedding's name stands in a prompt as a word of its own (case-insensitively, as the
    tokenizer lower-cases prompts)."""
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text, re.IGNORECASE) is not None
