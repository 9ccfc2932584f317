"""The samplers against diffusers' schedulers as the oracle, run as StableDiffusionImg2ImgPipeline runs them.

Both sides denoise the same noised latents with the same synthetic "model" (a function of its input and
timestep); ours works on NHWC arrays, the oracle on NCHW tensors. Every model input, every timestep and
the final latents must agree.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from mlx_img2img.schedulers import SCHEDULERS, make_scheduler  # noqa: E402

# LCM has its own img2img semantics; it is checked end to end against LatentConsistencyModelImg2ImgPipeline
# in test_pipeline.py.
SAMPLERS = tuple(name for name in SCHEDULERS if name != "lcm")

# ------------------------------------------------------------------------------------------ configs

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD2_V = {  # stabilityai/stable-diffusion-2-1 (768, v-prediction)
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
TURBO = {  # an SD-Turbo-like config: trailing spacing for 1-4 steps
    "_class_name": "EulerAncestralDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "timestep_spacing": "trailing", "steps_offset": 1, "set_alpha_to_one": False, "skip_prk_steps": True,
    "clip_sample": False, "trained_betas": None,
}
ZERO_SNR = {  # exercises the cosine betas, zero terminal SNR, linspace spacing and DDIM's clip_sample default
    "_class_name": "DDIMScheduler", "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True, "timestep_spacing": "linspace", "set_alpha_to_one": True,
    "skip_prk_steps": True,
}
EULER_KARRAS = {  # Euler's karras / sigma_min / leading options; DPM-Solver gets sigma_min/max as hidden keys
    "_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "beta_end": 0.012, "use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1,
    "final_sigmas_type": "sigma_min", "sigma_min": 0.05, "sigma_max": 12.0, "skip_prk_steps": True,
}
DPM_OPTIONS = {  # DPM-Solver options: heun, second order to the end, sigma_min final, clipped lambdas
    "_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "linear", "solver_type": "heun",
    "lower_order_final": False, "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing",
    "prediction_type": "sample", "skip_prk_steps": True, "lambda_min_clipped": -5.1,
}
KARRAS_SIGMA_MIN = {  # DPM++ 2M karras ending on sigma_min: its last step has zero length
    "_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "beta_end": 0.012, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "steps_offset": 1,
    "timestep_spacing": "leading", "prediction_type": "v_prediction", "skip_prk_steps": True,
}
CONFIGS = {"sd15": SD15, "sd2_v": SD2_V, "turbo": TURBO, "zero_snr": ZERO_SNR,
           "euler_karras": EULER_KARRAS, "dpm_options": DPM_OPTIONS, "karras_sigma_min": KARRAS_SIGMA_MIN}

STEPS = (1, 4, 10, 25)
STRENGTHS = (0.3, 0.5, 0.75, 1.0)
RTOL = 1e-4  # relative to the largest magnitude of the reference array
# At zero terminal SNR the first sigma is 4096 (Euler) or alphas_cumprod[999] ~ 1e-9 (pndm, which has no
# rescaling): diffusers' float32 arithmetic then cancels to ~2e-4 while ours stays within 2e-7 of a float64
# run (test_zero_snr_float64), so the comparison with the oracle is looser there.
RTOL_BY_CONFIG = {"zero_snr": 1e-3}

# ------------------------------------------------------------------------------------------ the two loops

ORACLE = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}
SHAPE = (2, 4, 6, 5)  # NCHW
SEED = 1234


def _unsupported(name: str, config: Mapping[str, Any]) -> bool:
    """Combinations diffusers itself refuses or turns into NaN (ours is a superset there)."""
    if config.get("prediction_type") == "sample" and name in ("euler_a", "pndm"):
        return True  # NotImplementedError / ValueError in diffusers
    # heun's (exp(-h) - 1) / h is 0/0 on the zero-length last step karras + sigma_min gives
    return name == "dpmpp_2m_karras" and config.get("solver_type") == "heun"


def _fixed_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=g) * 0.8
    noise = torch.randn(SHAPE, generator=g)
    direction = torch.randn(SHAPE, generator=g)
    return x0, noise, direction


def _model_scale(t: float) -> float:
    return math.cos(t / 170.0) + 0.1 * math.sin(t / 13.0)


def _nhwc(t: torch.Tensor, dtype: mx.Dtype = mx.float32) -> mx.array:
    return mx.array(t.permute(0, 2, 3, 1).double().numpy(), dtype=dtype)


def _nchw(x: mx.array) -> np.ndarray:
    return np.array(x).transpose(0, 3, 1, 2)


def run_oracle(name: str, config: Mapping[str, Any], steps: int, strength: float):
    class_name, overrides = ORACLE[name]
    scheduler = getattr(diffusers, class_name).from_config(config, **overrides)
    scheduler.set_timesteps(steps)
    # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents + the denoising loop
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    x0, noise, direction = _fixed_tensors()
    x = scheduler.add_noise(x0, noise, timesteps[:1])
    kwargs = {"generator": torch.Generator().manual_seed(SEED)} if name == "euler_a" else {}
    seen_t, inputs = [], []
    for t in timesteps:
        model_in = scheduler.scale_model_input(x, t)
        seen_t.append(float(t))
        inputs.append(model_in.numpy().copy())
        out = 0.3 * model_in + _model_scale(float(t)) * direction
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return np.array(seen_t), inputs, x.numpy()


def run_ours(name: str, config: Mapping[str, Any], steps: int, strength: float, dtype: mx.Dtype = mx.float32):
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(steps)
    start = scheduler.img2img_start(steps, strength)
    x0, noise, direction = (_nhwc(a, dtype) for a in _fixed_tensors())
    generator = torch.Generator().manual_seed(SEED)  # draws what diffusers' euler_a step draws, in order
    x = scheduler.add_noise(x0, noise, start)
    seen_t, inputs = [], []
    for i in range(start, len(scheduler.timesteps)):
        t = float(scheduler.timesteps[i])
        model_in = scheduler.scale_model_input(x, i)
        seen_t.append(t)
        inputs.append(_nchw(model_in))
        out = 0.3 * model_in + _model_scale(t) * direction
        step_noise = _nhwc(torch.randn(SHAPE, generator=generator), dtype) if scheduler.stochastic else None
        x = scheduler.step(out, i, x, step_noise)
    return np.array(seen_t), inputs, _nchw(x)


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def compare(name: str, config: Mapping[str, Any], steps: int, strength: float, rtol: float = RTOL) -> float:
    """Run both; assert the timesteps, every model input and the result agree; return the worst error."""
    ref_t, ref_inputs, ref_x = run_oracle(name, config, steps, strength)
    our_t, our_inputs, our_x = run_ours(name, config, steps, strength)
    where = f"{name} steps={steps} strength={strength}"
    np.testing.assert_allclose(our_t, ref_t, rtol=1e-6, atol=1e-4, err_msg=where)
    assert len(our_inputs) == len(ref_inputs), where
    errors = [_rel(a, b) for a, b in zip(our_inputs, ref_inputs, strict=True)] + [_rel(our_x, ref_x)]
    assert np.isfinite(ref_x).all(), where
    assert max(errors) < rtol, f"{where}: relative errors per step {errors}"
    return max(errors)


# ------------------------------------------------------------------------------------------ parity


# Every sampler on every config, except the combinations diffusers itself refuses (no oracle there).
COMPARABLE = [(c, n) for c in CONFIGS for n in SAMPLERS if not _unsupported(n, CONFIGS[c])]


@pytest.mark.parametrize("config_name,name", COMPARABLE)
def test_matches_diffusers(config_name: str, name: str) -> None:
    config = CONFIGS[config_name]
    runs = 0
    for steps in STEPS:
        for strength in STRENGTHS:
            if int(steps * strength) == 0:
                continue
            compare(name, config, steps, strength, RTOL_BY_CONFIG.get(config_name, RTOL))
            runs += 1
    assert runs == 13  # one step runs only at strength 1


@pytest.mark.parametrize("name", SAMPLERS)
def test_zero_snr_float64(name: str) -> None:
    """Where the oracle is loose (see RTOL_BY_CONFIG) ours in float32 still tracks float64 arithmetic."""
    _, _, ours32 = run_ours(name, ZERO_SNR, 4, 1.0)
    _, _, ours64 = run_ours(name, ZERO_SNR, 4, 1.0, mx.float64)
    assert _rel(ours32, ours64) < 2e-6


@pytest.mark.parametrize("name", ["euler", "euler_a", "ddim", "dpmpp_2m"])
def test_live_config_with_use_default_values(name: str) -> None:
    """A diffusers scheduler's own .config lists the defaults it filled in; those count as unset."""
    live = diffusers.PNDMScheduler.from_config(SD15).config
    assert "timestep_spacing" in live["_use_default_values"]
    compare(name, live, 10, 0.6)
    assert make_scheduler(name, live).config["timestep_spacing"] == make_scheduler(name, SD15).config[
        "timestep_spacing"]


def test_schedule_tables_match() -> None:
    for config in CONFIGS.values():
        ours = make_scheduler("euler", config)
        ref = diffusers.EulerDiscreteScheduler.from_config(config)
        np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-6)


def test_pndm_repeats_its_second_timestep() -> None:
    pndm = make_scheduler("pndm", SD15)
    pndm.set_timesteps(10)
    assert pndm.timesteps.tolist() == [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    pndm.set_timesteps(1)
    assert pndm.timesteps.tolist() == [1]


def test_dtype_and_layout_are_kept() -> None:
    for name in SAMPLERS:
        scheduler = make_scheduler(name, SD15)
        start = scheduler.img2img_start(4, 1.0)
        x = mx.ones((1, 3, 5, 4), dtype=mx.float16)
        noise = mx.zeros_like(x)
        assert scheduler.add_noise(x, noise, start).dtype == mx.float16
        assert scheduler.scale_model_input(x, start).dtype == mx.float16
        out = scheduler.step(x * 0.1, start, x, noise if scheduler.stochastic else None)
        assert out.dtype == mx.float16 and out.shape == x.shape


def test_euler_a_needs_noise() -> None:
    scheduler = make_scheduler("euler_a", SD15)
    assert scheduler.stochastic
    assert not any(make_scheduler(n, SD15).stochastic for n in SAMPLERS if n != "euler_a")
    start = scheduler.img2img_start(4, 0.5)
    with pytest.raises(ValueError, match="noise"):
        scheduler.step(mx.zeros((1, 2, 2, 4)), start, mx.zeros((1, 2, 2, 4)))


# ------------------------------------------------------------------------------------------ strength / steps


def _suggestions(message: str) -> tuple[float, int | None]:
    strength = float(re.search(r"e\.g\. ([0-9.e-]+)\)", message).group(1))
    steps = re.search(r"at least (\d+) steps", message)
    return strength, int(steps.group(1)) if steps else None


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.05), (1, 0.5), (49, 0.02), (3, 0.3), (7, 0.1)])
def test_strength_too_small_names_what_works(steps: int, strength: float) -> None:
    scheduler = make_scheduler("ddim", SD15)
    with pytest.raises(ValueError, match="no denoising step") as caught:
        scheduler.img2img_start(steps, strength)
    message = str(caught.value)
    assert f"1/{steps}" in message and "ceil(1/strength)" in message
    min_strength, min_steps = _suggestions(message)
    assert int(steps * min_strength) >= 1  # the strength it suggests runs a step
    assert min_steps == math.ceil(1 / strength) or int((min_steps - 1) * strength) == 0
    assert int(min_steps * strength) >= 1 and int((min_steps - 1) * strength) == 0
    assert scheduler.img2img_start(min_steps, strength) == min_steps - int(min_steps * strength)
    scheduler.img2img_start(steps, min_strength)


def test_strength_zero_and_out_of_range() -> None:
    scheduler = make_scheduler("euler", SD15)
    with pytest.raises(ValueError, match=r"1/10") as caught:
        scheduler.img2img_start(10, 0.0)
    assert "steps (ceil" not in str(caught.value)  # no step count helps at strength 0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="between 0 and 1"):
            scheduler.img2img_start(10, bad)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)


def test_start_index_is_get_timesteps() -> None:
    for name in SAMPLERS:
        scheduler = make_scheduler(name, SD15)
        assert scheduler.img2img_start(25, 0.75) == 25 - 18
        assert scheduler.img2img_start(10, 1.0) == 0
        assert scheduler.img2img_start(4, 0.3) == 3


# ------------------------------------------------------------------------------------------ make_scheduler


@pytest.mark.parametrize(("class_name", "extra", "expected"), [
    ("PNDMScheduler", {}, "pndm"),
    ("DDIMScheduler", {}, "ddim"),
    ("EulerDiscreteScheduler", {}, "euler"),
    ("EulerAncestralDiscreteScheduler", {}, "euler_a"),
    ("DPMSolverMultistepScheduler", {}, "dpmpp_2m"),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "dpmpp_2m_karras"),
])
def test_make_scheduler_picks_the_checkpoints_own(class_name: str, extra: dict, expected: str) -> None:
    scheduler = make_scheduler(None, {**SD15, "_class_name": class_name, **extra})
    assert scheduler.name == expected
    assert scheduler.prediction_type == "epsilon"
    assert make_scheduler(None, SD2_V).prediction_type == "v_prediction"


@pytest.mark.parametrize("class_name", ["LMSDiscreteScheduler", "UniPCMultistepScheduler", None])
def test_make_scheduler_falls_back_with_a_warning(class_name: str | None,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    config = {k: v for k, v in SD15.items() if k != "_class_name"}
    if class_name:
        config["_class_name"] = class_name
    with caplog.at_level(logging.WARNING, logger="mlx_img2img.schedulers"):
        scheduler = make_scheduler(None, config)
    assert scheduler.name == "euler"
    assert "not supported" in caplog.text and "euler" in caplog.text


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as caught:
        make_scheduler("lms", SD15)
    assert all(name in str(caught.value) for name in SCHEDULERS)


def test_unimplemented_options_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mlx_img2img.schedulers"):
        make_scheduler("pndm", TURBO | {"skip_prk_steps": False})
        make_scheduler("dpmpp_2m", {**SD15, "algorithm_type": "sde-dpmsolver++"})
    assert "skip_prk_steps" in caplog.text and "algorithm_type" in caplog.text
