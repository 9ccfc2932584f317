"""Stable Diffusion image-to-image in MLX, matching diffusers on the same weights."""

from .errors import ImageInputError, Img2ImgError, ModelFormatError, ModelNotFoundError
from .pipeline import Img2ImgPipeline, Img2ImgResult, NoiseSource, SeededNoise
from .weights import PRESETS

__version__ = "0.1.0"

__all__ = [
    "Img2ImgPipeline", "Img2ImgResult", "NoiseSource", "SeededNoise", "PRESETS",
    "Img2ImgError", "ImageInputError", "ModelFormatError", "ModelNotFoundError", "__version__",
]
