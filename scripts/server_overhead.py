"""The server's own cost: a request's wall time minus its generation's, and the previews' cost per step.

    python scripts/server_overhead.py --model PATH [--size 512] [--rounds 3] [--requests 5]
                                      [--memory-jobs 200] [--interrupts 20]
    python scripts/server_overhead.py --preview-cost [--size 256] [--repeats 3]

The first form starts `mlx-img2img serve -m PATH` in its own process (as a client meets it: OpenBLAS
preloaded by the command itself) and posts AUTOMATIC1111 img2img requests of one image and one step, the
body encoded once beforehand. The overhead is the client's wall time minus the generation's, which the
answer's Server-Timing header gives with the server's other parts (reading the body, decoding the images,
queueing, encoding the answer). Any model works; the tiny test model's attention at full resolution makes a
512-pixel request take minutes on a CPU, so the README's figures use tests/tiny_models.py's "sd15" variant
with DownBlock2D/UpBlock2D at full resolution, one layer per block and no VAE mid-block attention (seconds
per request; the overhead does not depend on the model). Requests are split into rounds, and the medians
are given per round and over all, with the load average before each round (the machine may be shared).
With --memory-jobs N, N small jobs run one after another and the server's resident memory is printed every
N/4 jobs; with --interrupts N, N long jobs are interrupted in a row at their first step, each answering 200.

The second form times, in this process, a guided step of the full-size SD 1.5 UNet (random weights: the
architecture is what counts) against the cheap and the TAESD preview of its latents, interleaved, in wall
and CPU time, and the share of the time TAESD takes when paced (preview.Pacer) over a 30-step run.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def _png_base64(size: int) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timing(header: str) -> dict[str, float]:
    """Server-Timing ("name;dur=12.3, ...") in seconds."""
    parts = (item.strip().split(";dur=") for item in header.split(",") if ";dur=" in item)
    return {name: float(ms) / 1000 for name, ms in parts}


def _rss_mib(pid: int) -> tuple[float, float]:
    """The process's resident memory and its peak (MiB), from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def serve_overhead(args: argparse.Namespace) -> None:
    port = _free_port()
    command = [sys.executable, "-m", "mlx_img2img", "serve", "-m", args.model, "--port", str(port), "-q"]
    server = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=3600) as http:
            deadline = time.monotonic() + 300
            while True:
                try:
                    http.get("/v1/health")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.2)
            _overhead_rounds(http, args)
            if args.memory_jobs:
                _memory(http, server.pid, args.memory_jobs)
            if args.interrupts:
                _interrupts(http, args.interrupts)
    finally:
        server.terminate()
        server.wait(60)


def _body(size: int, **extra: object) -> bytes:
    body = {"init_images": [_png_base64(size)], "prompt": "a photo", "steps": 1, "denoising_strength": 1.0,
            "seed": 1, "width": size, "height": size, "sampler_name": "Euler", **extra}
    return json.dumps(body).encode()


def _overhead_rounds(http: httpx.Client, args: argparse.Namespace) -> None:
    content = _body(args.size)
    headers = {"content-type": "application/json"}
    http.post("/sdapi/v1/img2img", content=content, headers=headers).raise_for_status()  # warm-up
    overheads, parts = [], []
    for k in range(1, args.rounds + 1):
        load = os.getloadavg()[0]
        round_overheads = []
        for _ in range(args.requests):
            start = time.perf_counter()
            response = http.post("/sdapi/v1/img2img", content=content, headers=headers)
            wall = time.perf_counter() - start
            response.raise_for_status()
            timing = _timing(response.headers["server-timing"])
            round_overheads.append(wall - timing["generation"])
            parts.append(timing)
        overheads += round_overheads
        print(f"round {k} (load {load:.1f}): overhead median {statistics.median(round_overheads) * 1000:.1f} ms, "
              f"min {min(round_overheads) * 1000:.1f}, max {max(round_overheads) * 1000:.1f} over "
              f"{len(round_overheads)} requests")
    inside = {name: statistics.median(p[name] for p in parts) * 1000 for name in parts[0] if name != "generation"}
    print(f"{args.size}x{args.size}: overhead (wall - generation) median {statistics.median(overheads) * 1000:.1f} ms "
          f"over {len(overheads)} requests; body {len(content) / 1e6:.2f} MB, answer {len(response.content) / 1e6:.2f} "
          f"MB; server parts (medians, ms): " + ", ".join(f"{n} {v:.1f}" for n, v in inside.items()))


def _memory(http: httpx.Client, pid: int, jobs: int) -> None:
    for k in range(1, jobs + 1):
        content = _body(64, seed=k, prompt=f"job {k}")
        http.post("/sdapi/v1/img2img", content=content, headers={"content-type": "application/json"}).raise_for_status()
        if k % max(1, jobs // 4) == 0:
            rss, peak = _rss_mib(pid)
            print(f"after {k} jobs: server RSS {rss:.0f} MiB, peak {peak:.0f} MiB")


def _interrupts(http: httpx.Client, count: int) -> None:
    ok = 0
    for k in range(count):
        content = _body(64, seed=k, steps=400)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(http.post, "/sdapi/v1/img2img", content=content,
                                 headers={"content-type": "application/json"})
            while http.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()["state"][
                    "sampling_step"] < 1:
                time.sleep(0.01)
            http.post("/sdapi/v1/interrupt")
            response = answer.result()
        ok += response.status_code == 200 and len(response.json()["images"]) == 1
    health = http.get("/v1/health").json()["status"]
    print(f"{count} interrupts in a row: {ok} answered 200 with their partial image; health {health}")


def preview_cost(args: argparse.Namespace) -> None:
    from mlx_img2img import blas

    blas.load_before_mlx()  # before MLX: OpenBLAS, as the command line has it
    import mlx.core as mx

    from mlx_img2img.models.taesd import TinyAutoencoderConfig, TinyDecoder
    from mlx_img2img.models.unet import UNet2DConditionModel, UNetConfig
    from mlx_img2img.parallel import map_batch
    from mlx_img2img.preview import PREVIEW_BUDGET, cheap_factors, cheap_preview, taesd_preview

    unet = UNet2DConditionModel(UNetConfig())  # diffusers' defaults are SD 1.5's
    decoder = TinyDecoder(TinyAutoencoderConfig())  # TAESD's own size
    mx.eval(unet.parameters(), decoder.parameters())
    side = args.size // 8
    x = mx.random.normal((1, side, side, 4))
    context = mx.random.normal((2, 77, 768))
    t = mx.array([500.0])
    factors = cheap_factors(False)

    def step() -> None:
        mx.eval(map_batch(unet, 2, mx.concatenate([x, x]), t, context, None, None, None))

    cases = {"UNet step (guided)": step, "cheap preview": lambda: cheap_preview(x, factors),
             "TAESD preview": lambda: taesd_preview(x, decoder)}

    def timed(fn) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - start, time.process_time() - cpu

    for fn in cases.values():
        fn()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so that a busy machine slows every case alike
        for name, fn in cases.items():
            times[name].append(timed(fn))
    best = {name: tuple(min(t[i] for t in ts) for i in (0, 1)) for name, ts in times.items()}
    unet_wall, unet_cpu = best["UNet step (guided)"]
    print(f"load {os.getloadavg()[0]:.1f}; {args.size}x{args.size} (latents {side}x{side}), best of {args.repeats}:")
    for name, (wall, cpu) in best.items():
        print(f"  {name}: {wall * 1000:.1f} ms wall ({wall / unet_wall:.2%} of a step), {cpu * 1000:.1f} ms CPU "
              f"({cpu / unet_cpu:.2%})")
    taesd = best["TAESD preview"][1]
    shown = _paced(30, unet_cpu, taesd, PREVIEW_BUDGET)
    print(f"  TAESD paced (budget {PREVIEW_BUDGET:.0%}) over 30 steps, CPU times: {shown} previews, "
          f"{shown * taesd / (30 * unet_cpu + shown * taesd):.2%} of the time")


def _paced(steps: int, step: float, preview: float, budget: float) -> int:
    """How many previews preview.Pacer makes over `steps` steps of these costs (its rule, on these times)."""
    elapsed = spent = 0.0
    made = 0
    for _ in range(steps):
        elapsed += step
        if spent <= budget * elapsed:
            spent += preview
            elapsed += preview
            made += 1
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder or file (a tiny one is fine)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=5, help="per round")
    parser.add_argument("--memory-jobs", type=int, default=0)
    parser.add_argument("--interrupts", type=int, default=0)
    parser.add_argument("--preview-cost", action="store_true", help="time the previews against a UNet step")
    parser.add_argument("--repeats", type=int, default=3, help="with --preview-cost")
    args = parser.parse_args()
    if args.preview_cost:
        preview_cost(args)
    elif args.model:
        serve_overhead(args)
    else:
        parser.error("give --model, or --preview-cost")


if __name__ == "__main__":
    main()
