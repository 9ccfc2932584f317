"""ControlNets: a diffusers ControlNetModel folder (config.json and safetensors weights), a hub repo of
one (a preset or repo id, through the hub cache), loaded through the same chain as a pipeline's parts."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from ..errors import ModelFormatError
from ..models.controlnet import ControlNetConfig, ControlNetModel
from ..weights import DTYPES, download, read_json
from . import LoadOptions, load_component
from .folder import load_weights
from .single_file import is_single_file

CONTROLNET = "controlnet"  # the component's name (a pipeline folder's subfolder, and in messages)


class ComponentFolder:
    """One component's folder (config.json + weights) as a component source."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name

    def config(self, component: str) -> dict:
        return read_json(self.folder / "config.json")

    def tensors(self, component: str, dtype: mx.Dtype) -> dict[str, mx.array]:
        return load_weights(self.folder, dtype)


def controlnet_folder(name_or_path: str | os.PathLike, dtype: str = "float32", offline: bool | None = None) -> Path:
    """The folder of a ControlNet: a local folder (or a pipeline folder's controlnet/), else a preset
    (weights.CONTROLNET_PRESETS) or hub repo id through the hub cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        folder = path / CONTROLNET if (path / CONTROLNET).is_dir() else path
        if not (folder / "config.json").is_file():
            raise ModelFormatError(f"{path} is not a ControlNet folder: it has no config.json")
        return folder
    if is_single_file(path):
        raise ModelFormatError(f"{path.name}: single-file ControlNets are not read yet; give a diffusers "
                               "ControlNet folder or hub repo id")
    return download(str(name_or_path), dtype=dtype, offline=offline, single_component=True)


def load_controlnet(name_or_path: str | os.PathLike, options: LoadOptions,
                    offline: bool | None = None) -> ControlNetModel:
    """A ControlNet through the loading chain (strict load, patches, quantization as the UNet's)."""
    dtype_name = next(name for name, dtype in DTYPES.items() if dtype == options.dtype)  # which files to fetch
    folder = controlnet_folder(name_or_path, dtype_name, offline)
    source = ComponentFolder(folder, _display_name(name_or_path, folder))
    config = source.config(CONTROLNET)
    kind = config.get("_class_name")
    if kind not in (None, "ControlNetModel"):
        raise ModelFormatError(f"{source.name}: a {kind}, not a ControlNetModel (SD 1.x/2.x and SDXL ControlNets)")
    model = ControlNetModel(ControlNetConfig.from_dict(config))
    return load_component(source, CONTROLNET, model, options)


def _display_name(name_or_path: str | os.PathLike, folder: Path) -> str:
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.is_dir() else str(name_or_path)
