"""Stable Diffusion image-to-image in MLX, matching diffusers on the same weights."""

from . import blas

blas.load_before_mlx()  # first: where mlx.core is not imported yet, MLX then binds its BLAS calls to OpenBLAS

from .errors import ImageInputError, Img2ImgError, ModelFormatError, ModelNotFoundError, NumericalError
from .events import StepEvent, StepHook
from .noise import NoiseSource, SeededNoise
from .pipeline import Img2ImgPipeline, Img2ImgResult
from .weights import PRESETS

__version__ = "0.1.0"

__all__ = [
    "Img2ImgPipeline", "Img2ImgResult", "NoiseSource", "SeededNoise", "PRESETS", "StepEvent", "StepHook",
    "Img2ImgError", "ImageInputError", "ModelFormatError", "ModelNotFoundError", "NumericalError",
    "__version__",
]
