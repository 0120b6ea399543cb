"""Against a float64 oracle, crossent's float32 error is no larger than torch's on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

import crossent
import oracle

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _half_ulp(value: float) -> float:
    return float(np.spacing(np.float32(abs(value)))) / 2


@pytest.mark.parametrize(
    ("shape", "scale"),
    [((4096, 1000), 4.0), ((256, 32000), 4.0), ((16, 21, 64, 64), 4.0), ((1_000_000, 3), 2.0), ((512, 2000), 30.0)],
    ids=str,
)
def test_float32_mean_is_no_less_accurate_than_torch(shape, scale):
    rng = np.random.default_rng(7)
    x = (scale * rng.standard_normal(shape)).astype(np.float32)
    y = rng.integers(0, shape[1], size=shape[:1] + shape[2:])
    exact = float(oracle.cross_entropy(x, y, want_grad=False).loss)
    ours = abs(float(crossent.cross_entropy(x, y)) - exact)
    theirs = abs(float(F.cross_entropy(torch.from_numpy(x), torch.from_numpy(y))) - exact)
    # Either no worse than torch, or correctly rounded (torch may round luckily on a given input).
    assert ours <= max(theirs, _half_ulp(exact)), f"crossent error {ours:.3g} > torch error {theirs:.3g}"


@pytest.mark.parametrize(
    ("shape", "scale"),
    # Rows, and (N, C, H, W) pixels (the kernel's tiles, whose per-pixel terms are in float for float).
    [((2048, 32000), 4.0), ((8192, 100), 20.0), ((16, 21, 64, 64), 4.0), ((4, 150, 32, 32), 8.0)],
    ids=str,
)
def test_float32_per_row_losses_are_no_less_accurate_than_torch(shape, scale):
    rng = np.random.default_rng(11)
    x = (scale * rng.standard_normal(shape)).astype(np.float32)
    y = rng.integers(0, shape[1], size=shape[:1] + shape[2:])
    exact = oracle.cross_entropy(x, y, reduction="none", want_grad=False).loss
    ours = np.asarray(crossent.cross_entropy(x, y, reduction="none"), np.float64) - exact
    theirs = F.cross_entropy(torch.from_numpy(x), torch.from_numpy(y), reduction="none").double().numpy() - exact
    rms_ours, rms_theirs = np.sqrt(np.mean(ours**2)), np.sqrt(np.mean(theirs**2))
    assert rms_ours <= rms_theirs * 1.02, f"crossent RMS error {rms_ours:.3g} > torch {rms_theirs:.3g}"
