"""crossent.jax.linear_cross_entropy against cross_entropy(hidden @ kernel + bias): values and gradients
for hidden, kernel and bias, invariant to the chunk size; and its compiled memory."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import crossent.jax as cj  # noqa: E402
import oracle  # noqa: E402

OPTIONS = [
    {"reduction": "mean"},
    {"reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-3},
    {"reduction": "none", "softcap": 5.0},
    {"reduction": "mean", "normalizer": 11.0, "label_smoothing": 0.2, "weighted": True},
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_linear_matches_the_logits_loss_for_every_chunk_size(rng, options):
    options = dict(options)
    weighted = options.pop("weighted", False)
    n, d, v = 23, 6, 17
    h, k, b = rng.standard_normal((n, d)), rng.standard_normal((d, v)), rng.standard_normal(v)
    y = rng.integers(0, v, n)
    y[[2, 5]] = -100
    if weighted:
        options["weight"] = 0.5 + rng.random(v)
    ct = rng.standard_normal(n) if options["reduction"] == "none" else np.asarray(0.7)

    def naive(h, k, b):
        return cj.cross_entropy(h @ k + b, y, **options)

    want, pull = jax.vjp(naive, h, k, b)
    want_grads = pull(ct)
    # The oracle for the values themselves: torch's loss of the same logits.
    kw = {key: val for key, val in options.items()}
    expected = oracle.cross_entropy(h @ k + b, y, **kw, want_grad=False)
    oracle.assert_close(want, expected.loss, np.float64)
    # Rows per chunk and classes per vocabulary chunk (None: whole rows): one chunk, uneven ones, one
    # row or class at a time, a last vocabulary chunk that overlaps the one before (17 = 5 + 5 + 5 + 2).
    for chunk, vchunk in [(1, None), (7, None), (100, None), (4, 5), (23, 1), (7, 16), (100, 17)]:
        got, pull = jax.vjp(
            jax.jit(lambda h, k, b, c=chunk, vc=vchunk: cj.linear_cross_entropy(
                h, k, y, bias=b, chunk_size=c, vocab_chunk_size=vc, **options)),
            h, k, b,
        )  # fmt: skip
        what = f"chunk={chunk} vocab_chunk={vchunk}"
        oracle.assert_close(got, expected.loss, np.float64, what=f"loss {what}")
        for name, g, e in zip(["hidden", "kernel", "bias"], pull(ct), want_grads, strict=True):
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12, err_msg=f"{name} {what}")


def test_linear_batch_shape_float32_and_no_bias(rng):
    h = rng.standard_normal((2, 5, 8)).astype(np.float32)
    k = rng.standard_normal((8, 30)).astype(np.float32)
    y = rng.integers(0, 30, (2, 5))
    got = jax.jit(lambda h, k: cj.linear_cross_entropy(h, k, y, reduction="none", chunk_size=3))(h, k)
    assert got.shape == (2, 5) and got.dtype == jnp.float32
    expected = oracle.cross_entropy((h.astype(np.float64) @ k).reshape(10, 30), y.reshape(10), reduction="none")
    oracle.assert_close(np.asarray(got).reshape(10), expected.loss, np.float32, scale=10)
    gk = jax.grad(lambda k: cj.linear_cross_entropy(h, k, y))(k)
    assert gk.shape == k.shape and gk.dtype == jnp.float32


def test_linear_out_of_range_labels(rng):
    h, k = rng.standard_normal((4, 3)), rng.standard_normal((3, 5))
    with pytest.raises(IndexError, match="target value 5"):
        cj.linear_cross_entropy(h, k, np.array([0, 5, 1, 2]))
    f = jax.jit(jax.value_and_grad(lambda h, y: cj.linear_cross_entropy(h, k, y), argnums=0))
    loss, g = f(h, jnp.array([0, 5, 1, 2]))
    assert np.isnan(loss) and np.all(np.isnan(g[1]))
    f = jax.jit(jax.value_and_grad(lambda h, y: cj.linear_cross_entropy(h, k, y, vocab_chunk_size=2), argnums=0))
    loss, g = f(h, jnp.array([0, 5, 1, 2]))
    assert np.isnan(loss) and np.all(np.isnan(g[1]))


def test_linear_compiled_memory_is_a_fraction_of_the_naive_loss():
    # A deterministic figure (no timing): the temporary memory XLA plans for value_and_grad.
    n, d, v = 512, 64, 8192
    h, k = jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp(fn):
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        return step.lower(h, k, y).compile().memory_analysis().temp_size_in_bytes

    naive = temp(lambda h, k, y: cj.cross_entropy(h @ k, y))
    linear = temp(lambda h, k, y: cj.linear_cross_entropy(h, k, y, chunk_size=16))
    kernel_grad = d * v * 4  # the float32 accumulator of d/d kernel, the size of a gradient returned
    assert naive >= 2 * n * v * 4  # the logits and their gradient
    assert linear - kernel_grad <= 0.1 * naive, (linear, naive)


def _oracle_linear(h, k, b, y, options, ct):
    """The oracle for the linear loss: torch's loss of h @ k + b in float64, and the gradients of h, k and
    b from torch's gradient G of the logits (h's: G k^T, k's: h^T G, b's: the column sums of G)."""
    expected = oracle.cross_entropy(h @ k + b, y, **options, grad_output=ct)
    g = expected.grad
    return expected.loss, (g @ k.T, h.T @ g, g.sum(axis=0))


@pytest.mark.parametrize(
    "options",
    [{"reduction": "mean"}, {"reduction": "mean", "zero_if_all_ignored": True}, {"reduction": "sum"},
     {"reduction": "none"}, {"reduction": "sum", "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("chunks", [{}, {"chunk_size": 4}, {"vocab_chunk_size": 3}], ids=str)
def test_linear_empty_batch_matches_the_oracle(options, chunks):
    # N = 0 (issue #17: a ZeroDivisionError in the chunk reshape): the loss torch gives for empty logits
    # (mean: NaN, or 0 with zero_if_all_ignored; sum: 0; none: empty) and gradients of the right shapes.
    d, v = 3, 5
    h, k, b, y = np.zeros((0, d)), np.arange(d * v, dtype=np.float64).reshape(d, v) / 10, np.ones(v), np.zeros(0, int)
    ct = np.zeros(0) if options["reduction"] == "none" else np.asarray(1.0)
    want, want_grads = _oracle_linear(h, k, b, y, options, ct)
    for wrap in (lambda f: f, jax.jit):
        f = wrap(lambda h, k, b: cj.linear_cross_entropy(h, k, y, bias=b, **options, **chunks))
        got, pull = jax.vjp(f, h, k, b)
        oracle.assert_close(got, want, np.float64, what="loss")
        for name, g, e in zip(["hidden", "kernel", "bias"], pull(np.asarray(ct)), want_grads, strict=True):
            oracle.assert_close(g, e, np.float64, what=name)


@pytest.mark.parametrize("backend", ["jnp", "auto"])
@pytest.mark.parametrize(
    "options",
    [{"reduction": "mean"}, {"reduction": "none", "softcap": 3.0}, {"reduction": "mean", "zero_if_all_ignored": True},
     {"reduction": "sum", "label_smoothing": 0.2, "z_loss": 1e-2}],
    ids=str,
)  # fmt: skip
def test_linear_gradients_against_the_oracle_on_each_backend(rng, backend, options):
    # Each chunk's loss and unit gradient come from the backend's loss (the native kernel in place on the
    # CPU, or the reference); the rows' upstream gradients scale hidden's rows. Ignored rows, an
    # all-ignored chunk (rows 8..11 with chunk_size=4) and a padded last chunk.
    n, d, v = 14, 5, 9
    h, k, b = rng.standard_normal((n, d)), rng.standard_normal((d, v)), rng.standard_normal(v)
    y = rng.integers(0, v, n)
    y[[1, 8, 9, 10, 11]] = -100
    ct = rng.standard_normal(n) if options["reduction"] == "none" else np.asarray(1.3)
    want, want_grads = _oracle_linear(h, k, b, y, options, ct)
    with cj.use_backend(backend):
        f = jax.jit(lambda h, k, b: cj.linear_cross_entropy(h, k, y, bias=b, chunk_size=4, **options))
        got, pull = jax.vjp(f, h, k, b)
        grads = pull(jnp.asarray(ct))
    oracle.assert_close(got, want, np.float64, what="loss")
    for name, g, e in zip(["hidden", "kernel", "bias"], grads, want_grads, strict=True):
        oracle.assert_close(g, e, np.float64, what=name)


def test_linear_all_ignored_mean_gradient_is_zero_or_nan_as_the_oracle(rng):
    h, k = rng.standard_normal((6, 3)), rng.standard_normal((3, 4))
    y = np.full(6, -100)
    for zero in (False, True):
        want, want_grads = _oracle_linear(h, k, np.zeros(4), y, {"zero_if_all_ignored": zero}, np.asarray(1.0))
        got, grads = jax.value_and_grad(
            lambda h, k, zero=zero: cj.linear_cross_entropy(h, k, y, chunk_size=4, zero_if_all_ignored=zero),
            argnums=(0, 1),
        )(h, k)
        oracle.assert_close(got, want, np.float64, what=f"loss zero_if_all_ignored={zero}")
        for g, e in zip(grads, want_grads[:2], strict=True):
            oracle.assert_close(g, e, np.float64, what=f"grad zero_if_all_ignored={zero}")
