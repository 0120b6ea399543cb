"""The optax drop-ins on optax's own classification-loss test cases (optax/losses/_classification_test.py,
optax 0.2.8: its inputs and expected values), and against optax's functions directly."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import crossent.jax as cj  # noqa: E402

YS = np.array([[10.0, 1.0, -2.0], [1.0, 4.0, 0.2]], dtype=np.float32)
TS = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
EXPECTED = np.array([9.00013, 3.0696733], dtype=np.float32)
INT_TS = np.array([1, 0], dtype=np.int32)
ROW_MASK = np.array([True, False])
LOGIT_MASK = np.array([[1, 0, 0], [0, 0, 0]]).astype(bool)


def test_softmax_cross_entropy_values():
    np.testing.assert_allclose(jax.jit(cj.softmax_cross_entropy)(YS[0], TS[0]), EXPECTED[0], atol=1e-4)
    np.testing.assert_allclose(jax.jit(cj.softmax_cross_entropy)(YS, TS), EXPECTED, atol=1e-4)
    out = cj.softmax_cross_entropy(YS, TS)
    assert out.dtype == jnp.float32 and out.shape == (2,)
    np.testing.assert_allclose(out, optax.softmax_cross_entropy(YS, TS), rtol=1e-6)


def test_softmax_cross_entropy_masks():
    out = cj.softmax_cross_entropy(YS, TS, where=LOGIT_MASK)
    np.testing.assert_array_equal(jnp.where(jnp.any(LOGIT_MASK, -1), 0.0, out), 0)
    np.testing.assert_allclose(out, optax.softmax_cross_entropy(YS, TS, where=LOGIT_MASK), rtol=1e-6)
    gs = jax.grad(lambda x: jnp.sum(cj.softmax_cross_entropy(x, TS, where=ROW_MASK)))(YS)
    assert np.all(np.isfinite(gs)) and np.all(gs[1] == 0)
    rng = np.random.default_rng(0)
    for size in [5, 10]:
        preds, targets = rng.normal(size=size), rng.dirichlet(np.ones(size))
        mask = rng.integers(2, size=size).astype(bool)
        np.testing.assert_allclose(
            cj.softmax_cross_entropy(preds[mask], targets[mask]),
            cj.softmax_cross_entropy(preds, targets, where=mask),
            atol=1e-4,
        )


def test_softmax_cross_entropy_gradient_and_axis():
    check_grads(cj.softmax_cross_entropy, (YS.astype(np.float64), TS.astype(np.float64)), order=1, modes=["rev"])
    rng = np.random.default_rng(1)
    shape = (4, 5, 6)
    preds = rng.normal(size=shape)
    targets = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    for axis in [0, 1, 2]:
        got = cj.softmax_cross_entropy(preds, targets, axis=axis)
        np.testing.assert_allclose(
            got, cj.softmax_cross_entropy(np.moveaxis(preds, axis, -1), np.moveaxis(targets, axis, -1)), atol=1e-4
        )
        np.testing.assert_allclose(got, optax.softmax_cross_entropy(preds, targets, axis=axis), rtol=1e-10)
    np.testing.assert_allclose(
        cj.softmax_cross_entropy(preds, targets, axis=(1, 2)),
        optax.softmax_cross_entropy(preds, targets, axis=(1, 2)),
        rtol=1e-10,
    )


def test_integer_labels_values_and_masks():
    f = jax.jit(cj.softmax_cross_entropy_with_integer_labels)
    np.testing.assert_allclose(f(YS[0], INT_TS[0]), cj.softmax_cross_entropy(YS[0], jax.nn.one_hot(1, 3)), rtol=1e-6)
    np.testing.assert_allclose(f(YS, INT_TS), cj.softmax_cross_entropy(YS, jax.nn.one_hot(INT_TS, 3)), rtol=1e-6)
    np.testing.assert_allclose(f(YS, INT_TS), optax.softmax_cross_entropy_with_integer_labels(YS, INT_TS), rtol=1e-6)
    out = cj.softmax_cross_entropy_with_integer_labels(YS, INT_TS, where=LOGIT_MASK)
    np.testing.assert_array_equal(jnp.where(jnp.any(LOGIT_MASK, -1), 0.0, out), 0)
    np.testing.assert_allclose(
        out, optax.softmax_cross_entropy_with_integer_labels(YS, INT_TS, where=LOGIT_MASK), rtol=1e-6
    )
    loss = lambda x: jnp.sum(cj.softmax_cross_entropy_with_integer_labels(x, INT_TS, where=ROW_MASK))  # noqa: E731
    assert np.all(np.isfinite(jax.grad(loss)(YS)))
    check_grads(
        lambda x: cj.softmax_cross_entropy_with_integer_labels(x, INT_TS), (YS.astype(np.float64),), order=1,
        modes=["rev"],
    )  # fmt: skip


def test_integer_labels_axis_and_axes():
    rng = np.random.default_rng(2)
    shape = (4, 5, 6)
    preds = rng.normal(size=shape)
    for axis in [0, 1, 2]:
        targets = rng.integers(shape[axis], size=shape[:axis] + shape[axis + 1 :])
        got = cj.softmax_cross_entropy_with_integer_labels(preds, targets, axis=axis)
        np.testing.assert_allclose(
            got, cj.softmax_cross_entropy_with_integer_labels(np.moveaxis(preds, axis, -1), targets), atol=1e-4
        )
        np.testing.assert_allclose(got, optax.softmax_cross_entropy_with_integer_labels(preds, targets, axis=axis))
    shape = (2, 3, 4, 5)
    logits = rng.uniform(size=shape)
    for axis in [(1, 3), (3, 2), (-3, -1), (0, 1, 3)]:
        canon = tuple(a % 4 for a in axis)
        batch = tuple(s for i, s in enumerate(shape) if i not in canon)
        labels = rng.integers(0, int(np.prod([shape[a] for a in canon])), size=batch)
        np.testing.assert_allclose(
            cj.softmax_cross_entropy_with_integer_labels(logits, labels, axis),
            optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis),
            rtol=1e-10,
        )


def test_integer_labels_out_of_range_and_no_ignore_index():
    with pytest.raises(IndexError, match="out of range"):
        cj.softmax_cross_entropy_with_integer_labels(YS, np.array([1, -100]))
    out = jax.jit(cj.softmax_cross_entropy_with_integer_labels)(YS, jnp.array([1, -100]))
    assert np.isfinite(out[0]) and np.isnan(out[1])
    out = jax.jit(cj.softmax_cross_entropy_with_integer_labels)(YS, jnp.array([1, np.iinfo(np.int64).min]))
    assert np.isnan(out[1])


def test_integer_labels_error_speaks_optax_terms():
    # Issue #17: labels, the number of classes, what was expected and the bad value; no ignore_index.
    with pytest.raises(IndexError, match=r"^labels value 7 is out of range for 3 classes: expected 0 <= labels < 3$"):
        cj.softmax_cross_entropy_with_integer_labels(YS, np.array([1, 7]))
    with pytest.raises(IndexError, match=r"labels value -1 .*expected 0 <= labels < 12$"):
        cj.softmax_cross_entropy_with_integer_labels(np.zeros((2, 3, 4), np.float32), np.array([-1, 0]), axis=(1, 2))


def test_minus_inf_logit_with_zero_probability_gives_zero_where_optax_gives_nan():
    # The documented difference: 0 * log 0 is 0 here (the limit), NaN in optax.softmax_cross_entropy.
    logits = jnp.array([[0.0, -jnp.inf, 1.0]])
    labels = jnp.array([[0.5, 0.0, 0.5]])
    want = 0.5 * -np.log(1 / (1 + np.e)) + 0.5 * -np.log(np.e / (1 + np.e))  # float64 math
    np.testing.assert_allclose(cj.softmax_cross_entropy(logits, labels), [want], rtol=1e-6)
    assert np.isnan(optax.softmax_cross_entropy(logits, labels)[0])
