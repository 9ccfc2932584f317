"""The models' activations (SiLU, GELU, CLIP's quick GELU) and attention's softmax, with versions for
MLX's CPU backend.

MLX's CPU backend computes erf, exp, tanh and sigmoid one element at a time through library calls, which
made the activations a large share of a UNet step and of the prompt encoding there (README, Performance).
On the CPU each is computed instead as x/2 * (1 + f(k x)), f = erf or tanh from a rational approximation
x * P(x^2) / Q(x^2) (scripts/fit_activations.py fits the coefficients and prints the errors, below MLX's
own CPU erf's), the argument clipped where the float32 value is +-1 already: multiplications, additions
and one division. `mx.compile` fuses that into one vectorised loop, as long as the expression stays
shallow (its fusion stops about 11 operations deep, and a select stops the vectorisation): hence the
polynomials in Estrin's form, the scale k folded into the coefficients, and the saturation as a clamp of
the gate at 0. Evaluated in float32 whatever the input's precision. On other devices MLX's own functions
are used, as before.

The softmax's exponential is computed there the classic way instead (a rational does not reach float32
accuracy over its range): exp(z) = 2^k * exp(r) with k the nearest integer to z / ln 2, r = z - k ln 2 in
two parts (Cody and Waite), exp(r) from its Taylor series to degree 7, and 2^k written as a float's exponent
bits. Its error is about one float32 ulp, below that of MLX's CPU exp.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
_SATURATION_MARGIN = 2.0 ** -22  # two float32 ulps of 1: covers the rational's rounding at the clip point
_LN2_HIGH = 0.693145751953125  # ln 2's leading 16 bits: k * _LN2_HIGH is exact for the k used here
_LN2_LOW = math.log(2.0) - _LN2_HIGH
_EXP_TAYLOR = tuple(1.0 / math.factorial(j) for j in range(8))  # |r| <= ln2 / 2: remainder below 1e-8
_EXP_FLOOR = -87.0  # e^-87 is near float32's smallest normal: below, the result stays there (masked scores)


def _polynomial(c: tuple[float, ...], z: float) -> float:
    return sum(a * z ** j for j, a in enumerate(c))


class _Gate:
    """1 + f(k x) for an odd f given as x * P(x^2) / Q(x^2) on [-clip, clip]: k folded into the
    coefficients and the clip point, and P scaled so that the rational is at least 1 at the clip point
    (by the margin), which makes the gate exactly 0 far out on the negative side, as in the exact function,
    instead of a rounding residue times a large input."""

    def __init__(self, clip: float, p: tuple[float, ...], q: tuple[float, ...], k: float):
        at_clip = clip * _polynomial(p, clip * clip) / _polynomial(q, clip * clip)
        scale = (1.0 + _SATURATION_MARGIN) / at_clip
        self.limit = clip / k
        self.p = tuple(a * scale * k ** (2 * j + 1) for j, a in enumerate(p))
        self.q = tuple(a * k ** (2 * j) for j, a in enumerate(q))

    def __call__(self, x: mx.array) -> mx.array:
        inside = mx.clip(x, -self.limit, self.limit)
        z = inside * inside
        z2 = z * z
        z4 = z2 * z2
        ratio = inside * _estrin(self.p, z, z2, z4) / _estrin(self.q, z, z2, z4)
        return mx.maximum(1.0 + ratio, 0.0)


def _estrin(c: tuple[float, ...], z: mx.array, z2: mx.array, z4: mx.array) -> mx.array:
    """c[0] + c[1] z + ... + c[6] z^6 (up to degree 6) in Estrin's form: shallower than Horner's."""
    pairs = [c[i] + c[i + 1] * z if i + 1 < len(c) else c[i] for i in range(0, len(c), 2)]
    low = pairs[0] + pairs[1] * z2
    if len(pairs) == 2:
        return low
    return low + (pairs[2] + pairs[3] * z2 if len(pairs) == 4 else pairs[2]) * z4


_GELU = _Gate(_ERF_CLIP, _ERF_P, _ERF_Q, _SQRT_HALF)  # x/2 (1 + erf(x / sqrt 2))
_SILU = _Gate(_TANH_CLIP, _TANH_P, _TANH_Q, 0.5)  # x sigmoid(x) = x/2 (1 + tanh(x / 2))
_QUICK_GELU = _Gate(_TANH_CLIP, _TANH_P, _TANH_Q, 0.5 * 1.702)  # x sigmoid(1.702 x)


# Compiled for each input shape (not shapeless): a shapeless trace keeps a broadcast beside every binary
# operation, which doubles the expression's depth and splits it into several kernels.
def _cpu_activation(gate: _Gate) -> Callable[[mx.array], mx.array]:
    """x/2 * gate(x), in float32, as one compiled kernel."""
    @mx.compile
    def activation(x: mx.array) -> mx.array:
        y = x.astype(mx.float32)
        return ((0.5 * y) * gate(y)).astype(x.dtype)

    return activation


@mx.compile
def _cpu_gated_gelu(value: mx.array, gate: mx.array) -> mx.array:
    y = gate.astype(mx.float32)
    return ((0.5 * value.astype(mx.float32) * y) * _GELU(y)).astype(value.dtype)


_cpu_gelu = _cpu_activation(_GELU)
_cpu_silu = _cpu_activation(_SILU)
_cpu_quick_gelu = _cpu_activation(_QUICK_GELU)


@mx.compile
def _cpu_exp_below(x: mx.array, top: mx.array) -> mx.array:
    """exp(x - top) in float32 for x <= top."""
    z = mx.maximum(x.astype(mx.float32) - top.astype(mx.float32), _EXP_FLOOR)
    k = mx.round(z * (1.0 / math.log(2.0)))
    r = (z - k * _LN2_HIGH) - k * _LN2_LOW
    r2 = r * r
    c = _EXP_TAYLOR
    series = (c[0] + c[1] * r + r2 * (c[2] + c[3] * r)) + (r2 * r2) * ((c[4] + c[5] * r) + r2 * (c[6] + c[7] * r))
    return series * mx.view(mx.left_shift(k.astype(mx.int32) + 127, 23), mx.float32)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, in float32 on the CPU (as MLX's precise softmax elsewhere)."""
    if not on_cpu():
        return mx.softmax(x, axis=-1, precise=True)
    e = _cpu_exp_below(x, mx.max(x, axis=-1, keepdims=True))
    return (e / mx.sum(e, axis=-1, keepdims=True)).astype(x.dtype)


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
