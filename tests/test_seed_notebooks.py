"""The two seed notebooks, reproduced: their numbers, their loops and their identities."""

from __future__ import annotations

import numpy as np
import pytest

import crossent
import oracle

# The 5 x 3 tensor printed in seed 001 (four decimals, as printed) and its targets.
SEED_001_X = np.array(
    [
        [-0.9997, 0.9024, 1.5058],
        [1.2295, -1.2791, 0.6434],
        [-1.9006, 1.4064, 1.3669],
        [-0.8453, 0.9917, 0.6591],
        [0.3560, 0.9731, 0.3480],
    ],
    dtype=np.float32,
)
SEED_001_TARGET = np.array([2, 0, 0, 0, 2])


def notebook_loop_loss(x: np.ndarray, target: np.ndarray) -> float:
    """Seed 000's formula, loss = -x[class] + log(sum_j exp(x[j])), as its loops compute it."""
    losses = []
    for index in np.ndindex(*target.shape):
        n, rest = index[0], index[1:]
        row = x[(n, slice(None), *rest)]
        losses.append(-row[target[index]] + np.log(np.sum(np.exp(row))))
    return float(np.mean(losses))


def test_seed_001_prints_1_7603():
    loss = crossent.cross_entropy(SEED_001_X, SEED_001_TARGET)
    assert f"{float(loss):.4f}" == "1.7603"
    np.testing.assert_allclose(loss, oracle.nll_loss(oracle.log_softmax(SEED_001_X, 1), SEED_001_TARGET), rtol=1e-6)


def test_seed_001_log_softmax_rows_match_the_printed_table():
    printed = np.array(
        [
            [-2.9932, -1.0911, -0.4877],
            [-0.4934, -3.0020, -1.0795],
            [-3.9991, -0.6921, -0.7316],
            [-2.4664, -0.6293, -0.9619],
            [-1.3469, -0.7298, -1.3550],
        ]
    )
    np.testing.assert_allclose(crossent.log_softmax(SEED_001_X, axis=1), printed, atol=1.5e-4)


def test_seed_001_identities():
    x, y = SEED_001_X, SEED_001_TARGET
    ce = crossent.CrossEntropyLoss()(x, y)
    via_nll = crossent.NLLLoss()(crossent.LogSoftmax(dim=1)(x), y)
    ce_of_log_probs = crossent.CrossEntropyLoss()(crossent.LogSoftmax(dim=1)(x), y)
    twice = crossent.NLLLoss()(crossent.LogSoftmax(dim=1)(crossent.LogSoftmax(dim=1)(x)), y)
    for other in (via_nll, ce_of_log_probs, twice):
        np.testing.assert_allclose(other, ce, rtol=1e-6)


def test_seed_001_nll_picks_with_advanced_indexing():
    target = np.array([1, 2, 2, 2, 0])
    picked = SEED_001_X[np.arange(5), target]
    np.testing.assert_allclose(picked, [0.9024, 0.6434, 1.3669, 0.6591, 0.3560])
    np.testing.assert_allclose(crossent.nll_loss(SEED_001_X, target), -picked.mean(), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_seed_000_batch_of_3_records_5_classes(rng, dtype):
    x = rng.standard_normal((3, 5)).astype(dtype)
    y = rng.integers(0, 5, size=3)
    loss = crossent.cross_entropy(x, y)
    oracle.assert_close(loss, oracle.cross_entropy(x, y, want_grad=False).loss, dtype)
    oracle.assert_close(loss, notebook_loop_loss(x.astype(np.float64), y), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_seed_000_segmentation_6x3x5x5(rng, dtype):
    x = rng.standard_normal((6, 3, 5, 5)).astype(dtype)
    y = rng.integers(0, 3, size=(6, 1, 5, 5))
    loss, grad = crossent.cross_entropy_and_grad(x, y.squeeze(1))  # the notebook squeezes the label axis
    expected = oracle.cross_entropy(x, y.squeeze(1))
    oracle.assert_close(loss, expected.loss, dtype, what="loss")
    oracle.assert_close(grad, expected.grad, dtype, what="grad")
    oracle.assert_close(loss, notebook_loop_loss(x.astype(np.float64), y.squeeze(1)), dtype)


def test_stable_where_the_notebook_formula_overflows():
    x = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4 + 1.0]], dtype=np.float32)
    y = np.array([1, 2])
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        naive = -x[np.arange(2), y] + np.log(np.exp(x).sum(axis=1))
    assert not np.all(np.isfinite(naive)), "the naive form should overflow here"
    loss = crossent.cross_entropy(x, y, reduction="none")
    expected = oracle.cross_entropy(x, y, reduction="none", want_grad=False).loss
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert np.all(np.isfinite(loss))
