"""The models' activations (SiLU, GELU, CLIP's quick GELU), with versions for MLX's CPU backend.

MLX's CPU backend computes erf, exp, tanh and sigmoid one element at a time through library calls, which
made the activations a large share of a UNet step and of the prompt encoding there (README, Performance).
On the CPU they are computed instead from rational approximations of erf and tanh, x * P(x^2) / Q(x^2)
with the argument clipped where the float32 value is +-1 already: multiplications, additions and one
division, which `mx.compile` fuses into one loop with the activation's other arithmetic. They are
evaluated in float32 whatever the input's precision, and their largest error (3.3e-7 for erf, 3.4e-7 for
tanh, absolute) is below MLX's own CPU erf's; scripts/fit_activations.py fits the coefficients and prints
the errors. On other devices MLX's own functions are used, as before.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..parallel import on_cpu

# Lowest power first, in x^2; from scripts/fit_activations.py.
_ERF_CLIP = 4.0
_ERF_P = (1.128378677e+00, 2.139414230e-01, 5.243302003e-02, 4.292917136e-03, 1.555338969e-04,
          -1.990316864e-06, 1.921737651e-08)
_ERF_Q = (1.0, 5.229283058e-01, 1.207982560e-01, 1.555080734e-02, 1.098006480e-03)
_TANH_CLIP = 9.5
_TANH_P = (9.999999891e-01, 1.365200184e-01, 3.833534765e-03, 2.731705430e-05, 2.897442200e-08,
           -1.105747470e-11)
_TANH_Q = (1.0, 4.698533058e-01, 2.711802619e-02, 3.877694109e-04, 1.239777684e-06)
_SQRT_HALF = 0.7071067811865476


def _odd_rational(x: mx.array, clip: float, p: tuple[float, ...], q: tuple[float, ...]) -> mx.array:
    """x * P(x^2) / Q(x^2) inside (-clip, clip), exactly -1 or 1 outside: the gates of GELU and SiLU are then
    exactly 0 or 1 far out, as in the exact functions, not a rounding residue times a large input."""
    inside = mx.clip(x, -clip, clip)
    z = inside * inside
    num, den = p[-1], q[-1]
    for c in reversed(p[:-1]):
        num = num * z + c
    for c in reversed(q[:-1]):
        den = den * z + c
    return mx.where(mx.abs(x) < clip, inside * num / den, mx.sign(x))


def _gelu(x: mx.array) -> mx.array:
    y = x.astype(mx.float32)
    return (0.5 * y) * (1.0 + _odd_rational(y * _SQRT_HALF, _ERF_CLIP, _ERF_P, _ERF_Q))  # halved first: no overflow


def _swish(x: mx.array, beta: float) -> mx.array:
    """x * sigmoid(beta * x), the sigmoid as (1 + tanh(beta * x / 2)) / 2."""
    y = x.astype(mx.float32)
    return (0.5 * y) * (1.0 + _odd_rational(y * (0.5 * beta), _TANH_CLIP, _TANH_P, _TANH_Q))


@partial(mx.compile, shapeless=True)
def _cpu_gelu(x: mx.array) -> mx.array:
    return _gelu(x).astype(x.dtype)


@partial(mx.compile, shapeless=True)
def _cpu_gated_gelu(value: mx.array, gate: mx.array) -> mx.array:
    return (value.astype(mx.float32) * _gelu(gate)).astype(value.dtype)


@partial(mx.compile, shapeless=True)
def _cpu_silu(x: mx.array) -> mx.array:
    return _swish(x, 1.0).astype(x.dtype)


@partial(mx.compile, shapeless=True)
def _cpu_quick_gelu(x: mx.array) -> mx.array:
    return _swish(x, 1.702).astype(x.dtype)


def gelu(x: mx.array) -> mx.array:
    """GELU with the exact (erf) form, as torch's default."""
    return _cpu_gelu(x) if on_cpu() else nn.gelu(x)


def gated_gelu(value: mx.array, gate: mx.array) -> mx.array:
    """value * gelu(gate): GEGLU's output."""
    return _cpu_gated_gelu(value, gate) if on_cpu() else value * nn.gelu(gate)


def silu(x: mx.array) -> mx.array:
    return _cpu_silu(x) if on_cpu() else nn.silu(x)


def quick_gelu(x: mx.array) -> mx.array:
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (SD 1.x's text encoder, SDXL's first)."""
    return _cpu_quick_gelu(x) if on_cpu() else x * mx.sigmoid(1.702 * x)
