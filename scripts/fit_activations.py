"""Fit the rational approximations of erf and tanh that mlx_img2img/models/activations.py uses on the CPU.

Both functions are odd, so each is fitted as f(x) = x * P(x^2) / Q(x^2) with Q(0) = 1 on [0, clip], and
taken as +-1 beyond the clip point (where the float32 value is 1 already). The fit minimises the largest
absolute error by iteratively reweighted linear least squares (Lawson's method) on Chebyshev points, in
float64 and in a scaled variable to keep the system well conditioned; the error printed is that of the
float32 evaluation the models run (Horner's rule, one division), against math.erf / math.tanh in float64
of the same float32 inputs, beside the error of MLX's own CPU functions for comparison.

    python scripts/fit_activations.py            # prints the coefficients and the errors
"""

from __future__ import annotations

import math

import numpy as np

FITS = {"erf": (math.erf, 4.0, 6, 4), "tanh": (math.tanh, 9.5, 5, 4)}  # function, clip, deg P, deg Q (in x^2)


def fit(f, clip: float, m: int, n: int, rounds: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (lowest power first) of P (degree m) and Q (degree n, Q[0] = 1) in x^2."""
    x = (np.cos(np.linspace(0.0, np.pi, 6000)) * 0.5 + 0.5) * clip
    x = x[x > 1e-6]
    s = (x / clip) ** 2
    g = np.array([f(v) for v in x]) / x
    weights = np.ones_like(x)
    for _ in range(rounds):
        # P(s) - g * (Q(s) - 1) = g, linear in the coefficients; rows scaled by x (absolute error of f)
        a = np.hstack([s[:, None] ** np.arange(m + 1), -g[:, None] * s[:, None] ** np.arange(1, n + 1)])
        row = np.sqrt(weights) * x
        c, *_ = np.linalg.lstsq(a * row[:, None], g * row, rcond=None)
        p, q = c[:m + 1], np.concatenate([[1.0], c[m + 1:]])
        error = np.abs(np.polyval(p[::-1], s) / np.polyval(q[::-1], s) - g) * x
        weights = weights * error / error.mean() + 1e-12
        weights /= weights.mean()
    z = clip * clip  # back from s = x^2 / clip^2 to x^2
    return p / z ** np.arange(m + 1), q / z ** np.arange(n + 1)


def evaluate_float32(p: np.ndarray, q: np.ndarray, x: np.ndarray, clip: float) -> np.ndarray:
    x = np.clip(x.astype(np.float32), -clip, clip)
    z = x * x
    num, den = np.float32(p[-1]), np.float32(q[-1])
    for c in p[-2::-1]:
        num = num * z + np.float32(c)
    for c in q[-2::-1]:
        den = den * z + np.float32(c)
    return x * num / den


def main() -> None:
    xs = np.linspace(-12.0, 12.0, 240001).astype(np.float32)
    try:
        import mlx.core as mx
    except ImportError:
        mx = None
    for name, (f, clip, m, n) in FITS.items():
        p, q = fit(f, clip, m, n)
        exact = np.array([f(float(v)) for v in xs])
        ours = np.abs(evaluate_float32(p, q, xs, clip).astype(np.float64) - exact).max()
        line = f"{name}: clip {clip}, P {m}, Q {n}: max abs error {ours:.2e} (float32)"
        if mx is not None:
            theirs = np.abs(np.array(getattr(mx, name)(mx.array(xs))).astype(np.float64) - exact).max()
            line += f", MLX's {name} {theirs:.2e}"
        print(line)
        print(f"  P = ({', '.join(f'{c:.9e}' for c in p)})")
        print(f"  Q = ({', '.join(f'{c:.9e}' for c in q)})")


if __name__ == "__main__":
    main()
