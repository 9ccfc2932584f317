"""Samplers over one noise schedule, reading diffusers' scheduler_config.json.

INTERFACE (the pipeline depends on exactly this):

    make_scheduler(name: str | None, config: dict) -> Scheduler
        name: "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "pndm" or None
        (None: the checkpoint's own scheduler, from config["_class_name"], where supported).
    SCHEDULERS: tuple of the names above; SAMPLERS: the table (name, class, diffusers class, A1111 label).

    class Scheduler:
        name: str
        stochastic: bool            # step() needs fresh standard-normal noise (euler_a)
        prediction_type: str        # "epsilon" | "v_prediction" (| "sample")
        timesteps: np.ndarray       # after set_timesteps: one UNet timestep per model evaluation
        def set_timesteps(self, num_inference_steps: int) -> None   # also resets multistep state
        def img2img_start(self, num_inference_steps: int, strength: float) -> int
            # index into self.timesteps where img2img begins (diffusers' t_start * order);
            # ValueError naming a strength / step count that works when no step would run
        def add_noise(self, x0: mx.array, noise: mx.array, index: int) -> mx.array
        def scale_model_input(self, x: mx.array, index: int) -> mx.array
        def step(self, model_output: mx.array, index: int, x: mx.array,
                 noise: mx.array | None = None) -> mx.array

Each sampler reproduces the diffusers class of the same name (as `Class.from_config(config)` builds it):

    "ddim"             DDIMScheduler (eta = 0)
    "pndm"             PNDMScheduler with skip_prk_steps=True (PLMS only, as the SD configs set it)
    "euler"            EulerDiscreteScheduler (s_churn = 0)
    "euler_a"          EulerAncestralDiscreteScheduler; step() takes the noise diffusers would draw
    "dpmpp_2m"         DPMSolverMultistepScheduler, algorithm_type="dpmsolver++", solver_order=2
    "dpmpp_2m_karras"  the same with use_karras_sigmas=True

Config fields are read the way `from_config` reads them: a field the diffusers class does not take is
ignored, a missing one takes that class's default (so an SD 1.5 PNDM config switched to "euler" gets
Euler's "linspace" spacing), and the keys listed in a live config's "_use_default_values" count as missing.
Options that change the result but are not implemented here (thresholding, PRK steps, exponential / beta
/ Lu sigmas, other DPM-Solver variants) are logged and replaced by the value in the table above.

Schedules follow diffusers' dtypes: alphas_cumprod and sigmas are float32 tables, timesteps are int64 (ddim,
pndm, dpm) or float32 (euler family; karras gives fractional ones). Step coefficients are computed in
float64 on the host from those tables; the arrays are updated elementwise in MLX, in the dtype of `x`, so
any layout (NCHW or NHWC) works. Latents are never read back to the host.

Img2img: `img2img_start` follows StableDiffusionImg2ImgPipeline.get_timesteps: init = min(int(steps *
strength), steps), t_start = steps - init, and every diffusers class here has order 1, so the loop runs
indices t_start .. len(timesteps) - 1. The index also plays the part of diffusers' `set_begin_index`: the
sigma samplers noise the image with the sigma at that index, ddim and pndm with alphas_cumprod[timestep].
Multistep state (pndm's history, DPM-Solver's previous prediction) starts empty there, as in diffusers,
so DPM-Solver's first img2img step is first order and pndm's counter starts at 0 mid-schedule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from . import checks
from .configs import Count, check_fields, source_of
from .errors import ModelFormatError

logger = logging.getLogger(__name__)

# The sampler used for a checkpoint whose own scheduler class is not implemented here: deterministic,
# first order, and correct for every prediction type and timestep spacing.
FALLBACK_SCHEDULER = "euler"

_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Fields every diffusers noise scheduler here takes, with its defaults (subclasses override some).
_COMMON_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}


# ----------------------------------------------------------------------------------------- schedule tables


# The kind of value each field takes where its default does not tell (see _field_kinds).
_FIELD_KINDS: dict[str, Any] = {"num_train_timesteps": Count, "trained_betas": list[float] | None,
                                "sigma_min": float | None, "sigma_max": float | None, "variance_type": str | None,
                                "_use_default_values": list[str] | None}


def _field_kinds(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """What each field takes: as _FIELD_KINDS says, else the type of its default (a float also takes an int)."""
    return {"_use_default_values": _FIELD_KINDS["_use_default_values"],
            **{key: _FIELD_KINDS.get(key, Any if default is None else type(default))
               for key, default in defaults.items()}}


def _read_config(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of `defaults` taken from `config` where it sets them, as diffusers' from_config does; each
    checked (a ModelFormatError naming the file and the field)."""
    if not isinstance(config, Mapping):
        raise ModelFormatError(f"{source_of(config, 'the scheduler config')}: expected a JSON object {{...}}")
    check_fields(config, _field_kinds(defaults), source_of(config, "the scheduler config"))
    unset = set(config.get("_use_default_values") or ())
    return {key: config[key] if key in config and key not in unset else default
            for key, default in defaults.items()}


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the "squaredcos_cap_v2" (GLIDE cosine) schedule."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, np.float32)


def _cumprod32(alphas: np.ndarray) -> np.ndarray:
    # torch's float32 cumprod accumulates in double: this reproduces it exactly.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, algorithm 1), in float32."""
    root = np.sqrt(_cumprod32(np.float32(1) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_bar = root * root
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def _alphas_cumprod(config: Mapping[str, Any], clamp_terminal: bool) -> np.ndarray:
    """alphas_cumprod as float32, built from the beta fields of a diffusers config."""
    n, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    schedule = config["beta_schedule"]
    if config["trained_betas"] is not None:
        betas = np.asarray(config["trained_betas"], np.float32)
    elif schedule == "linear":
        betas = np.linspace(start, end, n).astype(np.float32)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n).astype(np.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ValueError(f"beta_schedule {schedule!r} is not one of linear, scaled_linear, squaredcos_cap_v2")
    if config.get("rescale_betas_zero_snr"):
        betas = _zero_terminal_snr(betas)
    alphas_cumprod = _cumprod32(np.float32(1) - betas)
    if config.get("rescale_betas_zero_snr") and clamp_terminal:
        alphas_cumprod[-1] = 2.0**-24  # keeps the terminal sigma finite, as diffusers' sigma samplers do
    return alphas_cumprod


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of `sigmas`, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    weight = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - weight) * low + weight * (low + 1)


def _combine(x: mx.array, cx: float, other: mx.array, co: float) -> mx.array:
    """cx * x + co * other with host-side float64 coefficients, in the dtype of x."""
    return (x * float(cx) + other * float(co)).astype(x.dtype)


# ----------------------------------------------------------------------------------------- the base class


class Scheduler:
    """A sampler: the alphas table, the timestep spacings, the img2img slicing and the prediction types."""

    name: str = ""
    stochastic: bool = False
    _defaults: dict[str, Any] = _COMMON_DEFAULTS
    _fixed: dict[str, Any] = {}  # options implemented only at this value (others are logged and replaced)
    _constants: dict[str, Any] = {}  # settings this diffusers class has no field for
    _clamp_terminal: bool = False  # sigma samplers keep alphas_cumprod[-1] > 0 under zero-SNR rescaling

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides: Any) -> None:
        cfg = {**self._constants, **_read_config(config or {}, self._defaults), **overrides}
        for key, value in self._fixed.items():
            if cfg.get(key, value) != value:
                logger.warning("%s: %s=%r is not supported, using %r", self.name, key, cfg[key], value)
            cfg[key] = value
        if cfg["prediction_type"] not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type {cfg['prediction_type']!r} is not one of {_PREDICTION_TYPES}")
        self.config = cfg
        self.prediction_type: str = cfg["prediction_type"]
        self.alphas_cumprod = _alphas_cumprod(cfg, self._clamp_terminal)
        self.num_inference_steps = 0
        self.timesteps: np.ndarray = np.zeros(0, np.int64)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} steps={self.num_inference_steps}>"

    # -- schedule

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Lay out the schedule for this many steps and forget any multistep history."""
        # As many steps as training timesteps would put a "leading" schedule with steps_offset past the
        # last timestep (diffusers then fails with an IndexError) and collapse DPM-Solver's; stop one short.
        limit = self.config["num_train_timesteps"] - 1
        if not 1 <= num_inference_steps <= limit:
            raise ValueError(f"num_inference_steps must be between 1 and {limit}, not {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self._set_schedule(num_inference_steps)
        self._reset()

    def _set_schedule(self, n: int) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        """Forget multistep state (nothing for single-step samplers)."""

    def _spaced_timesteps(self, n: int, integer: bool) -> np.ndarray:
        """Descending timesteps by timestep_spacing; "linspace" is rounded only for `integer` samplers."""
        train, spacing = self.config["num_train_timesteps"], self.config["timestep_spacing"]
        if spacing == "linspace":
            ts = np.linspace(0, train - 1, n)[::-1]
            ts = ts.round() if integer else ts.astype(np.float32)
        elif spacing == "leading":
            ts = (np.arange(n) * (train // n)).round()[::-1] + self.config["steps_offset"]
        elif spacing == "trailing":
            ts = np.arange(train, 0, -train / n).round() - 1
        else:
            raise ValueError(f"timestep_spacing {spacing!r} is not one of linspace, leading, trailing")
        return ts.astype(np.int64 if integer else np.float32)

    def img2img_start(self, num_inference_steps: int, strength: float) -> int:
        """Lay out the schedule and return the index of the first timestep img2img runs from."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, not {strength}")
        self.set_timesteps(num_inference_steps)
        n = num_inference_steps
        init_steps = min(int(n * strength), n)
        if init_steps == 0:
            raise ValueError(_no_step_message(n, strength))
        return n - init_steps  # diffusers' t_start * order; order is 1 for every sampler here

    # -- shared pieces

    def _alpha_bar(self, timestep: int) -> float:
        """alphas_cumprod at a timestep; before timestep 0, 1 or alphas_cumprod[0] (set_alpha_to_one)."""
        if timestep >= 0:
            return float(self.alphas_cumprod[timestep])
        return 1.0 if self.config.get("set_alpha_to_one") else float(self.alphas_cumprod[0])

    def _predictions(self, alpha: float, sigma: float) -> tuple[float, float, float, float]:
        """(px, pm, ex, em): x0 = px*x + pm*out and eps = ex*x + em*out for x = alpha*x0 + sigma*eps."""
        if self.prediction_type == "epsilon":
            return 1 / alpha, -sigma / alpha, 0.0, 1.0
        if self.prediction_type == "v_prediction":
            return alpha, -sigma, sigma, alpha
        return 0.0, 1.0, 1 / sigma, -alpha / sigma  # "sample"

    def add_noise(self, x0: mx.array, noise: mx.array, index: int) -> mx.array:
        """Noise x0 to timesteps[index]: sqrt(a) x0 + sqrt(1 - a) noise with a = alphas_cumprod[t]."""
        alpha_bar = self._alpha_bar(int(self.timesteps[index]))
        return _combine(x0, math.sqrt(alpha_bar), noise, math.sqrt(1 - alpha_bar))

    def scale_model_input(self, x: mx.array, index: int) -> mx.array:
        return x

    def predicted_x0(self, model_output: mx.array, index: int, x: mx.array) -> mx.array:
        """The clean latents the model output at timesteps[index] implies (previews; lazy, so free unless read)."""
        alpha_bar = self._alpha_bar(int(self.timesteps[index]))
        px, pm, _, _ = self._predictions(math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar))
        return _combine(x, px, model_output, pm)

    def step(self, model_output: mx.array, index: int, x: mx.array,
             noise: mx.array | None = None) -> mx.array:
        """x at timesteps[index] -> x at the next timestep (the final one: the clean estimate)."""
        raise NotImplementedError


def _no_step_message(steps: int, strength: float) -> str:
    """Why int(steps * strength) == 0 runs nothing, and the smallest strength / step count that runs one."""
    min_strength = 1 / steps
    while int(steps * min_strength) < 1:  # 1/steps can round below it (49 * (1/49) < 1)
        min_strength = math.nextafter(min_strength, 2.0)
    shown = math.ceil(min_strength * 1e4) / 1e4  # rounded up, so the value shown works too
    text = (f"strength {strength} with {steps} inference steps runs no denoising step "
            f"(int({steps} * {strength}) == 0): use strength >= 1/{steps} (e.g. {shown:g})")
    if strength > 0:
        min_steps = math.ceil(1 / strength)
        while int(min_steps * strength) < 1:
            min_steps += 1
        text += f" or at least {min_steps} steps (ceil(1/strength))"
    return text


# ----------------------------------------------------------------------------------------- alpha samplers


class DDIM(Scheduler):
    """diffusers DDIMScheduler with eta = 0 (deterministic)."""

    name = "ddim"
    _defaults = {**_COMMON_DEFAULTS, "timestep_spacing": "leading", "set_alpha_to_one": True,
                 "clip_sample": True, "clip_sample_range": 1.0, "thresholding": False}
    _fixed = {"thresholding": False}

    def _set_schedule(self, n: int) -> None:
        self.timesteps = self._spaced_timesteps(n, integer=True)

    def step(self, model_output: mx.array, index: int, x: mx.array,
             noise: mx.array | None = None) -> mx.array:
        t = int(self.timesteps[index])
        a_t = self._alpha_bar(t)
        a_prev = self._alpha_bar(t - self.config["num_train_timesteps"] // self.num_inference_steps)
        px, pm, ex, em = self._predictions(math.sqrt(a_t), math.sqrt(1 - a_t))
        to_x0, to_eps = math.sqrt(a_prev), math.sqrt(1 - a_prev)
        if not self.config["clip_sample"]:
            return _combine(x, to_x0 * px + to_eps * ex, model_output, to_x0 * pm + to_eps * em)
        limit = float(self.config["clip_sample_range"])
        x0 = mx.clip(_combine(x, px, model_output, pm), -limit, limit)
        return _combine(x0, to_x0, _combine(x, ex, model_output, em), to_eps)


class PNDM(Scheduler):
    """diffusers PNDMScheduler with skip_prk_steps=True: pseudo linear multistep (PLMS).

    As in diffusers the schedule repeats its second timestep (steps + 1 evaluations; 1 for one step): the
    repeat redoes the first step with the mean of both model outputs. The history counts steps taken since
    set_timesteps, whatever index they start from.
    """

    name = "pndm"
    _defaults = {key: value for key, value in _COMMON_DEFAULTS.items() if key != "rescale_betas_zero_snr"}
    _defaults |= {"timestep_spacing": "leading", "set_alpha_to_one": False, "skip_prk_steps": False}
    _fixed = {"skip_prk_steps": True}

    def _set_schedule(self, n: int) -> None:
        ts = self._spaced_timesteps(n, integer=True)
        self.timesteps = np.insert(ts, 1, ts[1]) if n > 1 else ts

    def _reset(self) -> None:
        self._outputs: list[mx.array] = []  # last model outputs, oldest first
        self._first_x: mx.array | None = None
        self._counter = 0

    def step(self, model_output: mx.array, index: int, x: mx.array,
             noise: mx.array | None = None) -> mx.array:
        ratio = self.config["num_train_timesteps"] // self.num_inference_steps
        t = int(self.timesteps[index])
        t_prev = t - ratio
        if self._counter == 1:  # the repeat: redo the first step, from the first x, with averaged outputs
            t, t_prev = t + ratio, t
        else:
            self._outputs = [*self._outputs[-3:], model_output]
        history = self._outputs
        if self._counter == 0:
            out = model_output
            self._first_x = x
        elif self._counter == 1:
            out = (model_output + history[-1]) / 2
            x, self._first_x = self._first_x, None
        elif len(history) == 2:
            out = (3 * history[-1] - history[-2]) / 2
        elif len(history) == 3:
            out = (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
        else:
            out = (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4]) / 24
        self._counter += 1
        a_t, a_prev = self._alpha_bar(t), self._alpha_bar(t_prev)
        _, _, ex, em = self._predictions(math.sqrt(a_t), math.sqrt(1 - a_t))
        # PNDM's transfer: x_prev = sqrt(a_prev / a_t) x - k eps,
        # k = (a_prev - a_t) / (a_t sqrt(1 - a_prev) + sqrt(a_t (1 - a_t) a_prev))
        k = (a_prev - a_t) / (a_t * math.sqrt(1 - a_prev) + math.sqrt(a_t * (1 - a_t) * a_prev))
        return _combine(x, math.sqrt(a_prev / a_t) - k * ex, out, -k * em)


# ----------------------------------------------------------------------------------------- sigma samplers


class _SigmaScheduler(Scheduler):
    """Samplers on a table of noise levels sigma = sqrt((1 - a) / a), one per timestep plus a final one.

    `_variance_exploding` samplers (the Euler family) keep x = x0 + sigma * noise and scale the model input
    by 1 / sqrt(sigma^2 + 1); the others keep the usual x = alpha x0 + alpha sigma noise.
    """

    _clamp_terminal = True
    _variance_exploding = True

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        a = self.alphas_cumprod
        self.train_sigmas = np.sqrt((np.float32(1) - a) / a).astype(np.float32)  # ascending in t
        self.sigmas: np.ndarray = np.zeros(0, np.float32)

    def _final_sigma(self) -> float:
        kind = self.config["final_sigmas_type"]
        if kind not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', not {kind!r}")
        return float(self.train_sigmas[0]) if kind == "sigma_min" else 0.0

    def _karras_sigmas(self, from_sigmas: np.ndarray, n: int) -> np.ndarray:
        sigma_min, sigma_max = self.config.get("sigma_min"), self.config.get("sigma_max")
        sigma_min = float(from_sigmas[-1]) if sigma_min is None else sigma_min
        sigma_max = float(from_sigmas[0]) if sigma_max is None else sigma_max
        return _karras(sigma_min, sigma_max, n)

    def _alpha_sigma(self, index: int) -> tuple[float, float]:
        """alpha_t and the (variance preserving) sigma_t of the noise level at `index`."""
        sigma = float(self.sigmas[index])
        alpha = 1 / math.sqrt(sigma * sigma + 1)
        return alpha, sigma * alpha

    def add_noise(self, x0: mx.array, noise: mx.array, index: int) -> mx.array:
        if self._variance_exploding:
            return _combine(x0, 1.0, noise, float(self.sigmas[index]))
        alpha, sigma = self._alpha_sigma(index)
        return _combine(x0, alpha, noise, sigma)

    def scale_model_input(self, x: mx.array, index: int) -> mx.array:
        if not self._variance_exploding:
            return x
        return (x * self._alpha_sigma(index)[0]).astype(x.dtype)

    def predicted_x0(self, model_output: mx.array, index: int, x: mx.array) -> mx.array:
        cx, cm = self._x0_coefficients(index)
        return _combine(x, cx, model_output, cm)

    def _x0_coefficients(self, index: int) -> tuple[float, float]:
        """x0 = cx * x + cm * model_output at `index`, for x on this sampler's own scale."""
        alpha, sigma = self._alpha_sigma(index)
        px, pm, _, _ = self._predictions(alpha, sigma)
        return (px * alpha if self._variance_exploding else px), pm


class Euler(_SigmaScheduler):
    """diffusers EulerDiscreteScheduler (no churn): x += (x - x0) / sigma * (sigma_next - sigma)."""

    name = "euler"
    _defaults = {**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "interpolation_type": "linear",
                 "use_karras_sigmas": False, "sigma_min": None, "sigma_max": None,
                 "timestep_type": "discrete", "final_sigmas_type": "zero",
                 "use_exponential_sigmas": False, "use_beta_sigmas": False}
    _fixed = {"use_exponential_sigmas": False, "use_beta_sigmas": False}

    def _set_schedule(self, n: int) -> None:
        timesteps = self._spaced_timesteps(n, integer=False)
        train = self.train_sigmas
        interpolation = self.config["interpolation_type"]
        if interpolation == "linear":
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
        elif interpolation == "log_linear":  # (diffusers keeps n + 1 of these; the extra one is never used)
            sigmas = np.exp(np.linspace(np.log(train[-1]), np.log(train[0]), n + 1))
        else:
            raise ValueError(f"interpolation_type must be 'linear' or 'log_linear', not {interpolation!r}")
        if self.config["use_karras_sigmas"]:
            sigmas = self._karras_sigmas(sigmas, n)
            timesteps = _sigma_to_t(sigmas, np.log(train))
        self.sigmas = np.append(sigmas, self._final_sigma()).astype(np.float32)
        if self.config["timestep_type"] == "continuous" and self.prediction_type == "v_prediction":
            timesteps = 0.25 * np.log(self.sigmas[:-1])
        self.timesteps = timesteps.astype(np.float32)

    def step(self, model_output: mx.array, index: int, x: mx.array,
             noise: mx.array | None = None) -> mx.array:
        sigma = float(self.sigmas[index])
        cx, cm = self._x0_coefficients(index)
        slope = (float(self.sigmas[index + 1]) - sigma) / sigma  # x_next = x + (x - x0) * slope
        return _combine(x, 1 + (1 - cx) * slope, model_output, -cm * slope)


class EulerAncestral(Euler):
    """diffusers EulerAncestralDiscreteScheduler: an Euler step to sigma_down, then noise of sigma_up."""

    name = "euler_a"
    stochastic = True
    _defaults = {**_COMMON_DEFAULTS, "timestep_spacing": "linspace"}
    # Euler's other options are not EulerAncestral's: they keep Euler's defaults whatever the config says.
    _constants = {"interpolation_type": "linear", "use_karras_sigmas": False, "timestep_type": "discrete",
                  "final_sigmas_type": "zero", "sigma_min": None, "sigma_max": None}

    def step(self, model_output: mx.array, index: int, x: mx.array,
             noise: mx.array | None = None) -> mx.array:
        if noise is None:
            raise ValueError("euler_a needs standard-normal noise shaped like x for every step")
        sigma, sigma_to = float(self.sigmas[index]), float(self.sigmas[index + 1])
        sigma_up = math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
        sigma_down = math.sqrt(max(sigma_to**2 - sigma_up**2, 0.0))
        cx, cm = self._x0_coefficients(index)
        slope = (sigma_down - sigma) / sigma
        x_next = _combine(x, 1 + (1 - cx) * slope, model_output, -cm * slope)
        return _combine(x_next, 1.0, noise, sigma_up)


class DPMSolverPP2M(_SigmaScheduler):
    """diffusers DPMSolverMultistepScheduler as DPM-Solver++(2M): data prediction, second order multistep.

    The first step after set_timesteps (so the first img2img step) is first order, having no previous
    prediction; so is the last step when final_sigmas_type is "zero", euler_at_final is set, or
    lower_order_final is set with fewer than 15 timesteps in the whole schedule.
    """

    name = "dpmpp_2m"
    _variance_exploding = False
    _defaults = {**_COMMON_DEFAULTS, "timestep_spacing": "linspace", "solver_order": 2,
                 "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
                 "euler_at_final": False, "use_karras_sigmas": False, "final_sigmas_type": "zero",
                 "lambda_min_clipped": -math.inf, "thresholding": False, "variance_type": None,
                 "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
                 "use_flow_sigmas": False, "use_dynamic_shifting": False,
                 # not DPMSolverMultistepScheduler arguments, but from_config keeps them and karras reads them
                 "sigma_min": None, "sigma_max": None}
    _fixed = {"solver_order": 2, "algorithm_type": "dpmsolver++", "thresholding": False,
              "variance_type": None, "use_exponential_sigmas": False, "use_beta_sigmas": False,
              "use_lu_lambdas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False}

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        if self.config["solver_type"] not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', not {self.config['solver_type']!r}")

    def _set_schedule(self, n: int) -> None:
        train, spacing = self.config["num_train_timesteps"], self.config["timestep_spacing"]
        a = self.alphas_cumprod
        lambdas = np.log(np.sqrt(a)) - np.log(np.sqrt(np.float32(1) - a))  # float32, descending in t
        last = train - int(np.searchsorted(lambdas[::-1], self.config["lambda_min_clipped"]))
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ts = (np.arange(n + 1) * (last // (n + 1))).round()[::-1][:-1] + self.config["steps_offset"]
        elif spacing == "trailing":
            ts = np.arange(last, 0, -train / n).round() - 1
        else:
            raise ValueError(f"timestep_spacing {spacing!r} is not one of linspace, leading, trailing")
        if self.config["use_karras_sigmas"]:
            sigmas = self._karras_sigmas(self.train_sigmas[::-1], n)
            ts = _sigma_to_t(sigmas, np.log(self.train_sigmas))
            if self.config["beta_schedule"] != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(train), self.train_sigmas)
        self.sigmas = np.append(sigmas, self._final_sigma()).astype(np.float32)
        self.timesteps = ts.astype(np.int64)

    def _reset(self) -> None:
        self._previous: tuple[int, mx.array] | None = None  # (index, x0 prediction) of the last step

    def step(self, model_output: mx.array, index: int, x: mx.array,
             noise: mx.array | None = None) -> mx.array:
        cfg = self.config
        cx, cm = self._x0_coefficients(index)
        x0 = _combine(x, cx, model_output, cm)
        previous, self._previous = self._previous, (index, x0)
        last = index == len(self.timesteps) - 1
        lower_final = last and (cfg["euler_at_final"] or cfg["final_sigmas_type"] == "zero"
                                or (cfg["lower_order_final"] and len(self.timesteps) < 15))
        alpha_s, sigma_s = self._alpha_sigma(index)
        alpha_t, sigma_t = self._alpha_sigma(index + 1)
        decay = float(self.sigmas[index + 1]) / float(self.sigmas[index])  # exp(-h), h = lambda_t - lambda_s
        a = alpha_t * (1 - decay)
        x_first = sigma_t / sigma_s  # x_t = x_first * x + a * x0 is the first order step
        if previous is None or lower_final:
            return _combine(x, x_first, x0, a)
        if decay == 1.0:  # a zero-length step (karras ending on the sigma_min final sigma): x stays
            return x  # (diffusers gets the same with "midpoint" and NaN with "heun", from 0/0)
        h = math.log(1 / decay)
        r = math.log(float(self.sigmas[previous[0]]) / float(self.sigmas[index])) / h
        b = 0.5 * a if cfg["solver_type"] == "midpoint" else alpha_t * ((decay - 1) / h + 1)
        # x_t = x_first x + a D0 + b D1 with D0 = x0, D1 = (x0 - x0_previous) / r
        return _combine(_combine(x, x_first, x0, a + b / r), 1.0, previous[1], -b / r)


# ----------------------------------------------------------------------------------------- the factory


class LCM(Scheduler):
    """diffusers LCMScheduler: consistency-model steps on LCM's own schedule, which img2img cuts by strength
    before spacing the steps (LatentConsistencyModelImg2ImgPipeline), so every scheduled step runs."""

    name = "lcm"
    stochastic = True  # fresh noise between steps (none is used after the last)
    _defaults = {**_COMMON_DEFAULTS, "original_inference_steps": 50, "clip_sample": False,
                 "clip_sample_range": 1.0, "set_alpha_to_one": True, "timestep_scaling": 10.0,
                 "thresholding": False, "timestep_spacing": "leading"}
    _fixed = {"thresholding": False}
    _strength = 1.0

    def _set_schedule(self, n: int) -> None:
        original = self.config["original_inference_steps"]
        k = self.config["num_train_timesteps"] // original
        origin = (np.arange(1, int(original * self._strength) + 1) * k - 1)[::-1]
        if n > original or len(origin) < n:
            raise ValueError(
                f"LCM takes its {n} steps from a schedule of {original} x strength {self._strength} = {len(origin)} "
                f"timesteps: use at most {len(origin)} steps or a strength of at least {n / original:g}")
        self.timesteps = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]

    def img2img_start(self, num_inference_steps: int, strength: float) -> int:
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be above 0 and at most 1 for LCM, not {strength}")
        self._strength = strength
        self.set_timesteps(num_inference_steps)
        return 0

    def step(self, model_output: mx.array, index: int, x: mx.array,
             noise: mx.array | None = None) -> mx.array:
        t = int(self.timesteps[index])
        last = index == len(self.timesteps) - 1
        a_t = self._alpha_bar(t)
        a_prev = self._alpha_bar(t if last else int(self.timesteps[index + 1]))
        px, pm, _, _ = self._predictions(math.sqrt(a_t), math.sqrt(1 - a_t))
        x0 = _combine(x, px, model_output, pm)
        if self.config["clip_sample"]:
            limit = float(self.config["clip_sample_range"])
            x0 = mx.clip(x0, -limit, limit)
        scaled = t * self.config["timestep_scaling"]  # the consistency boundary condition, sigma_data 0.5
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / math.sqrt(scaled**2 + 0.25)
        denoised = _combine(x0, c_out, x, c_skip)
        if last:
            return denoised
        return _combine(denoised, math.sqrt(a_prev), noise, math.sqrt(1 - a_prev))


@dataclass(frozen=True)
class Sampler:
    """One row of the sampler table: our name, the class and its fixed options, the diffusers scheduler
    class it reproduces (a checkpoint naming that class gets it by default), and AUTOMATIC1111's label."""

    name: str
    cls: type[Scheduler]
    options: dict[str, Any]
    diffusers_class: str
    a1111_label: str
    default_for_class: bool = True  # the sampler a checkpoint with `diffusers_class` gets


# The one table of samplers; every other list of names (CLI choices, metadata labels) derives from it.
SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddim", DDIM, {}, "DDIMScheduler", "DDIM"),
    Sampler("euler", Euler, {}, "EulerDiscreteScheduler", "Euler"),
    Sampler("euler_a", EulerAncestral, {}, "EulerAncestralDiscreteScheduler", "Euler a"),
    Sampler("dpmpp_2m", DPMSolverPP2M, {"use_karras_sigmas": False}, "DPMSolverMultistepScheduler", "DPM++ 2M"),
    Sampler("dpmpp_2m_karras", DPMSolverPP2M, {"use_karras_sigmas": True}, "DPMSolverMultistepScheduler",
            "DPM++ 2M Karras", default_for_class=False),  # chosen by the config's use_karras_sigmas
    Sampler("pndm", PNDM, {}, "PNDMScheduler", "PLMS"),
    Sampler("lcm", LCM, {}, "LCMScheduler", "LCM"),
)}
SCHEDULERS = tuple(SAMPLERS)
_BY_DIFFUSERS_CLASS = {s.diffusers_class: s.name for s in SAMPLERS.values() if s.default_for_class}


def make_scheduler(name: str | None, config: Mapping[str, Any]) -> Scheduler:
    """The sampler `name` on the schedule of a diffusers scheduler_config.json (a dict).

    name None picks the checkpoint's own class (config["_class_name"]); a class not implemented here falls
    back to FALLBACK_SCHEDULER ("euler") with a warning.
    """
    if name is None:
        class_name = config.get("_class_name")
        name = _BY_DIFFUSERS_CLASS.get(class_name) if isinstance(class_name, str) else None
        if name is None:
            logger.warning("scheduler %r is not supported; using %r", class_name, FALLBACK_SCHEDULER)
            name = FALLBACK_SCHEDULER
        elif name == "dpmpp_2m" and config.get("use_karras_sigmas"):
            name = "dpmpp_2m_karras"
    if name not in SAMPLERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    row = SAMPLERS[name]
    scheduler = row.cls(config, **row.options)
    scheduler.name = name
    return scheduler


@dataclass
class Schedule:
    """A sampler and the slice of its timesteps a run takes: indices [start, end)."""

    sampler: Scheduler
    start: int
    end: int

    @property
    def steps(self) -> int:
        return self.end - self.start


def sliced_schedule(config: Mapping[str, Any], num_inference_steps: int, strength: float,
                    scheduler: str | None = None, denoising_start: float | None = None,
                    denoising_end: float | None = None) -> Schedule:
    """The sampler `scheduler` on the schedule of `config`, and the slice of its timesteps to run.
    Img2img runs the tail the strength picks; `denoising_end` stops early and `denoising_start` begins late
    (in fractions of the training schedule), for SDXL's base-to-refiner handoff, as diffusers does.
    Needs only the scheduler's config, so a run is planned and checked before any weight is loaded."""
    num_inference_steps = checks.whole("num_inference_steps", num_inference_steps, 1)
    strength = checks.number("strength", strength, 0.0, 1.0)
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and not 0.0 < checks.number(name, value) < 1.0:
            raise ValueError(f"{name} must be between 0 and 1 (exclusive), not {value}")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")
    sampler = make_scheduler(scheduler, config)
    train = sampler.config["num_train_timesteps"]
    if denoising_start is None:
        start = sampler.img2img_start(num_inference_steps, strength)
    else:  # the strength is ignored: the cut-off decides where to begin
        sampler.set_timesteps(num_inference_steps)
        cutoff = int(round(train - denoising_start * train))
        start = len(sampler.timesteps) - int((sampler.timesteps < cutoff).sum())
    end = len(sampler.timesteps)
    if denoising_end is not None:
        cutoff = int(round(train - denoising_end * train))
        end = start + int((sampler.timesteps[start:] >= cutoff).sum())
    if end <= start:
        raise ValueError(f"no denoising step falls between denoising_start={denoising_start} and "
                         f"denoising_end={denoising_end} with {num_inference_steps} steps; use more steps")
    return Schedule(sampler, start, end)
