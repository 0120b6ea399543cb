"""crossent's kernel inside jitted JAX programs (XLA FFI, crossent.jax._ffi): the same bits as the kernel
called from NumPy, the float64 torch oracle's values, NaN where a value cannot be checked, vmap, threads.

Skipped only where jax is not installed; with jax installed the FFI handlers must be built (CI installs
jax before crossent), so a build that lost them fails here.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed: nothing to run the XLA FFI handlers")
jax.config.update("jax_enable_x64", True)  # float64 logits and int64 targets
jnp = jax.numpy
ml_dtypes = pytest.importorskip("ml_dtypes")

import crossent  # noqa: E402
import oracle  # noqa: E402
from crossent import _native  # noqa: E402
from crossent._validate import LossOptions, LossShape  # noqa: E402
from crossent.jax import _ffi  # noqa: E402

DTYPES = ["float32", "float64", "float16", "bfloat16"]
# (shape, class axis): (N, C), (N, C, d1, d2), and classes last of (B, T, C).
LAYOUTS = [((37, 11), 1), ((3, 7, 5, 4), 1), ((4, 6, 13), 2)]


def test_handlers_built_and_registered() -> None:
    ext = _native.extension
    assert ext is not None, f"the native kernel did not load: {_native.load_error}"
    assert hasattr(ext, "xla_targets"), (
        "crossent was built without its XLA FFI handlers although jax is installed: install jax before "
        'crossent (pip install jax && pip install ".[test]"), or set CROSSENT_XLA_FFI_INCLUDE'
    )
    assert _ffi.available()
    assert crossent.config()["xla_ffi"].startswith("built and registered")


def _np_dtype(name: str) -> Any:
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _split(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def _data(shape: tuple[int, ...], axis: int, dtype: str, *, probability: bool, seed: int = 0, ignore: int = -100):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(_np_dtype(dtype))
    batch = shape[:axis] + shape[axis + 1 :]
    if probability:
        p = rng.random(shape)
        target = (p / p.sum(axis=axis, keepdims=True)).astype(x.dtype)
    else:
        target = rng.integers(0, shape[axis], batch)
        target.reshape(-1)[::5] = ignore
    weight = rng.uniform(0.2, 2.0, shape[axis])
    return x, target, weight


def _ffi_loss(x, target, weight, normalizer, axis, opts, *, probability, want_grad=True, jit=True):
    outer, classes, inner = _split(x.shape, axis)
    cdt = np.float64 if x.dtype == np.float64 else np.float32

    def f(x, target, weight, normalizer):
        t = target.reshape((outer, classes, inner) if probability else (outer, inner))
        return _ffi.cross_entropy_fwd(
            x.reshape(outer, classes, inner), t, weight, normalizer, outer=outer, classes=classes, inner=inner,
            probability=probability, opts=opts, want_grad=want_grad,
        )  # fmt: skip

    w = None if weight is None else jnp.asarray(weight, cdt)
    n = None if normalizer is None else jnp.asarray(normalizer, cdt)
    loss, grad = (jax.jit(f) if jit else f)(jnp.asarray(x), jnp.asarray(target), w, n)
    batch = x.shape[:axis] + x.shape[axis + 1 :]
    loss = np.asarray(loss).reshape(batch) if opts.reduction == "none" else np.asarray(loss)
    return loss, (None if grad is None else np.asarray(grad).reshape(x.shape))


def _numpy_kernel(x, target, weight, axis, opts, *, probability):
    shape = LossShape(axis, x.shape[axis], x.shape[:axis] + x.shape[axis + 1 :], probability)
    unit = np.ones(shape.batch_shape) if opts.reduction == "none" else None
    return _native.KERNEL.cross_entropy_and_grad(x, target, weight, shape, opts, unit)


def _ffi_nll(x, target, weight, opts, outer, classes, inner):
    def f(a, t, w):
        t = t.reshape(outer, inner)
        return _ffi.nll_loss_fwd(
            a.reshape(outer, classes, inner), t, w, None, outer=outer, classes=classes, inner=inner, opts=opts
        )

    return np.asarray(jax.jit(f)(jnp.asarray(x), jnp.asarray(target), weight))


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def _assert_same_bits(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {actual.dtype}{actual.shape} != {expected.dtype}{expected.shape}"
    )
    diff = np.flatnonzero(_bits(actual) != _bits(expected))
    assert diff.size == 0, f"{what}: {diff.size} elements differ, first at {diff[0]}: " + (
        f"{actual.reshape(-1)[diff[0]]} != {expected.reshape(-1)[diff[0]]}"
    )


OPTION_CASES = {
    "plain": ({}, False, False),
    "weight+ignore": ({"ignore_index": 2}, True, False),
    "smoothing+weight": ({"label_smoothing": 0.1}, True, False),
    "z_loss+softcap": ({"z_loss": 1e-3, "softcap": 5.0}, False, False),
    "normalizer": ({}, False, True),
    "zero_if_all_ignored": ({"zero_if_all_ignored": True, "label_smoothing": 0.05}, True, False),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("layout", LAYOUTS, ids=["NC", "NCd", "axis-1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_same_bits_as_numpy_kernel_and_oracle_values(dtype, layout, case, reduction) -> None:
    shape, axis = layout
    extra, with_weight, with_normalizer = OPTION_CASES[case]
    for probability in (False, True):
        if probability and (extra.get("ignore_index") is not None or extra.get("zero_if_all_ignored")):
            continue
        x, target, weight = _data(shape, axis, dtype, probability=probability, ignore=extra.get("ignore_index", -100))
        w = weight if with_weight else None
        normalizer = 7.5 if with_normalizer else None
        opts = LossOptions(reduction=reduction, normalizer=normalizer, **extra)
        loss, grad = _ffi_loss(x, target, w, normalizer, axis, opts, probability=probability)
        ref_loss, ref_grad = _numpy_kernel(x, target, w, axis, opts, probability=probability)
        what = f"{dtype} {shape} axis={axis} {case} {reduction} probability={probability}"
        _assert_same_bits(loss, ref_loss, f"loss {what}")
        _assert_same_bits(grad, ref_grad, f"grad {what}")
        if dtype != "float64" and case != "plain":
            continue  # the oracle over the whole grid is test_parity's; here float64, and plain in every dtype
        kw = {k: v for k, v in extra.items() if k != "zero_if_all_ignored"}
        if extra.get("zero_if_all_ignored"):
            kw["zero_if_all_ignored"] = True
        o = oracle.cross_entropy(
            np.asarray(x, np.float64), target if not probability else np.asarray(target, np.float64),
            None if w is None else w, reduction=reduction, axis=axis, normalizer=normalizer,
            grad_output=np.ones(loss.shape) if reduction == "none" else None, **kw,
        )  # fmt: skip
        oracle.assert_close(loss, o.loss, x.dtype, what=f"oracle loss {what}")
        oracle.assert_close(grad, o.grad, x.dtype, what=f"oracle grad {what}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nll_loss_same_bits_as_numpy_kernel(dtype, reduction) -> None:
    shape, axis = (5, 9, 6), 1
    x, target, weight = _data(shape, axis, dtype, probability=False)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(x, np.float64), axis=axis)).astype(x.dtype)
    outer, classes, inner = _split(shape, axis)
    for w in (None, weight):
        opts = LossOptions(reduction=reduction)
        cdt = np.float64 if dtype == "float64" else np.float32
        loss = _ffi_nll(logp, target, None if w is None else jnp.asarray(w, cdt), opts, outer, classes, inner)
        lshape = LossShape(axis, classes, shape[:axis] + shape[axis + 1 :], False)
        expected = _native.KERNEL.nll_loss(logp, target, w, lshape, opts)
        _assert_same_bits(loss.reshape(expected.shape), expected, f"nll {dtype} {reduction} weight={w is not None}")


@pytest.mark.parametrize("op", ["log_softmax", "softmax", "logsumexp"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["NC", "NCd", "axis-1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_ops_same_bits_as_numpy_kernel(dtype, layout, op) -> None:
    shape, axis = layout
    x, _, _ = _data(shape, axis, dtype, probability=False)
    outer, classes, inner = _split(shape, axis)

    def f(a):
        return _ffi.softmax_op(a.reshape(outer, classes, inner), outer=outer, classes=classes, inner=inner, op=op)

    out = jax.jit(f)(jnp.asarray(x))
    out = np.asarray(out)
    if op == "logsumexp":
        expected = _native.KERNEL.logsumexp(x, axis, False)
        out = out.reshape(expected.shape)
    else:
        expected = getattr(_native.KERNEL, op)(x, axis)
        out = out.reshape(shape)
    _assert_same_bits(out, expected, f"{op} {dtype} {shape}")
    if dtype == "float64" and op == "log_softmax":
        oracle.assert_close(out, oracle.log_softmax(x, axis), x.dtype, what="log_softmax oracle")


def test_subnormal_results_as_from_numpy() -> None:
    # XLA may run CPU programs with denormals flushed to zero; the handler keeps IEEE arithmetic, so a
    # gradient with subnormal elements (softmax near exp(-86) divided by the row count) keeps them.
    x = np.zeros((64, 33), np.float32)
    x[:, 1:] = -np.linspace(84, 87, 32, dtype=np.float32)
    target = np.zeros(64, np.int64)
    loss, grad = _ffi_loss(x, target, None, None, 1, LossOptions(), probability=False)
    ref_loss, ref_grad = _numpy_kernel(x, target, None, 1, LossOptions(), probability=False)
    assert np.count_nonzero((ref_grad != 0) & (np.abs(ref_grad) < np.finfo(np.float32).tiny)) > 0
    _assert_same_bits(grad, ref_grad, "gradient with subnormal elements")
    _assert_same_bits(loss, ref_loss, "loss")


@pytest.mark.parametrize("target_dtype", ["int32", "int64", "uint8"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_out_of_range_class_index_gives_nan(target_dtype, reduction) -> None:
    shape, axis = (12, 5, 3), 1
    x, target, _ = _data(shape, axis, "float32", probability=False)
    target = np.where(target < 0, 0, target).astype(target_dtype)
    bad = 200 if target_dtype == "uint8" else (-7 if target_dtype == "int32" else 2**40)
    target[3, 1] = bad
    target[7, 2] = 5  # == classes
    opts = LossOptions(reduction=reduction)
    loss, grad = _ffi_loss(x, target, None, None, axis, opts, probability=False)
    assert grad is not None
    if reduction != "none":
        assert np.isnan(loss) and np.isnan(grad).all()
        return
    rows_bad = np.zeros((12, 3), bool)
    rows_bad[3, 1] = rows_bad[7, 2] = True
    assert np.isnan(loss[rows_bad]).all() and np.isnan(grad.transpose(0, 2, 1)[rows_bad]).all()
    # The other rows are the kernel's, bit for bit (rows of reduction none do not depend on each other).
    good = np.where(rows_bad, 0, target)
    ref_loss, ref_grad = _numpy_kernel(x, good, None, axis, opts, probability=False)
    _assert_same_bits(loss[~rows_bad], ref_loss[~rows_bad], "good rows' loss")
    _assert_same_bits(grad.transpose(0, 2, 1)[~rows_bad], ref_grad.transpose(0, 2, 1)[~rows_bad], "good rows' grad")


def test_out_of_range_nll_and_unsigned_without_wrapping() -> None:
    x, target, _ = _data((6, 4), 1, "float32", probability=False)
    target = np.where(target < 0, 1, target).astype(np.uint32)
    target[2] = 2**32 - 100  # as int32 this would be -100, the default ignore_index: must not be ignored
    for reduction in ("mean", "none"):
        opts = LossOptions(reduction=reduction)
        loss, _ = _ffi_loss(x, target, None, None, 1, opts, probability=False, want_grad=False)
        if reduction == "mean":
            assert np.isnan(loss)
        else:
            assert np.isnan(loss[2]) and np.isfinite(loss[[0, 1, 3]]).all()
        nll = _ffi_nll(x, target, None, opts, 6, 4, 1)
        assert np.isnan(nll).all() if reduction == "mean" else np.isnan(nll.reshape(6)[2])


@pytest.mark.parametrize("value", [-2.0, float("nan"), float("inf")])
def test_normalizer_negative_or_not_finite_gives_nan(value) -> None:
    x, target, _ = _data((6, 4), 1, "float32", probability=False)
    loss, grad = _ffi_loss(x, target, None, value, 1, LossOptions(), probability=False)
    assert np.isnan(loss) and np.isnan(grad).all()


@pytest.mark.parametrize("zero_if_all_ignored", [False, True])
def test_normalizer_zero_divides_by_zero(zero_if_all_ignored) -> None:
    # 0 means what it means on every path (issue 16, item 2): the sum over 0, or 0 with
    # zero_if_all_ignored, loss and gradient alike.
    x, target, _ = _data((6, 4), 1, "float32", probability=False)
    opts = LossOptions(zero_if_all_ignored=zero_if_all_ignored)
    loss, grad = _ffi_loss(x, target, None, 0.0, 1, opts, probability=False)
    expected_opts = LossOptions(normalizer=0.0, zero_if_all_ignored=zero_if_all_ignored)
    expected, expected_grad = _numpy_kernel(x, target, None, 1, expected_opts, probability=False)
    _assert_same_bits(loss, expected, "loss")
    _assert_same_bits(grad, expected_grad, "gradient")
    if zero_if_all_ignored:
        assert loss == 0 and not grad.any()
    else:
        assert np.isposinf(loss)


def test_traced_normalizer() -> None:
    x, target, _ = _data((16, 10), 1, "float32", probability=False)
    opts = LossOptions()

    @jax.jit
    def f(x, t, n):
        kw = {"outer": 16, "classes": 10, "inner": 1, "probability": False, "opts": opts, "want_grad": False}
        return _ffi.cross_entropy_fwd(x.reshape(16, 10, 1), t.reshape(16, 1), None, n * 2.0, **kw)[0]

    got = np.asarray(f(jnp.asarray(x), jnp.asarray(target), jnp.float32(3.0)))
    expected, _ = _numpy_kernel(x, target, None, 1, LossOptions(normalizer=6.0), probability=False)
    _assert_same_bits(got, expected, "normalizer computed in the program")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vmap_matches_one_call_per_item(reduction) -> None:
    B, shape, axis = 3, (8, 6, 5), 1
    xs = np.stack([_data(shape, axis, "float32", probability=False, seed=s)[0] for s in range(B)])
    ts = np.stack([_data(shape, axis, "float32", probability=False, seed=10 + s)[1] for s in range(B)])
    _, _, weight = _data(shape, axis, "float32", probability=False)
    ns = np.array([2.0, 5.0, 11.0])
    opts = LossOptions(reduction=reduction, label_smoothing=0.1)
    outer, classes, inner = _split(shape, axis)

    def f(x, t, w, n):
        x, t = x.reshape(outer, classes, inner), t.reshape(outer, inner)
        kw = {"outer": outer, "classes": classes, "inner": inner, "probability": False, "opts": opts}
        return _ffi.cross_entropy_fwd(x, t, w, n, **kw, want_grad=True)

    w = jnp.asarray(weight, jnp.float32)
    cases = {
        "x": ((0, None, None, None), (xs, ts[0], w, None)),
        "target": ((None, 0, None, None), (xs[0], ts, w, None)),
        "x+target+normalizer": ((0, 0, None, 0), (xs, ts, w, jnp.asarray(ns, jnp.float32))),
        "weight": ((None, None, 0, None), (xs[0], ts[0], jnp.stack([w, 2 * w, w[::-1]]), None)),
    }
    for name, (in_axes, args) in cases.items():
        if reduction == "none" and args[3] is not None:
            continue
        loss, grad = jax.jit(jax.vmap(f, in_axes=in_axes))(*args)
        for b in range(B):
            item = [a if ax is None else a[b] for a, ax in zip(args, in_axes, strict=True)]
            n = None if item[3] is None else float(item[3])
            one = LossOptions(reduction=reduction, label_smoothing=0.1, normalizer=n)
            xi, ti, wi = (np.asarray(a) for a in item[:3])
            ref_loss, ref_grad = _numpy_kernel(xi, ti, wi, axis, one, probability=False)
            _assert_same_bits(np.asarray(loss[b]).reshape(ref_loss.shape), ref_loss, f"vmap {name} loss {b}")
            _assert_same_bits(np.asarray(grad[b]).reshape(shape), ref_grad, f"vmap {name} grad {b}")


def test_nested_vmap_softmax() -> None:
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 7)).astype(np.float32)

    def f(a):
        return _ffi.softmax_op(a.reshape(4, 7, 1), outer=4, classes=7, inner=1, op="log_softmax")

    out = np.asarray(jax.jit(jax.vmap(jax.vmap(f)))(jnp.asarray(x))).reshape(x.shape)
    _assert_same_bits(out, _native.KERNEL.log_softmax(x.reshape(24, 7), 1).reshape(x.shape), "nested vmap")


@contextmanager
def _threads(n: int):
    before = crossent.get_num_threads()
    crossent.set_num_threads(n)
    try:
        yield
    finally:
        crossent.set_num_threads(before)


@pytest.mark.parametrize("layout", [((600, 3000), 1), ((4, 50, 40, 41), 1)], ids=["rows", "NCd"])
def test_thread_count_invariant(layout) -> None:
    shape, axis = layout
    x, target, weight = _data(shape, axis, "float32", probability=False)
    opts = LossOptions(label_smoothing=0.1, z_loss=1e-4)
    results = []
    for n in (1, 2, 3):
        with _threads(n):
            results.append(_ffi_loss(x, target, weight, None, axis, opts, probability=False))
    for n, (loss, grad) in zip((2, 3), results[1:], strict=True):
        _assert_same_bits(loss, results[0][0], f"loss, {n} threads against 1")
        _assert_same_bits(grad, results[0][1], f"grad, {n} threads against 1")


def test_supports() -> None:
    assert all(_ffi.supports(d) for d in DTYPES)
    assert not _ffi.supports("int32") and not _ffi.supports("complex64") and not _ffi.supports("float8_e4m3fn")


def test_calls_register_the_handlers_themselves() -> None:
    # In a fresh process, without available() first: the call registers the handlers it needs.
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp\n"
        "from crossent.jax import _ffi\n"
        "f = lambda a: _ffi.softmax_op(a, outer=2, classes=3, inner=1, op='logsumexp')\n"
        "out = jax.jit(f)(jnp.zeros((2, 3, 1)))\n"
        "print(float(out[0, 0]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert abs(float(done.stdout) - math.log(3)) < 1e-6
