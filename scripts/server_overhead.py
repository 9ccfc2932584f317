"""The server's own cost: a request's wall time minus its generation's, and the preview's cost per step.

    python scripts/server_overhead.py --model PATH [--size 512] [--requests 10] [--memory-jobs 200]
                                      [--interrupts 20]

Runs `mlx-img2img serve`'s application on 127.0.0.1 in this process and posts A1111 img2img requests of
one image (one step) through HTTP; the overhead is the client's wall time minus the worker's time for
the job (base64 and PNG decoding and encoding, JSON, HTTP, queueing). The cheap preview is timed on
latents of the working size. With --memory-jobs N, N jobs run one after another and MLX's active memory
and the process's RSS are printed every N/4 jobs (flat: no leak per job). With --interrupts N, N long jobs
are interrupted in a row at their first step, each answering 200 with its partial image.
"""

from __future__ import annotations

import argparse
import base64
import io
import resource
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import uvicorn
from PIL import Image

from mlx_img2img.server import ServerOptions, build


def _png_base64(size: int) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder or file (a tiny one is fine)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--memory-jobs", type=int, default=0)
    parser.add_argument("--interrupts", type=int, default=0)
    args = parser.parse_args()

    import mlx.core as mx

    from mlx_img2img.preview import cheap_factors, cheap_preview

    engine, app = build(ServerOptions(model=args.model))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    body = {"init_images": [_png_base64(args.size)], "prompt": "a photo", "steps": 1, "denoising_strength": 1.0,
            "seed": 1, "width": args.size, "height": args.size, "sampler_name": "Euler"}
    overheads, walls = [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
        for k in range(args.requests + 1):
            start = time.perf_counter()
            response = http.post("/sdapi/v1/img2img", json=body)
            wall = time.perf_counter() - start
            response.raise_for_status()
            job = engine.job(_last_job(engine))
            if k:  # the first one warms up
                overheads.append(wall - (job.finished - job.started))
                walls.append(wall)
        print(f"{args.size}x{args.size}: request wall {statistics.median(walls) * 1000:.1f} ms, overhead (wall - "
              f"generation) median {statistics.median(overheads) * 1000:.1f} ms, max {max(overheads) * 1000:.1f} ms "
              f"over {len(overheads)} requests; body {len(response.content) / 1e6:.2f} MB answer")

        latents = mx.random.normal((1, args.size // 8, args.size // 8, 4))
        mx.eval(latents)
        factors = cheap_factors(False)
        times = []
        for _ in range(50):
            start = time.perf_counter()
            cheap_preview(latents, factors)
            times.append(time.perf_counter() - start)
        print(f"cheap preview of {args.size // 8}x{args.size // 8} latents: median "
              f"{statistics.median(times) * 1000:.2f} ms per step")
        print(f"taesd preview (full-size TAESD, random weights) to {args.size}x{args.size}: median "
              f"{_taesd_seconds(latents) * 1000:.1f} ms per step")

        if args.memory_jobs:
            small = {**body, "init_images": [_png_base64(64)], "width": 64, "height": 64}
            for k in range(1, args.memory_jobs + 1):
                http.post("/sdapi/v1/img2img", json={**small, "seed": k, "prompt": f"job {k}"}).raise_for_status()
                if k % max(1, args.memory_jobs // 4) == 0:
                    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                    print(f"after {k} jobs: MLX active {mx.get_active_memory() / 2**20:.1f} MiB, "
                          f"max RSS {rss:.0f} MiB")
        if args.interrupts:
            small = {**body, "init_images": [_png_base64(64)], "width": 64, "height": 64, "steps": 400}
            ok = 0
            for k in range(args.interrupts):
                with ThreadPoolExecutor(1) as pool:
                    answer = pool.submit(http.post, "/sdapi/v1/img2img", json={**small, "seed": k})
                    while http.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
                        time.sleep(0.01)
                    http.post("/sdapi/v1/interrupt")
                    response = answer.result()
                ok += response.status_code == 200 and len(response.json()["images"]) == 1
            health = http.get("/v1/health").json()["status"]
            print(f"{args.interrupts} interrupts in a row: {ok} answered 200 with their partial image; health {health}")
    server.should_exit = True
    thread.join()
    engine.shutdown()


def _taesd_seconds(latents: object, repeat: int = 5) -> float:
    """The tiny decoder's time per preview, at TAESD's own size (64 channels, 3/3/3/1 blocks)."""
    import mlx.core as mx

    from mlx_img2img.models.taesd import TinyAutoencoderConfig, TinyDecoder
    from mlx_img2img.preview import taesd_preview

    decoder = TinyDecoder(TinyAutoencoderConfig())
    mx.eval(decoder.parameters())
    taesd_preview(latents, decoder)  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        taesd_preview(latents, decoder)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _last_job(engine: object) -> str:
    return next(reversed(engine._jobs))  # the newest job: requests run one after another here


if __name__ == "__main__":
    main()
