"""The CPU activations (rational erf and tanh) against torch's in float64.

The models' parity tests against diffusers run through them as well (this suite runs on the CPU); these
check the functions over the whole float32 range, their saturation and their precisions."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_img2img.models import activations

REFERENCES = {
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
}
GRID = np.concatenate([np.linspace(-12.0, 12.0, 96001), np.geomspace(12.0, 1e30, 200), -np.geomspace(12.0, 1e30, 200),
                       [0.0, 1e-30, -1e-30, 3.0e38, -3.0e38]]).astype(np.float32)


def reference(name: str, x: np.ndarray) -> np.ndarray:
    return REFERENCES[name](torch.from_numpy(x.astype(np.float64))).numpy()


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_float32_error_is_a_few_ulp_of_the_result(name):
    ours = np.array(getattr(activations, name)(mx.array(GRID))).astype(np.float64)
    exact = reference(name, GRID)
    assert np.isfinite(ours).all()
    # the approximations' absolute error (a few 1e-7) scaled by |x|, plus the float32 rounding of the result
    bound = 4e-7 * np.maximum(1.0, np.abs(GRID)) + np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert (np.abs(ours - exact) <= bound).all(), np.abs(ours - exact).max()


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_saturates(name):
    """Far out on the negative side the gate is exactly 0, as in the exact function (no rounding residue
    times a huge input); on the positive side the result is the input within two float32 ulps."""
    x = mx.array([-1e30, -1e4, -50.0, 50.0, 1e4, 1e30], dtype=mx.float32)
    ours = np.array(getattr(activations, name)(x))
    np.testing.assert_array_equal(ours[:3], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(ours[3:], np.array(x)[3:], rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_half_precision_is_the_float32_result_rounded(name, dtype):
    x = mx.array(np.linspace(-20.0, 20.0, 4001).astype(np.float32)).astype(dtype)
    ours = getattr(activations, name)(x)
    assert ours.dtype == dtype
    from_float32 = getattr(activations, name)(x.astype(mx.float32)).astype(dtype)
    np.testing.assert_array_equal(np.array(ours.astype(mx.float32)), np.array(from_float32.astype(mx.float32)))


def test_gated_gelu_is_value_times_gelu():
    rng = np.random.default_rng(0)
    value, gate = (mx.array(rng.standard_normal((2, 7, 33)).astype(np.float32) * 3) for _ in range(2))
    np.testing.assert_allclose(np.array(activations.gated_gelu(value, gate)),
                               np.array(value * activations.gelu(gate)), rtol=1e-6, atol=1e-7)


def test_non_contiguous_input():
    """GEGLU's gate is a strided slice of its projection: the compiled kernel's strided form."""
    x = mx.array(np.linspace(-6.0, 6.0, 2 * 5 * 64).astype(np.float32).reshape(2, 5, 64))
    gate = mx.split(x, 2, axis=-1)[1]
    contiguous = mx.array(np.array(gate))
    np.testing.assert_array_equal(np.array(activations.gelu(gate)), np.array(activations.gelu(contiguous)))


def test_softmax_against_float64_with_masked_and_extreme_scores():
    """The CPU softmax's exponential over float32's whole exponent range (scores up to 90 apart, where
    exp underflows), a row with -inf entries (the causal mask) and one with a single finite score."""
    rng = np.random.default_rng(0)
    scores = (rng.standard_normal((3, 5, 257)) * 30).astype(np.float32)
    scores[0, 0, 100:] = -np.inf
    scores[0, 1, 1:] = -np.inf
    ours = np.array(activations.softmax(mx.array(scores))).astype(np.float64)
    exact = torch.softmax(torch.from_numpy(scores.astype(np.float64)), dim=-1).numpy()
    assert np.isfinite(ours).all()
    # float32's rounding of x - max (relative |x - max| * 2^-24 in the result, as in any float32 softmax),
    # a few ulps for the rest; masked scores come out below float32's smallest normal instead of 0
    gap = np.abs(scores - scores.max(axis=-1, keepdims=True)).astype(np.float64)
    bound = (4e-7 + np.where(np.isfinite(gap), gap, 0) * 2.0 ** -24) * exact + 1e-37
    assert (np.abs(ours - exact) <= bound).all()
    assert ours[0, 1, 0] == 1.0 and (ours[0, 0, 100:] < 1e-37).all()
    half = activations.softmax(mx.array(scores).astype(mx.float16))
    assert half.dtype == mx.float16
