"""The same parity checks on every Array-API library: numpy, array_api_strict, torch and jax."""

from __future__ import annotations

import numpy as np
import pytest

import crossent
import oracle
from cases import grad_output_for, make_case


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weighted": True, "ignore_some": True, "label_smoothing": 0.2},
        {"probability": True, "weighted": True, "reduction": "sum"},
        {"reduction": "none", "ignore_some": True, "z_loss": 0.01, "softcap": 4.0},
        {"axis": -1, "normalizer": 7.0, "ignore_some": True},
    ],
    ids=str,
)
def test_cross_entropy_and_grad_on_every_library(backend, rng, dtype, options):
    case = make_case(rng, (5, 4, 3), dtype, **options)
    go = grad_output_for(case, rng)
    kwargs = dict(case.kwargs)
    if "weight" in kwargs:
        kwargs["weight"] = backend.asarray(kwargs["weight"])
    loss, grad = crossent.cross_entropy_and_grad(
        backend.asarray(case.x), backend.asarray(case.target), grad_output=backend.asarray(go), **kwargs
    )
    assert backend.same_library(loss) and backend.same_library(grad)
    assert str(loss.dtype).split(".")[-1] == np.dtype(dtype).name
    expected = oracle.cross_entropy(case.x, case.target, grad_output=go, **case.kwargs)
    oracle.assert_close(backend.to_numpy(loss), expected.loss, dtype)
    oracle.assert_close(backend.to_numpy(grad), expected.grad, dtype)
    forward = crossent.cross_entropy(backend.asarray(case.x), backend.asarray(case.target), **kwargs)
    oracle.assert_close(backend.to_numpy(forward), expected.loss, dtype)


def test_nll_and_softmax_family_on_every_library(backend, rng):
    x = rng.standard_normal((4, 6, 2))
    y = rng.integers(0, 6, size=(4, 2))
    log_probs = crossent.log_softmax(backend.asarray(x), axis=1)
    assert backend.same_library(log_probs)
    oracle.assert_close(backend.to_numpy(log_probs), oracle.log_softmax(x, 1), np.float64)
    nll = crossent.nll_loss(log_probs, backend.asarray(y))
    oracle.assert_close(backend.to_numpy(nll), oracle.nll_loss(oracle.log_softmax(x, 1), y), np.float64)
    probs = crossent.softmax(backend.asarray(x), axis=1)
    np.testing.assert_allclose(backend.to_numpy(probs), np.exp(oracle.log_softmax(x, 1)), rtol=1e-12)
    lse = crossent.logsumexp(backend.asarray(x), axis=1, keepdims=True)
    np.testing.assert_allclose(backend.to_numpy(lse), np.log(np.exp(x).sum(axis=1, keepdims=True)), rtol=1e-12)


def test_out_of_range_target_raises_index_error_on_every_library(backend):
    with pytest.raises(IndexError, match="target value 5"):
        crossent.cross_entropy(backend.asarray(np.zeros((2, 3))), backend.asarray(np.array([0, 5])))


def test_torch_tensors_keep_autograd_out_of_the_reference():
    # The reference computes the gradient itself; a tensor that requires grad is still accepted.
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2])
    loss = crossent.cross_entropy(x, y)
    np.testing.assert_allclose(loss.detach().numpy(), torch.nn.functional.cross_entropy(x, y).detach().numpy())
