"""Errors a user can act on. The CLI prints their message as one line, without a traceback."""


class Img2ImgError(Exception):
    """Base class: a problem with the user's input, model or settings (not a bug)."""


class ModelNotFoundError(Img2ImgError):
    """No such folder, repo id or preset, or it is not cached while offline."""


class ModelFormatError(Img2ImgError):
    """A model folder is incomplete or its files are corrupt, truncated or of the wrong shape."""


class ImageInputError(Img2ImgError):
    """An input image cannot be read, is not an image, or is too large."""


class NumericalError(Img2ImgError):
    """The computation overflowed (infinite or NaN latents): it would give a black image."""
