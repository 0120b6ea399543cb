"""Derive the float exp polynomial of the native kernel (src/crossent/_native/kernel.cpp, exp_parts).

exp(r) = 1 + r + r^2 p(r) on |r| <= ln(2) / 2, with p of degree 4 chosen to minimise the largest
relative error of exp(r). Lawson's algorithm (least squares, reweighted towards where the error is
largest) converges to that minimax fit with NumPy alone. Prints the float32 coefficients, lowest
degree first, and the error of the fit with them, in half-ulps of 1 (2^-24).

    python tools/fit_exp_polynomial.py
"""

import numpy as np

DEGREE = 4
HALF_ULP = 2.0**-24


def relative_error(coefficients: np.ndarray, r: np.ndarray) -> np.ndarray:
    p = np.polynomial.polynomial.polyval(r, coefficients)
    return (1 + r + r * r * p - np.exp(r)) / np.exp(r)


def fit(points: int = 4001, iterations: int = 2000) -> np.ndarray:
    r = np.linspace(-np.log(2) / 2, np.log(2) / 2, points)
    r = r[r != 0]
    # Relative error = r^2 (p(r) - target) / e^r: a weighted fit of p to `target`.
    target = (np.exp(r) - 1 - r) / (r * r)
    scale = r * r / np.exp(r)
    basis = np.stack([r**i for i in range(DEGREE + 1)], axis=1) * scale[:, None]
    weights = np.full(r.size, 1.0 / r.size)
    coefficients = np.zeros(DEGREE + 1)
    for _ in range(iterations):
        root = np.sqrt(weights)
        coefficients = np.linalg.lstsq(basis * root[:, None], target * scale * root, rcond=None)[0]
        error = np.abs(basis @ coefficients - target * scale)
        weights = weights * error
        weights /= weights.sum()
    return coefficients


def main() -> None:
    coefficients = fit().astype(np.float32)
    r = np.linspace(-np.log(2) / 2, np.log(2) / 2, 100_001)
    worst = np.max(np.abs(relative_error(coefficients.astype(np.float64), r))) / HALF_ULP
    print("coefficients (c0..c4):", ", ".join(f"{c!r}" for c in coefficients.tolist()))
    print(f"largest relative error with float32 coefficients: {worst:.3f} half-ulps")


if __name__ == "__main__":
    main()
