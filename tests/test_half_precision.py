"""float16 and bfloat16 are computed in float32 throughout; the result has the input's dtype."""

from __future__ import annotations

import numpy as np
import pytest

import crossent
import oracle
from cases import make_case


def _half_dtypes():
    dtypes = [np.float16]
    try:
        import ml_dtypes

        dtypes.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    return dtypes


@pytest.mark.parametrize("dtype", _half_dtypes(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("probability", [False, True])
def test_half_precision_matches_the_float64_oracle_on_the_same_values(rng, dtype, probability):
    case = make_case(
        rng,
        (33, 17, 3),
        dtype,
        probability=probability,
        weighted=True,
        ignore_some=not probability,
        label_smoothing=0.1,
    )
    loss, grad = crossent.cross_entropy_and_grad(case.x, case.target, **case.kwargs)
    assert loss.dtype == np.dtype(dtype) and grad.dtype == np.dtype(dtype)
    # The oracle sees the same half-precision values, widened exactly to float64.
    kwargs = dict(case.kwargs)
    kwargs["weight"] = kwargs["weight"].astype(np.float64)
    expected = oracle.cross_entropy(
        case.x.astype(np.float64), case.target.astype(np.float64) if probability else case.target, **kwargs
    )
    oracle.assert_close(loss, expected.loss, dtype)
    oracle.assert_close(grad, expected.grad, dtype, scale=1e-2)  # gradients are O(1/N)


def test_float16_with_more_than_65504_targets_stays_finite(rng):
    # The float16 count of 70,000 targets overflows to inf in float16; crossent keeps it in float32.
    torch = pytest.importorskip("torch")
    n = 70_000
    x = rng.standard_normal((n, 3)).astype(np.float16)
    y = rng.integers(0, 3, size=n)
    loss, grad = crossent.cross_entropy_and_grad(x, y)
    expected = oracle.cross_entropy(x.astype(np.float64), y)
    assert np.isfinite(loss)
    oracle.assert_close(loss, expected.loss, np.float16)
    assert np.any(grad != 0)
    t = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(y), reduction="mean")
    print("torch float16 CPU gives", float(t), "crossent gives", float(loss))


def test_half_softmax_family(rng):
    x = (5 * rng.standard_normal((7, 9))).astype(np.float16)
    np.testing.assert_allclose(
        crossent.log_softmax(x, axis=1).astype(np.float64), oracle.log_softmax(x.astype(np.float64), 1), atol=1e-2
    )
    assert crossent.softmax(x).dtype == np.float16
    assert crossent.logsumexp(x).dtype == np.float16


def test_bfloat16_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((20, 11))).to(torch.bfloat16)
    y = torch.from_numpy(rng.integers(0, 11, size=20))
    loss, grad = crossent.cross_entropy_and_grad(x, y, label_smoothing=0.1)
    assert loss.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    expected = oracle.cross_entropy(x.double().numpy(), y.numpy(), label_smoothing=0.1)
    np.testing.assert_allclose(loss.double().numpy(), expected.loss, rtol=1.6e-2)
    np.testing.assert_allclose(grad.double().numpy(), expected.grad, atol=1e-3)
