"""``python -m mlx_img2img``: the same command line as ``mlx-img2img``."""

from .cli import main

main(prog_name="mlx-img2img")
