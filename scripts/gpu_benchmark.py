#!/usr/bin/env python
"""First GPU figures: SD 1.5 architecture, 512x512, 20 steps x strength 0.75, float16, batch 1 and 4.

On a machine with an NVIDIA GPU this installs what it needs (MLX's CUDA build, PyTorch with CUDA,
diffusers, diffuse-mlx; --wheels DIR installs from local wheels where the machine has no network),
builds the SD 1.5 architecture with random weights through scripts/benchmark.py, and runs its peers
(ours on MLX's CUDA backend, diffuse-mlx on the same backend, diffusers on CUDA) at each batch size.
Reported per peer and batch: seconds per UNet step, peak memory, and the achieved TFLOP/s of a step
(the UNet's floating-point operations, counted by PyTorch's FlopCounterMode on the meta device for the
exact config and latent size, guidance's two halves included) against the card's float16 peak.

--dry-run shows the install commands without running them and runs everything else on the CPU at a
small size (--model a small diffusers-layout folder, as the tests do), so the script is checked where
there is no GPU.

Examples:
  python scripts/gpu_benchmark.py                          # on the GPU machine (fits in 10 minutes)
  python scripts/gpu_benchmark.py --wheels /shared/wheels  # offline install
  python scripts/gpu_benchmark.py --dry-run --model tests/tiny --size 64 --steps 2 --batches 1,2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent

# Dense float16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets, by device name.
FLOAT16_PEAK_TFLOPS = {
    "H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
    "L4": 121.0, "A10G": 125.0, "A10": 125.0, "RTX 4090": 165.0, "T4": 65.0,
}

INSTALL = [
    ["pip", "install", "mlx[cuda]"],
    ["pip", "install", "torch", "--index-url", "https://download.pytorch.org/whl/cu126"],
    ["pip", "install", "diffusers", "transformers", "diffuse-mlx", "safetensors", "accelerate"],
]


def float16_peak(device_name: str) -> float | None:
    """The card's dense float16 peak, matched on its name (longest key first: "H100 PCIe" before "H100")."""
    for key in sorted(FLOAT16_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            return FLOAT16_PEAK_TFLOPS[key]
    return None


def unet_flops(folder: Path, width: int, height: int, batch: int, guided: bool = True) -> int:
    """Floating-point operations of one UNet evaluation (both guidance halves), counted on the meta device:
    no memory, no compute, exactly the layers of this config at this latent size."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads((folder / "unet" / "config.json").read_text())
    factor = 2 ** (len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    n = batch * (2 if guided else 1)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        sample = torch.empty(n, config["in_channels"], height // factor, width // factor)
        context = torch.empty(n, 77, config["cross_attention_dim"])
        extra = {}
        if config.get("addition_embed_type") == "text_time":
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            extra["added_cond_kwargs"] = {"text_embeds": torch.empty(n, pooled), "time_ids": torch.empty(n, 6)}
        with FlopCounterMode(display=False) as counter:
            unet(sample, torch.full((n,), 500), context, **extra)
    return int(counter.get_total_flops())


def device_name(dry_run: bool) -> str:
    if dry_run:
        return "CPU (dry run)"
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    raise SystemExit("no CUDA device visible to PyTorch (use --dry-run to check the script on a CPU)")


def install(args: argparse.Namespace) -> None:
    for cmd in INSTALL:
        cmd = [sys.executable, "-m", *cmd]
        if args.wheels:  # offline: the same packages from local wheels
            cmd = [c for c in cmd if not c.startswith("--index-url") and not c.startswith("https://")]
            cmd += ["--no-index", "--find-links", str(args.wheels)]
        print("+", " ".join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)


def run_benchmark(args: argparse.Namespace, batch: int, out: Path) -> dict:
    cmd = [sys.executable, str(HERE / "benchmark.py"), "--size", str(args.size), "--steps", str(args.steps),
           "--strength", str(args.strength), "--dtype", args.dtype, "--batch", str(batch),
           "--peers", args.peers, "--json", str(out), "--bench-dir", str(args.bench_dir),
           "--timeout", str(args.timeout)]
    cmd += ["--model", str(args.model)] if args.model else ["--arch", "sd15"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=False)
    if not out.exists():
        raise SystemExit(f"the benchmark wrote no report for batch {batch}")
    return json.loads(out.read_text())


def summarise(report: dict, flops: int, peak: float | None) -> list[dict]:
    rows = []
    for name, res in report["peers"].items():
        step = res.get("step_median_s")
        tflops = flops / step / 1e12 if step else None
        memory = res.get("torch_cuda_peak_bytes") or res.get("mlx_peak_bytes")
        rows.append({"peer": name, "error": res.get("error"), "step_s": step, "total_s": res.get("total_s"),
                     "peak_memory_gib": memory / 2**30 if memory else None, "tflops": tflops,
                     "fraction_of_peak": tflops / peak if tflops and peak else None,
                     "unet_call_batches": res.get("unet_call_batches")})
    return rows


def render(results: dict) -> str:
    lines = [f"{results['device']}: {results['config']}; float16 peak "
             f"{results['peak_tflops'] or 'unknown'} TFLOP/s"]
    for batch, entry in results["batches"].items():
        lines.append(f"batch {batch}: one UNet evaluation = {entry['unet_tflop']:.3f} TFLOP")
        for r in entry["rows"]:
            if r["error"]:
                lines.append(f"  {r['peer']:<12} FAILED: {r['error']}")
                continue
            frac = f"{100 * r['fraction_of_peak']:.1f}% of peak" if r["fraction_of_peak"] else "peak unknown"
            mem = f"{r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] else "-"
            lines.append(f"  {r['peer']:<12} {r['step_s']:.3f} s/step  {r['tflops']:.2f} TFLOP/s ({frac})  "
                         f"peak memory {mem}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--dry-run", action="store_true", help="no install, no GPU: check everything else on the CPU")
    p.add_argument("--model", type=Path, help="a diffusers-layout folder instead of the built SD 1.5 architecture")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--strength", type=float, default=0.75)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--batches", default="1,4", help="comma-separated batch sizes (default 1,4)")
    p.add_argument("--peers", default="ours,diffuse-mlx,diffusers")
    p.add_argument("--peak-tflops", type=float, help="the card's float16 peak, where its name is not in the table")
    p.add_argument("--wheels", type=Path, help="install from these local wheels (no network)")
    p.add_argument("--no-install", action="store_true", help="the packages are installed already")
    p.add_argument("--timeout", type=float, default=240, help="seconds allowed per peer and batch (default 240)")
    p.add_argument("--bench-dir", type=Path, default=REPO_ROOT / "bench")
    p.add_argument("--json", type=Path, default=REPO_ROOT / "bench" / "gpu_benchmark.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_install:
        install(args)
    device = device_name(args.dry_run)
    peak = args.peak_tflops or (None if args.dry_run else float16_peak(device))
    results: dict = {"device": device, "peak_tflops": peak, "dry_run": args.dry_run, "batches": {},
                     "config": f"{args.size}x{args.size}, {args.steps} steps x {args.strength}, {args.dtype}"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        report = run_benchmark(args, batch, args.json.with_suffix(f".batch{batch}.json"))
        folder = Path(report["config"]["weights"].removeprefix("random, "))
        flops = unet_flops(folder, args.size, args.size, batch, guided=True)
        results["batches"][batch] = {"unet_tflop": flops / 1e12, "rows": summarise(report, flops, peak)}
    print(render(results))
    args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
