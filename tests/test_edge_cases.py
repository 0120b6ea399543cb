"""Where torch's behaviour surprises, crossent matches it (or, where documented, does better)."""

from __future__ import annotations

import numpy as np
import pytest

import crossent
import oracle


@pytest.mark.parametrize("label_smoothing", [0.0, 0.4])
@pytest.mark.parametrize("weighted", [False, True])
def test_every_target_ignored_gives_nan_mean_zero_sum_and_zero_gradient(rng, label_smoothing, weighted):
    x = rng.standard_normal((5, 4))
    y = np.full(5, -100)
    w = rng.random(4) if weighted else None
    for reduction in ["mean", "sum"]:
        loss, grad = crossent.cross_entropy_and_grad(x, y, w, reduction=reduction, label_smoothing=label_smoothing)
        expected = oracle.cross_entropy(x, y, w, reduction=reduction, label_smoothing=label_smoothing)
        np.testing.assert_array_equal(loss, expected.loss)  # NaN for mean, 0 for sum
        np.testing.assert_array_equal(grad, expected.grad)
        np.testing.assert_array_equal(grad, np.zeros_like(x))
    assert np.isnan(crossent.cross_entropy(x, y, w, label_smoothing=label_smoothing))


def test_zero_if_all_ignored_gives_zero_instead_of_nan(rng):
    x = rng.standard_normal((5, 4))
    y = np.full(5, -100)
    loss, grad = crossent.cross_entropy_and_grad(x, y, zero_if_all_ignored=True)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, 0.0)
    # and it changes nothing when some target counts
    y[2] = 1
    np.testing.assert_array_equal(crossent.cross_entropy(x, y, zero_if_all_ignored=True), crossent.cross_entropy(x, y))


@pytest.mark.parametrize("probability", [False, True])
def test_empty_batch(probability):
    x = np.zeros((0, 3))
    y = np.zeros((0, 3)) if probability else np.zeros(0, dtype=np.int64)
    for reduction in ["mean", "sum", "none"]:
        got = crossent.cross_entropy(x, y, reduction=reduction)
        expected = oracle.cross_entropy(x, y, reduction=reduction, want_grad=False).loss
        np.testing.assert_array_equal(got, expected)


def test_unbatched_input_and_scalar_target(rng):
    x = rng.standard_normal(6)
    for reduction in ["mean", "sum", "none"]:
        loss, grad = crossent.cross_entropy_and_grad(x, np.array(4), reduction=reduction, grad_output=np.array(1.5))
        expected = oracle.cross_entropy(x, np.array(4), reduction=reduction, grad_output=np.array(1.5))
        assert loss.shape == () and grad.shape == (6,)
        oracle.assert_close(loss, expected.loss, np.float64)
        oracle.assert_close(grad, expected.grad, np.float64)


def test_fully_minus_inf_row_that_is_ignored_contributes_nothing(rng):
    # torch returns a finite loss here but NaN gradients for the whole input; crossent gives 0 there.
    x = rng.standard_normal((3, 4))
    x[1] = -np.inf
    y = np.array([0, -100, 3])
    loss, grad = crossent.cross_entropy_and_grad(x, y, label_smoothing=0.2, z_loss=0.01)
    kept = oracle.cross_entropy(x[[0, 2]], y[[0, 2]], label_smoothing=0.2, z_loss=0.01)
    oracle.assert_close(loss, kept.loss, np.float64)
    np.testing.assert_array_equal(grad[1], 0.0)
    oracle.assert_close(grad[[0, 2]], kept.grad, np.float64)


def test_minus_inf_logits_in_counted_rows_match_torch(rng):
    x = rng.standard_normal((4, 5))
    x[0, 1] = -np.inf  # a masked-out class, not the target
    x[2, :] = -np.inf  # a fully masked row whose target counts: NaN, as in torch
    y = np.array([3, 1, 0, 4])
    for reduction in ["none", "mean"]:
        go = np.ones(4) if reduction == "none" else None
        loss, grad = crossent.cross_entropy_and_grad(x, y, reduction=reduction, grad_output=go)
        expected = oracle.cross_entropy(x, y, reduction=reduction, grad_output=go)
        oracle.assert_close(loss, expected.loss, np.float64)
        oracle.assert_close(grad, expected.grad, np.float64)


def test_zero_weight_total_with_counted_targets_matches_torch(rng):
    x = rng.standard_normal((3, 4))
    w = np.array([0.0, 1.0, 1.0, 1.0])
    y = np.array([0, 0, 0])
    loss, grad = crossent.cross_entropy_and_grad(x, y, w)
    expected = oracle.cross_entropy(x, y, w)
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(expected.loss))
    np.testing.assert_array_equal(np.isnan(grad), np.isnan(expected.grad))


def test_unnormalised_probability_targets_match_torch(rng):
    # torch does not require probability targets to sum to 1; neither does crossent.
    x = rng.standard_normal((5, 4))
    t = 3 * rng.random((5, 4))
    loss, grad = crossent.cross_entropy_and_grad(x, t, label_smoothing=0.3)
    expected = oracle.cross_entropy(x, t, label_smoothing=0.3)
    oracle.assert_close(loss, expected.loss, np.float64)
    oracle.assert_close(grad, expected.grad, np.float64)


def test_probability_targets_ignore_ignore_index(rng):
    x = rng.standard_normal((5, 4))
    t = np.full((5, 4), -100.0)  # not treated as ignored: torch applies ignore_index to indices only
    np.testing.assert_allclose(
        crossent.cross_entropy(x, t), oracle.cross_entropy(x, t, want_grad=False).loss, rtol=1e-12
    )


@pytest.mark.parametrize("native", [True, False])
def test_no_classes(native):
    # torch.logsumexp over an empty axis is -inf (the log of an empty sum); softmax of nothing is nothing.
    x = np.zeros((3, 0, 2), dtype=np.float32)
    previous = crossent._dispatch.use_native(native)
    try:
        xt = oracle.torch.from_numpy(x)
        np.testing.assert_array_equal(crossent.logsumexp(x, axis=1), oracle.torch.logsumexp(xt, 1).numpy())
        assert crossent.logsumexp(x, axis=1, keepdims=True).shape == (3, 1, 2)
        assert crossent.softmax(x, axis=1).shape == x.shape
        assert crossent.log_softmax(x, axis=1).shape == x.shape
        # A loss over no classes has no target to score; torch gives NaN, 0 or an error by option.
        for target in (np.full((3, 2), -100), np.zeros(x.shape, np.float32)):
            with pytest.raises(ValueError, match=r"input of shape \(3, 0, 2\) has no classes on axis 1"):
                crossent.cross_entropy(x, target)
        with pytest.raises(ValueError, match="no classes"):
            crossent.nll_loss(x, np.full((3, 2), -100))
    finally:
        crossent._dispatch.use_native(previous)
