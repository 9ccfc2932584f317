"""LoRA merge and unload time on a full-size architecture with random weights.

    python scripts/bench_lora.py --family sd1 --work /tmp/lora-bench [--dtype float16] [--rounds 3] [--json out.json]

Builds the model as scripts/bench_single_file.py does (a diffusers folder and one original-layout file),
writes kohya LoRAs of realistic ranks (default: 32 with LoCon convolution layers, 64 and 128; on the UNet's
attention, feed-forward and projection layers and the text encoders' attention and MLP layers), then in
interleaved rounds times: the single file loaded alone; loaded, then the LoRAs merged; and unloading
them (checked bit for bit against the base weights); and, as the floor of any merge on this machine, the
matrix products of all the pairs alone. Runs with OpenBLAS, as the command line does.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import os  # noqa: E402

from mlx_img2img import blas  # noqa: E402

if blas.applicable() and blas.mlx_uses_reference_blas() and (lib := blas.find_openblas()):
    # OpenBLAS, as the command line has it (it re-executes itself the same way)
    os.execve(sys.executable, [sys.executable, *sys.argv], blas.openblas_environment(dict(os.environ), lib))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_img2img import Img2ImgPipeline  # noqa: E402


def lora_specs(ranks: list[int]) -> list[tuple[str, int, float, bool]]:
    """(file stem, rank, alpha, convolution layers too) per LoRA: the first one a LoCon, alpha rank / 2."""
    stems = [f"{'locon' if i == 0 else 'lora'}{r}" for i, r in enumerate(ranks)]
    stems = [stem if stems.count(stem) == 1 else f"{stem}-{i}" for i, stem in enumerate(stems)]
    return [(stem, r, r / 2, i == 0) for i, (stem, r) in enumerate(zip(stems, ranks, strict=True))]


def write_loras(folder: Path, family: str, work: Path, specs: list[tuple[str, int, float, bool]]) -> list[Path]:
    from tests.test_lora import write_kohya

    prefixes = {"sd1": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
                "sd2": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
                "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}[family]
    paths = []
    for i, (stem, rank, alpha, conv) in enumerate(specs):
        path = work / f"{family}-{stem}.safetensors"
        if not path.exists():
            write_kohya(folder, path, prefixes, seed=100 * i + rank, rank=rank, alpha=alpha,
                        original_unet=family == "sdxl", conv=conv)
        paths.append(path)
    return paths


def _parameters(pipe: Img2ImgPipeline) -> list[mx.array]:
    return [v for m in (pipe.unet, pipe.vae, *pipe.text_encoders) for _, v in tree_flatten(m.parameters())]


def load(file: Path, dtype: str) -> tuple[Img2ImgPipeline, float]:
    start = time.perf_counter()
    pipe = Img2ImgPipeline.from_single_file(file, dtype=dtype)
    mx.eval(_parameters(pipe))
    return pipe, time.perf_counter() - start


def merge(pipe: Img2ImgPipeline, paths: list[Path]) -> tuple[float, float]:
    """Seconds to merge the LoRAs, and the memory it took above the loaded model (GB, at its peak)."""
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    start = time.perf_counter()
    for i, path in enumerate(paths):
        pipe.load_lora_weights(path, scale=0.6 + 0.2 * i)
    pipe.loras.flush()  # what the pipeline does before it encodes a prompt
    mx.eval(_parameters(pipe))
    return time.perf_counter() - start, (mx.get_peak_memory() - before) / 2**30


def products(pipe: Img2ImgPipeline, paths: list[Path]) -> tuple[float, float]:
    """The float32 matrix products of every pair alone (no weight read or written), each dropped once
    computed: the floor of any merge on this machine. Returns (seconds, GFLOP)."""
    from mlx_img2img.loading.lora import match, read_lora

    pairs = [pair for path in paths for layers in match(read_lora(path), pipe._lora_targets()).values()
             for pair in layers.values()]
    mx.eval([a for pair in pairs for a in (pair.up, pair.down)])
    factors = [pair.factors(1.0) for pair in pairs]
    mx.eval(factors)
    start = time.perf_counter()
    for up, down in factors:
        mx.eval(up @ down)
    flops = sum(2 * up.shape[0] * up.shape[1] * down.shape[1] for up, down in factors)
    return time.perf_counter() - start, flops / 1e9


def main() -> None:
    from bench_single_file import build

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", default="32,64,128", help="the LoRAs' ranks (the first one also on convolutions)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    specs = lora_specs([int(r) for r in args.ranks.split(",")])
    args.work.mkdir(parents=True, exist_ok=True)
    folder, file = build(args.family, args.work, args.dtype)
    paths = write_loras(folder, args.family, args.work, specs)
    runs: dict[str, list[float]] = {"load": [], "load_and_merge": [], "merge": [], "unload": [], "products": []}
    gflop, peak_gb = 0.0, 0.0
    layers = 0
    for _ in range(args.rounds):
        pipe, seconds = load(file, args.dtype)
        runs["load"].append(seconds)
        del pipe
        gc.collect()  # the pipeline holds reference cycles: free it before the next one loads
        pipe, seconds = load(file, args.dtype)
        base = _parameters(pipe)  # references, not copies: unloading must give these very arrays back
        merged, peak_gb = merge(pipe, paths)
        runs["merge"].append(merged)
        runs["load_and_merge"].append(seconds + merged)
        layers = sum(len(v) for _, _, m in pipe.loras.applied for v in m.values())
        start = time.perf_counter()
        pipe.unload_lora_weights()
        mx.eval(_parameters(pipe))
        runs["unload"].append(time.perf_counter() - start)
        assert all(b is v or mx.array_equal(b, v).item() for b, v in zip(base, _parameters(pipe), strict=True)), \
            "unload did not give the base weights back exactly"
        seconds, gflop = products(pipe, paths)
        runs["products"].append(seconds)
        del pipe, base
        gc.collect()
    median = {k: statistics.median(v) for k, v in runs.items()}
    result = dict(family=args.family, dtype=args.dtype, blas=blas.loaded_openblas() or "reference",
                  loras=[dict(file=p.name, rank=r, conv=c, bytes=p.stat().st_size)
                         for p, (_, r, _, c) in zip(paths, specs, strict=True)],
                  lora_layers=layers, gflop=gflop, merge_peak_gb=peak_gb, median_s=median,
                  added_s=median["load_and_merge"] - median["load"], runs=runs)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
