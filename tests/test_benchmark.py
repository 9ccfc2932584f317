"""Smoke test of scripts/benchmark.py: our peer on the tiny model, through the script's own main().

No timing is asserted; the machine running the tests may be busy.
"""

from __future__ import annotations

import importlib.util
import json
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
