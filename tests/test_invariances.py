"""Properties that hold for any input: shift invariance, idempotence, layouts, masks, stability."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import crossent
import oracle

logit_rows = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
    elements=st.floats(-50, 50, allow_nan=False),
)


@given(logit_rows, st.floats(-1e3, 1e3))
def test_shift_by_a_constant_changes_nothing(x, shift):
    y = np.arange(x.shape[0]) % x.shape[1]
    base, base_grad = crossent.cross_entropy_and_grad(x, y, label_smoothing=0.1)
    moved, moved_grad = crossent.cross_entropy_and_grad(x + shift, y, label_smoothing=0.1)
    np.testing.assert_allclose(moved, base, rtol=1e-9, atol=1e-9 * (1 + abs(shift)))
    np.testing.assert_allclose(moved_grad, base_grad, atol=1e-9 * (1 + abs(shift)))


@given(logit_rows)
def test_log_softmax_is_idempotent_so_ce_of_log_probs_equals_ce(x):
    y = np.arange(x.shape[0]) % x.shape[1]
    log_probs = crossent.log_softmax(x, axis=1)
    np.testing.assert_allclose(crossent.log_softmax(log_probs, axis=1), log_probs, atol=1e-12 * (1 + np.abs(x).max()))
    np.testing.assert_allclose(
        crossent.cross_entropy(log_probs, y), crossent.cross_entropy(x, y), rtol=1e-10, atol=1e-10
    )
    np.testing.assert_allclose(crossent.nll_loss(log_probs, y), crossent.cross_entropy(x, y), rtol=1e-12, atol=1e-12)


@given(st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_axis_on_moved_layout_equals_default_layout(position, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 5, 4, 2))  # classes on axis 1
    y = rng.integers(0, 5, size=(3, 4, 2))
    moved = np.moveaxis(x, 1, position)
    w = rng.random(5)
    kwargs = {"weight": w, "label_smoothing": 0.2, "z_loss": 0.01, "reduction": "sum"}
    base, base_grad = crossent.cross_entropy_and_grad(x, y, **kwargs)
    # moveaxis keeps the other axes in order, so the target is the same array for every position
    got, got_grad = crossent.cross_entropy_and_grad(moved, y, axis=position, **kwargs)
    np.testing.assert_allclose(got, base, rtol=1e-12)
    np.testing.assert_allclose(got_grad, np.moveaxis(base_grad, 1, position), rtol=1e-12, atol=1e-15)


@given(st.integers(0, 2**32 - 1), st.booleans())
def test_ignoring_rows_equals_removing_them(seed, weighted):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((9, 4))
    y = rng.integers(0, 4, size=9)
    drop = rng.random(9) < 0.4
    drop[0] = False
    w = rng.random(4) + 0.1 if weighted else None
    masked, masked_grad = crossent.cross_entropy_and_grad(x, np.where(drop, -100, y), w, label_smoothing=0.3)
    kept, kept_grad = crossent.cross_entropy_and_grad(x[~drop], y[~drop], w, label_smoothing=0.3)
    np.testing.assert_allclose(masked, kept, rtol=1e-12)
    np.testing.assert_allclose(masked_grad[~drop], kept_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(masked_grad[drop], 0.0)


def test_normalizer_sums_micro_batches_into_the_full_batch_mean(rng):
    x = rng.standard_normal((12, 7))
    y = np.where(rng.random(12) < 0.3, -100, rng.integers(0, 7, size=12))
    count = float(np.sum(y != -100))
    full, full_grad = crossent.cross_entropy_and_grad(x, y)
    parts = [crossent.cross_entropy_and_grad(x[s], y[s], normalizer=count) for s in (slice(0, 5), slice(5, 12))]
    np.testing.assert_allclose(sum(p[0] for p in parts), full, rtol=1e-12)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), full_grad, rtol=1e-12)


@given(st.sampled_from([np.float32, np.float64]), st.sampled_from([1e4, -1e4, 3e4]))
def test_stable_at_huge_logits(dtype, magnitude):
    rng = np.random.default_rng(0)
    x = (magnitude + rng.standard_normal((6, 5))).astype(dtype)
    y = rng.integers(0, 5, size=6)
    loss, grad = crossent.cross_entropy_and_grad(x, y, label_smoothing=0.1)
    expected = oracle.cross_entropy(x.astype(np.float64), y, label_smoothing=0.1)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    # float32 holds 1e4 to 1e-3, so the shifted logits are only that exact: compare at that scale
    oracle.assert_close(loss, expected.loss, dtype, scale=abs(magnitude) * 1e-2)
    oracle.assert_close(grad, expected.grad, dtype, scale=abs(magnitude) * 1e-2)
    assert np.isfinite(crossent.logsumexp(x)).all()
    np.testing.assert_allclose(crossent.softmax(x).sum(axis=-1), 1.0, rtol=1e-6)


def test_gradient_is_softmax_minus_one_hot_over_n(rng):
    x = rng.standard_normal((6, 4))
    y = rng.integers(0, 4, size=6)
    _, grad = crossent.cross_entropy_and_grad(x, y)
    np.testing.assert_allclose(grad, (crossent.softmax(x, axis=1) - np.eye(4)[y]) / 6, rtol=1e-12, atol=1e-15)
