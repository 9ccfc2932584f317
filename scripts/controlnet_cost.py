"""The cost of ControlNet: one guided denoising step of the full-size SD 1.5 UNet with 0, 1 and 2 ControlNets
(random weights, the architecture is what counts), through the pipeline's own prediction and ControlNet hook.

    LD_PRELOAD=libopenblas.so.0 python scripts/controlnet_cost.py --size 256 --repeats 3   (Linux)
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import mlx.core as mx

from mlx_img2img.conditioning import Conditioning
from mlx_img2img.control import Control, ControlNetHook
from mlx_img2img.events import StepContext
from mlx_img2img.models.controlnet import ControlNetConfig, ControlNetModel
from mlx_img2img.models.unet import UNet2DConditionModel, UNetConfig
from mlx_img2img.parallel import map_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents: size / 8)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    unet = UNet2DConditionModel(UNetConfig())  # diffusers' defaults are SD 1.5's
    nets = [ControlNetModel(ControlNetConfig()) for _ in range(2)]
    mx.eval(unet.parameters(), [n.parameters() for n in nets])
    side = args.size // 8
    x = mx.random.normal((1, side, side, 4))
    cond = Conditioning(context=mx.random.normal((2, 77, 768)), guided=True)
    image = mx.random.uniform(shape=(1, args.size, args.size, 3))
    sampler = SimpleNamespace(timesteps=[500.0])
    step = StepContext(index=0, sampler=sampler, last=False)
    t = mx.array([500.0])

    # One hook per case for the whole run, as a generation has: the control images' embeddings are computed
    # at the first (warm-up) step and re-used, so the timed steps are the ones every later step costs.
    hooks = {n: ControlNetHook([Control(net, image) for net in nets[:n]], cond, 0, 1) for n in range(3)}

    context = map_batch(unet.project_context, 2, cond.context)  # once per run, as the pipeline's loop does
    mx.eval(context)

    def run(n: int) -> tuple[float, float]:
        """Wall and CPU seconds of one step (CPU time: this process's threads, steadier on a busy machine)."""
        hook = hooks[n]
        start, cpu = time.perf_counter(), time.process_time()
        extras = hook.unet_extras(x, step)
        x2 = mx.concatenate([x, x], axis=0)
        out = map_batch(unet, 2, x2, t, context, None, None, None, **extras)
        mx.eval(out)
        return time.perf_counter() - start, time.process_time() - cpu

    run(0), run(1), run(2)  # warm-up (and the embeddings)
    times: dict[int, list[tuple[float, float]]] = {0: [], 1: [], 2: []}
    for _ in range(args.repeats):  # interleaved, so that a busy machine slows every case alike
        for n in times:
            times[n].append(run(n))
    wall0, cpu0 = (min(t[i] for t in times[0]) for i in (0, 1))
    for n, ts in times.items():
        wall, cpu = (min(t[i] for t in ts) for i in (0, 1))
        # Each round's ratio to the same round's plain step, then their median: steadier than the best of
        # each case alone when the machine's load changes between rounds.
        rounds = [statistics.median(a[i] / b[i] for a, b in zip(ts, times[0], strict=True)) for i in (0, 1)]
        print(f"{n} ControlNet(s), guided step at {args.size}x{args.size}: best {wall:.2f} s wall ({wall / wall0:.2f}x "
              f"the plain step), {cpu:.2f} s CPU ({cpu / cpu0:.2f}x); median per round {rounds[0]:.2f}x wall, "
              f"{rounds[1]:.2f}x CPU")

if __name__ == "__main__":
    main()
