"""The diffusers folder layout as a component source: one folder per component, each with its config and
safetensors weights (optionally sharded, or in an ".fp16." variant), and model_index.json at the top."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..errors import ModelFormatError
from ..weights import check_safetensors, read_json, select_weight_files

CONFIG_FILES = {"scheduler": "scheduler_config.json"}


class DiffusersFolder:
    """A local diffusers-layout model folder (also what the hub cache holds)."""

    def __init__(self, folder: str | Path, display_name: str | None = None):
        self.folder = Path(folder)
        self.name = display_name or self.folder.resolve().name
        encoders = [n for n in ("text_encoder", "text_encoder_2") if self.has(n)]
        missing = [c for c in ("unet", "vae", "scheduler") if not self.has(c)]
        missing += [] if encoders else ["text_encoder"]
        missing += [n.replace("text_encoder", "tokenizer") for n in encoders
                    if not self.has(n.replace("text_encoder", "tokenizer"))]
        if missing:
            raise ModelFormatError(f"{self.folder} is not a complete diffusers model: no {', '.join(missing)} folder")

    def has(self, component: str) -> bool:
        return (self.folder / component).is_dir()

    def config(self, component: str) -> dict:
        return read_json(self.folder / component / CONFIG_FILES.get(component, "config.json"))

    def tensors(self, component: str, dtype: mx.Dtype) -> dict[str, mx.array]:
        return load_weights(self.folder / component, dtype)

    def tokenizer_folder(self, component: str) -> Path:
        return self.folder / component

    def pipeline_config(self) -> dict:
        index = self.folder / "model_index.json"
        return read_json(index) if index.exists() else {}

    def settle(self, unet) -> None:
        """Nothing to settle: the folder's configs say everything."""


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
