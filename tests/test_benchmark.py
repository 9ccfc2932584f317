"""Smoke test of scripts/benchmark.py: our peer on the tiny model, through the script's own main().

No timing is asserted; the machine running the tests may be busy.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_benchmark_ours_on_tiny_model(benchmark, tiny_sd15, tmp_path, strength):
    out = tmp_path / "bench.json"
    steps = 2
    code = benchmark.main(["--model", str(tiny_sd15), "--peers", "ours", "--size", "64",
                           "--steps", str(steps), "--strength", str(strength), "--guidance", "7.5",
                           "--json", str(out), "--bench-dir", str(tmp_path / "bench")])
    report = json.loads(out.read_text())
    ours = report["peers"]["ours"]
    assert code == 0, ours.get("error")

    for key in ("load_s", "encode_prompt_s", "vae_encode_s", "first_step_s", "step_median_s", "vae_decode_s",
                "total_s", "mlx_peak_bytes", "max_rss_bytes", "unet_evals", "unet_call_batches"):
        assert key in ours, key
    assert ours["mlx_peak_bytes"] > 0 and ours["max_rss_bytes"] > 0
    assert ours["latents_finite"] is True
    assert report["config"]["size"] == [64, 64] and report["config"]["dtype"] == "float32"
    assert "openblas_preloaded" in report["environment"]

    # Cost proportional to strength: int(steps * strength) UNet calls, guidance batched into each one.
    assert ours["unet_evals"] == int(steps * strength)
    assert ours["unet_call_batches"] == [2] * int(steps * strength)
    assert len(ours["step_s"]) == int(steps * strength)
    assert report["ratios"] == {}


def test_benchmark_reports_psnr_of_quantized_against_float(benchmark, tiny_sd15, tmp_path):
    out = tmp_path / "bench.json"
    code = benchmark.main(["--model", str(tiny_sd15), "--peers", "ours", "--size", "64", "--steps", "2",
                           "--quantize", "8", "--json", str(out), "--bench-dir", str(tmp_path / "bench")])
    ours = json.loads(out.read_text())["peers"]["ours"]
    assert code == 0, ours.get("error")
    # The same seed with float weights: close (8 bits), but not the identical image.
    assert 20.0 < ours["quantized_psnr_db"] < float("inf")


MLX_EXAMPLES = os.environ.get("MLX_EXAMPLES")


@pytest.mark.skipif(not MLX_EXAMPLES, reason="set MLX_EXAMPLES to a clone of ml-explore/mlx-examples")
def test_benchmark_mlx_examples_peer_on_tiny_model(benchmark, tiny_sd2v, tmp_path):
    """Apple's example, copied out of the clone and run unmodified through its own img2img call."""
    out = tmp_path / "bench.json"
    code = benchmark.main(["--model", str(tiny_sd2v), "--peers", "mlx-examples", "--size", "64",
                           "--steps", "2", "--strength", "0.5", "--mlx-examples", MLX_EXAMPLES,
                           "--json", str(out), "--bench-dir", str(tmp_path / "bench")])
    report = json.loads(out.read_text())
    peer = report["peers"]["mlx-examples"]
    assert code == 0, peer.get("error")
    assert peer["unet_evals"] == 1 and peer["unet_call_batches"] == [2] and peer["latents_finite"] is True
    for key in ("encode_prompt_s", "vae_encode_s", "first_step_s", "vae_decode_s", "total_s"):
        assert peer[key] > 0, key
    assert peer["total_s"] >= peer["encode_prompt_s"] + peer["vae_encode_s"] + peer["vae_decode_s"]
    copy = tmp_path / "bench" / "mlx-examples"
    assert [p.name for p in copy.glob("*/stable_diffusion/__init__.py")] == ["__init__.py"]  # outside the project


def test_gpu_benchmark_dry_run(tiny_sd15, tmp_path, capsys):
    """The GPU script, checked on the CPU: install commands shown, not run; the benchmark per batch; FLOPs."""
    spec = importlib.util.spec_from_file_location("gpu_benchmark_script", SCRIPT.parent / "gpu_benchmark.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    out = tmp_path / "gpu.json"
    assert gpu.main(["--dry-run", "--model", str(tiny_sd15), "--size", "64", "--steps", "2", "--batches", "1,2",
                     "--peers", "ours", "--dtype", "float32", "--json", str(out),
                     "--bench-dir", str(tmp_path / "bench")]) == 0
    printed = capsys.readouterr().out
    assert "pip install mlx[cuda]" in printed
    results = json.loads(out.read_text())
    one, two = results["batches"]["1"], results["batches"]["2"]
    assert two["unet_tflop"] == pytest.approx(2 * one["unet_tflop"]) and one["unet_tflop"] > 0
    for entry, batch in ((one, 1), (two, 2)):
        (row,) = entry["rows"]
        assert row["error"] is None and row["step_s"] > 0 and row["tflops"] > 0
        assert sum(row["unet_call_batches"]) == 2 * batch
    assert gpu.float16_peak("NVIDIA H100 80GB HBM3") == 989.0 and gpu.float16_peak("NVIDIA H100 PCIe") == 756.0
