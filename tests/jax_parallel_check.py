"""crossent.jax's vocabulary-parallel losses under shard_map over 4 host devices, against the
single-device loss. Run by test_jax_parallel.py in its own process: the device count is fixed when JAX
initialises (XLA_FLAGS=--xla_force_host_platform_device_count=4), which the rest of the suite must not
see. Exits non-zero (an AssertionError naming the case) on the first disagreement."""

from __future__ import annotations

import itertools
import os

import numpy as np

assert "--xla_force_host_platform_device_count=4" in os.environ.get("XLA_FLAGS", ""), "run via test_jax_parallel.py"

import jax  # noqa: E402
import jax.extend  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import crossent.jax as cj  # noqa: E402

MESH = jax.sharding.Mesh(np.array(jax.devices()), ("v",))
SIZES = [3, 7, 4, 6]  # an uneven split of 20 classes, padded to width 7 on every device
WIDTH = max(SIZES)
STARTS = list(itertools.accumulate([0, *SIZES[:-1]]))


def collectives(jaxpr) -> dict[str, int]:
    counts: dict[str, int] = {}

    def walk(j):
        for eqn in j.eqns:
            name = eqn.primitive.name
            if name.startswith(("pmax", "psum", "all_gather", "ppermute", "all_to_all", "pmin")):
                counts[name] = counts.get(name, 0) + 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return counts


def padded(a: np.ndarray) -> np.ndarray:
    """(..., 20) -> (..., 4 * WIDTH): each device's classes, then zeros to WIDTH."""
    parts = [
        np.pad(a[..., s : s + n], [(0, 0)] * (a.ndim - 1) + [(0, WIDTH - n)])
        for s, n in zip(STARTS, SIZES, strict=True)
    ]
    return np.concatenate(parts, axis=-1)


def unpadded(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[..., i * WIDTH : i * WIDTH + n] for i, n in enumerate(SIZES)], axis=-1)


def sharded(fn, uneven: bool, probability: bool, **kw):
    def local(x, y, w):
        extra = {}
        if uneven:
            i = jax.lax.axis_index("v")
            extra = {"vocab_start": jnp.array(STARTS)[i], "local_size": jnp.array(SIZES)[i], "vocab_size": 20}
        return fn(x, y, "v", weight=w, **extra, **kw)

    y_spec = P(None, "v") if probability else P()
    return jax.shard_map(local, mesh=MESH, in_specs=(P(None, "v"), y_spec, P()), out_specs=P())


def check(rng, uneven, probability, **kw):
    n = 9
    x = 3 * rng.standard_normal((n, 20))
    x[0, :10] = -np.inf  # a row whose first slices are all -inf (issue 16 item 3)
    if probability:
        t = rng.random((n, 20))
        y = t / t.sum(1, keepdims=True)
    else:
        y = rng.integers(0, 20, n)
        y[0] = 15
        y[2] = -100
    w = 0.5 + rng.random(20)
    single = lambda x: cj.cross_entropy(x, y, w, **kw)  # noqa: E731
    want, want_g = jax.value_and_grad(lambda x: jnp.sum(single(x)))(x)
    xs, ys = (padded(x), padded(y) if probability else y) if uneven else (x, y)
    f = sharded(cj.vocab_parallel_cross_entropy, uneven, probability, **kw)
    got, got_g = jax.jit(jax.value_and_grad(lambda x: jnp.sum(f(x, ys, w))))(xs)
    got_g = np.asarray(got_g)
    if uneven:
        assert np.all(unpadded(np.ones_like(got_g)) == 1)
        pad_g = got_g.copy()
        for i, s in enumerate(SIZES):
            pad_g[:, i * WIDTH : i * WIDTH + s] = 0
        assert np.all(pad_g == 0), "padding columns got a gradient"
        got_g = unpadded(got_g)
    what = f"uneven={uneven} probability={probability} {kw}"
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=what)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-10, atol=1e-12, err_msg=what)
    assert np.all(np.isfinite(got_g)), what
    counts = collectives(jax.make_jaxpr(f)(xs, ys, w))
    assert sum(counts.values()) == 2 and len(counts) == 2, f"{what}: forward collectives {counts}"


def check_linear(rng):
    h = rng.standard_normal((6, 5))
    k = rng.standard_normal((5, 20))
    b = rng.standard_normal(20)
    y = rng.integers(0, 20, 6)
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3}

    def single(h, k, b):
        return cj.cross_entropy(h @ k + b, y, **kw)

    f = jax.shard_map(
        lambda h, k, b: cj.vocab_parallel_linear_cross_entropy(h, k, y, "v", local_bias=b, **kw),
        mesh=MESH, in_specs=(P(), P(None, "v"), P("v")), out_specs=P(),
    )  # fmt: skip
    want, want_g = jax.value_and_grad(single, argnums=(0, 1, 2))(h, k, b)
    got, got_g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, k, b)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    for a, e in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-9, atol=1e-12)


def check_out_of_range_is_nan(rng):
    x = rng.standard_normal((3, 20))
    f = sharded(cj.vocab_parallel_cross_entropy, False, False, reduction="none")
    got = np.asarray(jax.jit(f)(x, jnp.array([0, 25, 3]), jnp.ones(20)))
    assert np.isnan(got[1]) and np.all(np.isfinite(got[[0, 2]])), got


def check_data_parallel(rng):
    # The plain loss inside shard_map over rows: each device's sum over the global count of targets.
    x = rng.standard_normal((12, 5))
    y = rng.integers(0, 5, 12)
    y[[1, 7]] = -100
    count = jnp.sum(y != -100).astype(x.dtype)

    def local(x, y):
        return jax.lax.psum(cj.cross_entropy(x, y, normalizer=count, label_smoothing=0.1), "v")

    f = jax.shard_map(local, mesh=MESH, in_specs=(P("v"), P("v")), out_specs=P())
    want, want_g = jax.value_and_grad(lambda x: cj.cross_entropy(x, y, label_smoothing=0.1))(x)
    got, got_g = jax.jit(jax.value_and_grad(lambda x: f(x, y)))(x)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-10, atol=1e-14)


def main() -> None:
    assert jax.device_count() == 4
    rng = np.random.default_rng(7)
    options = [
        {},
        {"reduction": "sum", "label_smoothing": 0.2},
        {"reduction": "none", "z_loss": 1e-3, "softcap": 4.0},
        {"label_smoothing": 0.1, "normalizer": 7.0},
    ]
    for uneven, probability, kw in itertools.product([False, True], [False, True], options):
        check(rng, uneven, probability, **kw)
    check_linear(rng)
    check_data_parallel(rng)
    check_out_of_range_is_nan(rng)
    print("ok")


if __name__ == "__main__":
    main()
