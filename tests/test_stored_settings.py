"""What an image's PNG stores (generation.image_settings) through both doors, the command line's (jobs.Runner)
and the server's (server.engine.settings_of): the same request stores the same settings. Planned on the tiny
model's configs only: no weights are loaded."""

from __future__ import annotations

from pathlib import Path

from mlx_img2img import images
from mlx_img2img.generation import ModelInfo, Planner
from mlx_img2img.jobs import Runner, Step
from mlx_img2img.loading import open_source
from mlx_img2img.request import Request
from mlx_img2img.server.engine import Work, settings_of
from mlx_img2img.server.models import LoadSettings, ModelEntry

VERSION = "mlx-img2img 0.1.0"


def test_the_command_line_and_the_server_store_the_same_settings(tiny_sd15: Path) -> None:
    """The server's load settings are stored as the command line's flags are (the VAE's tiling moves pixels:
    --from needs it), and its VAE is named in AUTOMATIC1111's field by the file's name, as A1111 and the command
    line write it (its sd_vae values are file names)."""
    info = ModelInfo.of_source(open_source(tiny_sd15))
    common = {"prompt": "a house", "model": "tiny", "strength": 0.6, "steps": 4, "seed": 3, "rng": "torch",
              "clip_skip": 2, "dtype": "float32"}
    model = ModelEntry("tiny", str(tiny_sd15), str(tiny_sd15))
    vae = ModelEntry("tiny-vae.safetensors", "/vaes/tiny-vae.safetensors", "/vaes/tiny-vae.safetensors")
    for load, work, tile in [(LoadSettings(vae_tile=64), (64, 64), 64),
                             (LoadSettings(low_memory=True), (320, 256), 256)]:  # --low-memory: 256-pixel tiles
        flags = {"vae_tile": load.vae_tile, "low_memory": load.low_memory, "vae": "/vaes/tiny-vae.safetensors"}
        cli_request = Request.from_values({**common, **flags}).validate()
        runner = Runner(Planner(cli_request, info), None, True, False, False, VERSION, "tiny")
        by_cli = runner.settings_for(Step("a house", 0.6, Path("out.png"), "strength 0.6"), 3, "in.png", (64, 64),
                                     work)
        served = Request.from_values(common).validate()
        by_server = settings_of(Work(served, Planner(served, info), model, None, [], [3], vae=vae), 3, (64, 64),
                                work, load)
        assert by_cli.pop("input") == "in.png" and by_cli.pop("vae") == vae.source
        assert by_server.pop("vae") == vae.title
        assert by_server == by_cli and by_server["vae_tile"] == tile
        assert "VAE: tiny-vae.safetensors" in images.format_parameters(by_server)
