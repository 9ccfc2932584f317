"""What an inpainting step costs next to an img2img step, through the same pipe(...) call users run.

    python scripts/bench_inpaint.py MODEL [--size 256] [--steps 10] [--rounds 3]

Runs img2img and inpainting (a box mask, and an all-white one) on the same image, interleaved, and prints
the fastest and the median time of a denoising step (from the step events) and the median of the whole
call for each; on a busy machine the fastest step is the steadier figure. A 9-channel inpainting model
always takes the mask channels: its "img2img" is a white-mask run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from PIL import Image, ImageDraw

import mlx_img2img  # noqa: F401  (before mlx: OpenBLAS on Linux)
from mlx_img2img import Img2ImgPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pipe = Img2ImgPipeline.from_pretrained(args.model)
    s = args.size
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8))
    mask = Image.new("L", (s, s), 0)
    ImageDraw.Draw(mask).rectangle([s // 4, s // 4, 3 * s // 4, 3 * s // 4], fill=255)
    kinds = {"img2img": {}, "inpaint (box mask)": dict(mask_image=mask),
             "inpaint, keep_unmasked, blur 4": dict(mask_image=mask, keep_unmasked=True, mask_blur=4)}
    steps: dict[str, list[float]] = {k: [] for k in kinds}
    calls: dict[str, list[float]] = {k: [] for k in kinds}
    for round_ in range(args.rounds + 1):  # the first round warms up
        for kind, extra in kinds.items():
            marks: list[float] = []
            start = time.perf_counter()
            pipe(prompt="a house", image=image, strength=1.0, num_inference_steps=args.steps, seed=0,
                 scheduler="euler", on_step=lambda e, m=marks: m.append(time.perf_counter()), **extra)
            if round_:
                steps[kind] += list(np.diff(marks))
                calls[kind].append(time.perf_counter() - start)
    base, least = statistics.median(steps["img2img"]), min(steps["img2img"])
    print(f"{pipe.model_name}, {s}x{s}, {args.steps} steps, UNet in_channels {pipe.unet.config.in_channels}")
    for kind in kinds:
        step, fastest = statistics.median(steps[kind]), min(steps[kind])
        print(f"  {kind:32s} step: fastest {fastest * 1000:7.1f} ms ({fastest / least - 1:+.1%}), median "
              f"{step * 1000:7.1f} ms ({step / base - 1:+.1%}); call {statistics.median(calls[kind]):6.2f} s")


if __name__ == "__main__":
    main()
