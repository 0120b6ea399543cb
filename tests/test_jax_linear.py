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
