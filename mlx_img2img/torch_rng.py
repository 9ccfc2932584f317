"""PyTorch's CPU random generator in numpy: ``torch.randn`` noise without torch.

``TorchGenerator(seed).randn(shape)`` gives what
``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`` gives, and successive
draws continue the same stream, so a seed from AUTOMATIC1111, ComfyUI or a diffusers script
reproduces their noise. What PyTorch does (ATen's CPUGeneratorImpl, MT19937RNGEngine.h,
DistributionsHelper.h and the CPU normal kernel in native/cpu/DistributionTemplates.h):

* The engine is the reference MT19937, seeded with the low 32 bits of the 64-bit seed
  (Knuth's initialisation); numpy's MT19937 bit generator runs it once given that state.
* A float uniform is ``(u32 & (2**24 - 1)) * 2**-24``; a double one takes two draws,
  ``((first << 32) | second) & (2**53 - 1)`` times ``2**-53``.
* Tensors of 16 elements or more: one float uniform per element first, then Box-Muller in
  place on blocks of 16 (element j with j + 8: ``sqrt(-2 log(1 - a)) * cos|sin(2 pi b)``). When
  the size is not a multiple of 16, 16 fresh uniforms are drawn and the last 16 elements are
  recomputed from them.
* Smaller tensors: one double Box-Muller per pair of elements, element by element; the sine half
  is cached in the generator and returned by the next small draw (a large draw leaves it alone).

The large-tensor transform exists twice in PyTorch. x86-64 builds run it with AVX2 through
avx_mathfun.h's Cephes polynomials, compiled with fused multiply-adds; other builds (Apple
Silicon, so AUTOMATIC1111 on a Mac) call the C library's ``logf``/``cosf``/``sinf``. Both are
here: ``"avx2"`` follows that instruction sequence; ``"libm"`` computes the three functions in
double precision rounded to float, i.e. correctly rounded, as the C libraries are to within
their last bit. The default is the one PyTorch itself would run on this machine.
"""

from __future__ import annotations

import math
import platform
from typing import Literal

import mlx.core as mx
import numpy as np

__all__ = ["TorchGenerator", "default_transform"]

Transform = Literal["avx2", "libm"]
TRANSFORMS = ("avx2", "libm")
_STATE_N = 624
_F32 = np.float32
_F64 = np.float64


def default_transform() -> Transform:
    """The Box-Muller PyTorch's own CPU kernel uses on this machine's architecture."""
    return "avx2" if platform.machine().lower() in ("x86_64", "amd64") else "libm"


def _mt19937_key(seed: int) -> np.ndarray:
    """MT19937's initial state for ``seed`` (init_genrand over the low 32 bits)."""
    key = np.empty(_STATE_N, dtype=np.uint32)
    value = seed & 0xFFFFFFFF
    key[0] = value
    for j in range(1, _STATE_N):
        value = (1812433253 * (value ^ (value >> 30)) + j) & 0xFFFFFFFF
        key[j] = value
    return key


def _fma(a: np.ndarray, b: np.ndarray | float, c: np.ndarray | float) -> np.ndarray:
    """float32 fused multiply-add: the product of two floats is exact in double, one rounding after."""
    return (a.astype(_F64) * _F64(b) + np.asarray(c, dtype=_F32).astype(_F64)).astype(_F32)


def _as_bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32)


def _cephes_log(x: np.ndarray) -> np.ndarray:
    """avx_mathfun's log256_ps for positive normal floats, with the fused multiply-adds of the build."""
    bits = _as_bits(x)
    e = ((bits >> 23).astype(np.int32) - 127).astype(_F32) + _F32(1)
    x = ((bits & np.uint32(0x807FFFFF)) | _as_bits(np.array(0.5, _F32))).view(_F32)  # mantissa in [0.5, 1)
    small = x < _F32(0.707106781186547524)
    x = (x - _F32(1)) + np.where(small, x, _F32(0))
    e = e - np.where(small, _F32(1), _F32(0))
    z = x * x
    y = np.full_like(x, _F32(7.0376836292e-2))
    for p in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
              2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = _fma(y, x, _F32(p))
    y = y * x
    y = _fma(y, z, e * _F32(-2.12194440e-4))
    y = _fma(z, _F32(-0.5), y)
    return _fma(e, _F32(0.693359375), x + y)


def _cephes_sincos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun's sincos256_ps for x >= 0 (theta = 2 pi u), with the build's fused multiply-adds."""
    j = (x * _F32(1.27323954473516)).astype(np.int32)  # truncation, as cvttps
    j = (j + 1) & ~1
    q = j.astype(_F32)
    sign_sin = ((j & 4) << 29).astype(np.uint32)
    sign_cos = ((~(j - 2) & 4) << 29).astype(np.uint32)
    use_cos_poly = (j & 2) == 0
    for dp in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8):  # x - q * pi/4, in 3 parts
        x = _fma(q, _F32(dp), x)
    z = x * x
    yc = _fma(np.full_like(z, _F32(2.443315711809948e-5)), z, _F32(-1.388731625493765e-3))
    yc = _fma(yc, z, _F32(4.166664568298827e-2)) * z
    yc = _fma(yc, z, -(z * _F32(0.5))) + _F32(1)
    ys = _fma(np.full_like(z, _F32(-1.9515295891e-4)), z, _F32(8.3321608736e-3))
    ys = _fma(ys, z, _F32(-1.6666654611e-1)) * z
    ys = _fma(ys, x, x)
    sin_part_s = np.where(use_cos_poly, ys, _F32(0))  # the masked selects and sums of the original
    sin_part_c = np.where(use_cos_poly, _F32(0), yc)
    sin = sin_part_c + sin_part_s
    cos = (yc - sin_part_c) + (ys - sin_part_s)
    return (_as_bits(sin) ^ sign_sin).view(_F32), (_as_bits(cos) ^ sign_cos).view(_F32)


def _box_muller_16(u: np.ndarray, transform: Transform) -> np.ndarray:
    """(n, 16) float uniforms -> (n, 16) normals, as PyTorch's normal_fill_16 on each row."""
    a, b = 1 - u[:, :8], u[:, 8:]  # 1 - a: (0, 1], safe for the log
    if transform == "avx2":
        radius = np.sqrt(_F32(-2) * _cephes_log(a))
        sin, cos = _cephes_sincos(_F32(2 * math.pi) * b)
    else:
        radius = np.sqrt(_F32(-2) * np.log(a.astype(_F64)).astype(_F32))
        theta = (_F64(2 * math.pi) * b.astype(_F64)).astype(_F32)  # 2.0f * pi<double> * b, stored as float
        sin, cos = np.sin(theta.astype(_F64)).astype(_F32), np.cos(theta.astype(_F64)).astype(_F32)
    # `* std + mean` with std 1, mean 0 changes nothing but the sign of a zero, which it does change.
    return np.concatenate([radius * cos, radius * sin], axis=1) + _F32(0)


class TorchGenerator:
    """PyTorch's CPU generator after ``manual_seed(seed)``: a NoiseSource whose draws equal ``torch.randn``'s.

    ``transform`` picks PyTorch's x86-64 (``"avx2"``) or other-platform (``"libm"``) normal kernel;
    None takes the one PyTorch uses on this machine."""

    def __init__(self, seed: int, transform: Transform | None = None):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise ValueError(f"seed must be a whole number, not {seed!r}")
        seed = int(seed)
        if not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits (from -2**63 to 2**64 - 1), not {seed}")
        transform = default_transform() if transform is None else transform
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, not {transform!r}")
        self.seed = seed % 2**64  # torch stores a negative seed as its two's complement
        self.transform: Transform = transform
        self._engine = np.random.MT19937()
        self._engine.state = {"bit_generator": "MT19937", "state": {"key": _mt19937_key(self.seed), "pos": _STATE_N}}
        self._cached_normal: float | None = None  # the sine half of the last small-draw Box-Muller

    def _u32(self, n: int) -> np.ndarray:
        return self._engine.random_raw(n).astype(np.uint32)

    def _float_uniforms(self, n: int) -> np.ndarray:
        return (self._u32(n) & np.uint32(0xFFFFFF)).astype(_F32) * _F32(2.0**-24)

    def _double_uniform(self) -> float:
        first, second = (int(v) for v in self._u32(2))
        return (((first << 32) | second) & (2**53 - 1)) * 2.0**-53

    def _small_normal(self) -> float:
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        angle_u, radius_u = self._double_uniform(), self._double_uniform()
        radius = math.sqrt(-2.0 * math.log1p(-radius_u))
        theta = 2.0 * math.pi * angle_u
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 standard-normal array of ``shape``, the next draw of this generator."""
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        n = math.prod(shape)
        if n < 16:
            return np.array([self._small_normal() for _ in range(n)], dtype=_F32).reshape(shape)
        out = self._float_uniforms(n)
        full = n // 16 * 16
        out[:full] = _box_muller_16(out[:full].reshape(-1, 16), self.transform).reshape(-1)
        if n % 16:
            out[n - 16:] = _box_muller_16(self._float_uniforms(16).reshape(1, 16), self.transform).reshape(-1)
        return out.reshape(shape)

    def normal(self, shape: tuple[int, ...]) -> mx.array:
        """NoiseSource: the next draw as an MLX float32 array (NCHW shapes, as diffusers draws them)."""
        return mx.array(self.randn(shape))
