"""crossent.jax against torch's float64 oracle under jit, grad, jit(grad), vmap and vmap(grad): values and
gradients over the option grid and every layout, with the NumPy parity tests' tolerances."""

from __future__ import annotations

import functools
import itertools
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # float64 parity; the suite's JAX backend sets it too

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import crossent.jax as cj  # noqa: E402
import oracle  # noqa: E402
from cases import grad_output_for, make_case  # noqa: E402

torch = oracle.torch

OPTIONS = list(itertools.product(["mean", "sum", "none"], [False, True], [0.0, 0.3], [False, True]))
SHAPES = [(7,), (13, 5), (3, 11, 7), (2, 5, 3, 4)]


def _batch_axis_kwargs(case):
    kwargs = dict(case.kwargs)
    weight = kwargs.pop("weight", None)
    return kwargs, weight


def jax_loss_and_grad(case, go, transform: str):
    """crossent.jax's loss and d(loss)/d(x) for upstream ``go``, through ``transform``."""
    kwargs, weight = _batch_axis_kwargs(case)
    w = None if weight is None else jnp.asarray(weight)

    def loss_and_vjp(x, target, go):
        loss, pullback = jax.vjp(lambda x: cj.cross_entropy(x, target, w, **kwargs), x)
        return loss, pullback(go.astype(loss.dtype))[0]

    x, t, g = jnp.asarray(case.x), jnp.asarray(case.target), jnp.asarray(go)
    if transform == "jit":
        return jax.jit(loss_and_vjp)(x, t, g)
    if transform == "grad":  # eager: grad for scalar losses, the vjp for per-element ones
        if kwargs["reduction"] == "none":
            return loss_and_vjp(x, t, g)
        loss, grad = jax.value_and_grad(lambda x: cj.cross_entropy(x, t, w, **kwargs))(x)
        return loss, grad * g
    if transform == "jit_grad":
        return jax.jit(loss_and_vjp)(x, t, g)
    stacked = [jnp.stack([a, a]) for a in (x, t, g)]  # vmap over a leading batch of two copies
    if transform == "vmap":
        loss = jax.vmap(lambda x, t: cj.cross_entropy(x, t, w, **kwargs))(*stacked[:2])
        return loss[1], None
    loss, grad = jax.jit(jax.vmap(loss_and_vjp))(*stacked)
    return loss[1], grad[1]


def check_against_oracle(case, rng, transform="jit", scale=1.0):
    go = grad_output_for(case, rng)
    loss, grad = jax_loss_and_grad(case, go, transform)
    expected = oracle.cross_entropy(case.x, case.target, grad_output=go, **case.kwargs)
    assert loss.dtype == case.x.dtype
    oracle.assert_close(loss, expected.loss, case.x.dtype, what=f"{transform} loss {case.kwargs}", scale=scale)
    if grad is not None:
        assert grad.dtype == case.x.dtype
        oracle.assert_close(grad, expected.grad, case.x.dtype, what=f"{transform} grad {case.kwargs}", scale=scale)


# Each case is one XLA compilation (about a second on a busy 2-core machine): the grid takes one shape
# per option set, cycling through the layouts, and float32 on every third. The math itself is the
# reference's, which the NumPy parity tests cover shape by shape.
GRID = [(*opts, SHAPES[i % len(SHAPES)], np.float32 if i % 3 == 2 else np.float64) for i, opts in enumerate(OPTIONS)]


@pytest.mark.parametrize(("reduction", "weighted", "label_smoothing", "probability", "shape", "dtype"), GRID, ids=str)
def test_options_grid_under_jit(rng, reduction, weighted, label_smoothing, probability, shape, dtype):
    case = make_case(rng, shape, dtype, probability=probability, weighted=weighted, ignore_some=not probability,
                     reduction=reduction, label_smoothing=label_smoothing)  # fmt: skip
    check_against_oracle(case, rng, "jit")


TRANSFORMS = ["grad", "jit_grad", "vmap", "vmap_grad"]


@pytest.mark.parametrize(
    ("transform", "reduction", "probability"),
    [(t, r, (i + j) % 2 == 1) for i, t in enumerate(TRANSFORMS) for j, r in enumerate(["mean", "sum", "none"])],
)
def test_transforms(rng, transform, reduction, probability):
    case = make_case(rng, (6, 5, 3), np.float64, probability=probability, weighted=True, ignore_some=not probability,
                     reduction=reduction, label_smoothing=0.2)  # fmt: skip
    check_against_oracle(case, rng, transform)


EXTRAS = [
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"normalizer": 17.0},
    {"z_loss": 0.01, "softcap": 2.0, "label_smoothing": 0.1},
    {"axis": -1},
    {"axis": 0},
    {"axis": -1, "z_loss": 0.1, "softcap": 3.0, "normalizer": 5.0},
]


@pytest.mark.parametrize("extras", EXTRAS, ids=str)
@pytest.mark.parametrize("probability", [False, True])
def test_extras(rng, extras, probability):
    extras = dict(extras)
    ls = extras.pop("label_smoothing", 0.0)
    reduction = "mean" if "normalizer" in extras else ["sum", "none", "mean"][len(str(extras)) % 3]
    dtype = np.float32 if probability else np.float64
    case = make_case(rng, (6, 9, 4), dtype, probability=probability, weighted=True, ignore_some=not probability,
                     reduction=reduction, label_smoothing=ls, **extras)  # fmt: skip
    check_against_oracle(case, rng, "jit")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_computed_in_float32(rng, dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    case = make_case(rng, (16, 7), np.float32, weighted=True, ignore_some=True, label_smoothing=0.1, z_loss=1e-3)
    x = case.x.astype(np_dtype)
    loss, grad = jax.jit(jax.value_and_grad(lambda x: cj.cross_entropy(x, case.target, **case.kwargs)))(x)
    assert loss.dtype == grad.dtype == jnp.dtype(dtype)
    # The oracle sees the same rounded inputs, in float64: what is left is the output's rounding.
    expected = oracle.cross_entropy(x.astype(np.float64), case.target, **case.kwargs)
    oracle.assert_close(loss, expected.loss, np_dtype)
    oracle.assert_close(grad, expected.grad, np_dtype)


def test_normalizer_array_under_jit_and_its_gradient(rng):
    case = make_case(rng, (9, 4), np.float64, ignore_some=True)
    f = jax.jit(lambda x, n: cj.cross_entropy(x, case.target, normalizer=n))
    n = jnp.asarray(5.0)
    expected = oracle.cross_entropy(case.x, case.target, normalizer=5.0)
    oracle.assert_close(f(case.x, n), expected.loss, np.float64)
    # d/dn (S / n) = -S / n**2
    dn = jax.grad(f, argnums=1)(case.x, n)
    np.testing.assert_allclose(dn, -expected.loss / 5.0, rtol=1e-12)


def test_weight_and_probability_target_gradients_match_torch(rng):
    case = make_case(rng, (5, 6, 3), np.float64, probability=True, weighted=True, label_smoothing=0.2)
    w = case.kwargs.pop("weight")
    kwargs = case.kwargs

    def f(x, t, w):
        return cj.cross_entropy(x, t, w, **kwargs)

    gx, gt, gw = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(case.x, case.target, w)
    xt, tt, wt = (torch.tensor(a, requires_grad=True) for a in (case.x, case.target, w))
    torch.nn.functional.cross_entropy(xt, tt, wt, label_smoothing=0.2).backward()
    for got, want in [(gx, xt.grad), (gt, tt.grad), (gw, wt.grad)]:
        oracle.assert_close(got, want.numpy(), np.float64)
    # Class-index targets (torch refuses a weight that requires grad here): the weight's gradient, with
    # the mean's denominator sum_n w[y_n], against torch's autograd of the written-out formula.
    case = make_case(rng, (7, 4), np.float64, weighted=True, ignore_some=True, label_smoothing=0.1)
    w = case.kwargs.pop("weight")
    gw = jax.grad(lambda w: cj.cross_entropy(case.x, case.target, w, **case.kwargs))(w)
    wt = torch.tensor(w, requires_grad=True)
    logp = torch.log_softmax(torch.tensor(case.x), 1)
    y = torch.tensor(case.target)
    valid = y != -100
    safe = torch.where(valid, y, 0)
    w_y = torch.where(valid, wt[safe], 0.0)
    per = 0.9 * w_y * -logp.gather(1, safe[:, None])[:, 0] + torch.where(valid, 0.1 / 4 * -(logp * wt).sum(1), 0.0)
    (per.sum() / w_y.sum()).backward()
    oracle.assert_close(gw, wt.grad.numpy(), np.float64)


def test_check_grads_and_second_order(rng):
    # Eager check_grads compiles every primitive it meets: one case per order and mode keeps it short.
    case = make_case(rng, (3, 4), np.float64, weighted=True, label_smoothing=0.1, z_loss=0.01, softcap=3.0)
    with cj.use_backend("jnp"):  # second derivatives: the jnp path only (the kernel's gradient is not differentiable)
        check_grads(lambda x: cj.cross_entropy(x, case.target, **case.kwargs), (case.x,), order=2, modes=["rev"])
    check_grads(lambda x: cj.cross_entropy(x, case.target, **case.kwargs), (case.x,), order=1, modes=["fwd"])
    p = make_case(rng, (3, 4), np.float64, probability=True, weighted=True)
    check_grads(lambda x, t: cj.cross_entropy(x, t, **p.kwargs), (p.x, p.target), order=1, modes=["rev"])
    check_grads(lambda x: cj.log_softmax(x, axis=0), (case.x,), order=1, modes=["rev"])


def test_remat_and_jvp(rng):
    case = make_case(rng, (8, 6), np.float64, ignore_some=True, label_smoothing=0.1)

    def f(x):
        return cj.cross_entropy(jnp.tanh(x) * 3, case.target, **case.kwargs)

    g_plain = jax.grad(f)(case.x)
    g_remat = jax.jit(jax.grad(jax.checkpoint(f)))(case.x)
    np.testing.assert_allclose(g_remat, g_plain, rtol=1e-10, atol=1e-14)
    v = rng.standard_normal(case.x.shape)
    _, tangent = jax.jvp(f, (jnp.asarray(case.x),), (jnp.asarray(v),))
    np.testing.assert_allclose(tangent, np.sum(np.asarray(g_plain) * v), rtol=1e-10)


def test_nll_loss_against_torch(rng):
    for shape, reduction, weighted in itertools.product([(7,), (13, 5), (3, 4, 5)], ["mean", "sum", "none"], [0, 1]):
        case = make_case(rng, shape, np.float64, ignore_some=True, weighted=bool(weighted))
        axis = 0 if len(shape) == 1 else 1
        logp = np.asarray(torch.log_softmax(torch.tensor(case.x), axis))
        w = case.kwargs.get("weight")
        got = jax.jit(lambda x, t, w=w, r=reduction: cj.nll_loss(x, t, w, reduction=r))(logp, case.target)
        oracle.assert_close(got, oracle.nll_loss(logp, case.target, w, reduction=reduction), np.float64)
    xt = torch.tensor(logp, requires_grad=True)
    torch.nn.functional.nll_loss(xt, torch.tensor(case.target), torch.tensor(w), reduction="sum").backward()
    g = jax.grad(lambda x: cj.nll_loss(x, case.target, w, reduction="sum"))(logp)
    oracle.assert_close(g, xt.grad.numpy(), np.float64)


@pytest.mark.parametrize("shape", [(7,), (13, 5), (3, 11, 7)], ids=str)
def test_softmax_family_against_torch(rng, shape):
    x = 10 * rng.standard_normal(shape)
    v = rng.standard_normal(shape)
    for axis in range(-len(shape), len(shape)):
        xt = torch.tensor(x)
        for name, fn in [
            ("log_softmax", torch.log_softmax),
            ("softmax", torch.softmax),
            ("logsumexp", torch.logsumexp),
        ]:
            ours = getattr(cj, name)
            got = jax.jit(lambda a, ours=ours, axis=axis: ours(a, axis=axis))(x)
            oracle.assert_close(got, fn(xt, axis).numpy(), np.float64, what=name)
            _, tangent = jax.jvp(
                lambda a, ours=ours, axis=axis: ours(a, axis=axis), (jnp.asarray(x),), (jnp.asarray(v),)
            )
            _, want = torch.func.jvp(lambda a, fn=fn, axis=axis: fn(a, axis), (xt,), (torch.tensor(v),))
            oracle.assert_close(tangent, want.numpy(), np.float64, what=f"{name} jvp")
    keep = cj.logsumexp(x, axis=0, keepdims=True)
    oracle.assert_close(keep, torch.logsumexp(torch.tensor(x), 0, keepdim=True).numpy(), np.float64)


def _numpy_softmax_family(x, axes):
    """float64 NumPy math over ``axes`` (a tuple; () reduces nothing): softmax, log_softmax, logsumexp."""
    m = np.max(x, axis=axes, keepdims=True) if axes else x
    lse = m + np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True)) if axes else x
    return {"softmax": np.exp(x - lse), "log_softmax": x - lse, "logsumexp": np.squeeze(lse, axis=axes)}


@pytest.mark.parametrize("axis", [None, (), (0,), (0, 2), (2, 0), (-1, 1), (0, 1, 2), -2], ids=str)
def test_softmax_family_takes_jax_nn_axes(rng, axis):
    # Issue #17: tuples and None, as jax.nn takes them, reduce over those axes together.
    x = 10 * rng.standard_normal((3, 4, 5))
    v = rng.standard_normal(x.shape)
    axes = tuple(range(3)) if axis is None else tuple(a % 3 for a in ((axis,) if isinstance(axis, int) else axis))
    want = _numpy_softmax_family(x, axes)
    for name in ["softmax", "log_softmax", "logsumexp"]:
        ours = getattr(cj, name)
        got = jax.jit(lambda a, ours=ours: ours(a, axis=axis))(x)
        oracle.assert_close(got, want[name], np.float64, what=f"{name} axis={axis}")
        # jax.nn itself, on the same axes: the same shapes and values
        oracle.assert_close(got, getattr(jax.nn, name)(x, axis=axis), np.float64, what=f"{name} vs jax.nn")
        _, tangent = jax.jvp(lambda a, ours=ours: ours(a, axis=axis), (x,), (v,))
        _, expected = jax.jvp(lambda a, name=name: getattr(jax.nn, name)(a, axis=axis), (x,), (v,))
        oracle.assert_close(tangent, expected, np.float64, what=f"{name} jvp")
    keep = cj.logsumexp(x, axis=axis, keepdims=True)
    oracle.assert_close(keep, np.expand_dims(want["logsumexp"], axes) if axes else x, np.float64, what="keepdims")


def test_softmax_family_takes_0d_inputs_and_names_bad_axes():
    x = jnp.float64(2.5)
    for axis in [None, (), 0, -1]:
        assert float(cj.softmax(x, axis=axis)) == 1.0
        assert float(cj.log_softmax(x, axis=axis)) == 0.0
        assert float(cj.logsumexp(x, axis=axis)) == 2.5
        assert cj.logsumexp(x, axis=axis, keepdims=True).shape == ()
    y = jnp.zeros((2, 3))
    for fn in [cj.softmax, cj.log_softmax, cj.logsumexp]:
        with pytest.raises(ValueError, match="axis 2 is out of range"):
            fn(y, axis=(0, 2))
        with pytest.raises(ValueError, match=r"axis \(1, -1\) names an axis twice"):
            fn(y, axis=(1, -1))
        with pytest.raises(TypeError, match=r"axis must be an int, got 1\.5"):
            fn(y, axis=(1.5,))
        with pytest.raises(TypeError, match=r"axis must be an int, got \[0\]"):
            fn(y, axis=[0])
        with pytest.raises(ValueError, match="axis 1 is out of range for an input with 0 dimensions"):
            fn(x, axis=1)


def test_out_of_range_targets_raise_eagerly_and_are_nan_under_jit(rng):
    x = rng.standard_normal((4, 3))
    bad = np.array([0, 1, 3, 2])
    with pytest.raises(IndexError, match="target value 3 is out of range for 3 classes"):
        cj.cross_entropy(x, bad)
    with pytest.raises(IndexError, match="-2"):
        cj.nll_loss(x, np.array([0, -2, 1, 1]))
    per_row = np.asarray(jax.jit(lambda x, t: cj.cross_entropy(x, t, reduction="none"))(x, bad))
    assert np.isnan(per_row[2]) and np.all(np.isfinite(per_row[[0, 1, 3]]))
    for reduction in ["mean", "sum"]:
        for opts in [{}, {"weight": np.ones(3)}, {"label_smoothing": 0.1}, {"zero_if_all_ignored": True}]:
            if "zero_if_all_ignored" in opts and reduction != "mean":
                continue
            f = jax.jit(lambda x, t, r=reduction, o=opts: cj.cross_entropy(x, t, reduction=r, **o))
            assert np.isnan(f(x, bad)), (reduction, opts)
            assert np.isnan(jax.jit(lambda x, t, r=reduction: cj.nll_loss(x, t, reduction=r))(x, bad))
            g = np.asarray(jax.jit(jax.grad(f))(x, bad))
            assert np.all(np.isnan(g[2])), (reduction, opts)
    g = np.asarray(jax.jit(jax.vmap(jax.grad(lambda x, t: cj.cross_entropy(x, t, reduction="sum"))))(x, bad))
    assert np.all(np.isnan(g[2])) and np.all(np.isfinite(g[[0, 1, 3]]))


def test_checkify_turns_the_nan_into_an_error(rng):
    from jax.experimental import checkify

    def loss(x, t):
        cj.check_class_indices(t, x.shape[-1])
        return cj.cross_entropy(x, t)

    checked = jax.jit(checkify.checkify(loss))
    err, _ = checked(rng.standard_normal((4, 3)), jnp.array([0, 1, 3, 2]))
    with pytest.raises(checkify.JaxRuntimeError, match="out of range for 3 classes"):
        err.throw()
    err, value = checked(rng.standard_normal((4, 3)), jnp.array([0, 1, -100, 2]))
    assert err.get() is None and np.isfinite(value)


def test_unsigned_targets_are_compared_without_wrapping(rng):
    x = rng.standard_normal((5, 4))
    t8 = np.array([0, 255, 3, 1, 255], dtype=np.uint8)
    expected = oracle.cross_entropy(x, t8.astype(np.int64), ignore_index=255)
    got = jax.jit(lambda x, t: cj.cross_entropy(x, t, ignore_index=255))(x, t8)
    oracle.assert_close(got, expected.loss, np.float64)
    big = np.array([0, 2**32 - 100, 3, 1, 2], dtype=np.uint32)  # wraps to -100 in int32
    with pytest.raises(IndexError):
        cj.cross_entropy(x, big)
    assert np.isnan(jax.jit(cj.cross_entropy)(x, big))


def test_bad_calls_raise_at_trace_time_like_numpy(rng):
    x = jnp.asarray(rng.standard_normal((4, 3)))
    with pytest.raises(ValueError, match="reduction must be one of"):
        jax.jit(lambda x: cj.cross_entropy(x, jnp.zeros(4, int), reduction="avg"))(x)
    with pytest.raises(ValueError, match="target shape"):
        jax.jit(lambda x, t: cj.cross_entropy(x, t))(x, jnp.zeros(5, int))
    with pytest.raises(TypeError, match="floating dtype"):
        jax.jit(lambda x: cj.cross_entropy(x.astype(int), jnp.zeros(4, int)))(x)
    with pytest.raises(ValueError, match="weight must be"):
        jax.jit(lambda x: cj.cross_entropy(x, jnp.zeros(4, int), jnp.ones(4)))(x)


def test_numpy_labels_beside_jax_logits(rng):
    case = make_case(rng, (6, 4), np.float32, ignore_some=True)
    expected = oracle.cross_entropy(case.x, case.target, **case.kwargs)
    oracle.assert_close(cj.cross_entropy(jnp.asarray(case.x), case.target, **case.kwargs), expected.loss, np.float32)
    oracle.assert_close(cj.cross_entropy(case.x.tolist(), case.target.tolist()), expected.loss, np.float32)


def test_backends_agree_and_ffi_is_forced_only_where_available(rng):
    case = make_case(rng, (5, 7, 3), np.float32, weighted=True, ignore_some=True, label_smoothing=0.1, z_loss=1e-3)
    results = {}
    for name in ["jnp", "auto", "ffi"]:
        with cj.use_backend(name):
            if name == "ffi" and not cj.ffi_available():
                with pytest.raises(RuntimeError, match="not available"):
                    jax.jit(lambda x: cj.cross_entropy(x, case.target, **case.kwargs))(case.x)
                continue
            f = jax.jit(jax.value_and_grad(lambda x: cj.cross_entropy(x, case.target, **case.kwargs)))
            results[name] = f(case.x)
    assert cj.current_backend() == "auto"
    for name, (loss, grad) in results.items():
        np.testing.assert_allclose(loss, results["jnp"][0], rtol=2e-6, err_msg=name)
        np.testing.assert_allclose(grad, results["jnp"][1], rtol=2e-5, atol=1e-7, err_msg=name)
    with pytest.raises(ValueError, match="backend must be one of"):
        cj.use_backend("gpu")


@pytest.mark.skipif(not cj.ffi_available(), reason="crossent's XLA FFI target is not built in this installation")
@pytest.mark.parametrize(("reduction", "probability"), list(itertools.product(["mean", "sum", "none"], [False, True])))
def test_ffi_path_against_oracle(rng, reduction, probability):
    with cj.use_backend("ffi"):
        for shape in [(13, 5), (3, 11, 7)]:
            case = make_case(rng, shape, np.float32, probability=probability, weighted=True,
                             ignore_some=not probability, reduction=reduction, label_smoothing=0.1)  # fmt: skip
            check_against_oracle(case, rng, "jit")
            check_against_oracle(case, rng, "vmap_grad")


def test_import_crossent_does_not_import_jax():
    code = "import sys, crossent; assert 'jax' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_the_generic_api_on_traced_jax_arrays_gives_nan_not_a_tracer_error(rng):
    # crossent.cross_entropy (the NumPy-level API) on JAX arrays under jit: the class-index check cannot
    # read a tracer, so the reference's NaN rule applies.
    import crossent

    x = rng.standard_normal((4, 3))
    per_row = np.asarray(
        jax.jit(lambda x, t: crossent.cross_entropy(x, t, reduction="none"))(x, np.array([0, 1, 5, 2]))
    )
    assert np.isnan(per_row[2]) and np.all(np.isfinite(per_row[[0, 1, 3]]))
    assert np.isnan(jax.jit(crossent.nll_loss)(x, np.array([0, 1, 5, 2])))
    good = jax.jit(crossent.cross_entropy)(x, np.array([0, 1, 2, 2]))
    oracle.assert_close(good, oracle.cross_entropy(x, np.array([0, 1, 2, 2])).loss, np.float64)


class _FakeFFI:
    """The agreed FFI interface, computed by the reference on the (outer, classes, inner) view: it checks
    the backend's wiring (reshapes, platform dispatch, vmap through the FFI call) where the real target
    is not built. Counts its calls so the test knows the FFI route ran."""

    def __init__(self):
        self.calls = 0

    def available(self):
        return True

    def supports(self, dtype):
        return True

    def cross_entropy_fwd(
        self, x, target, weight, normalizer, *, outer, classes, inner, probability, opts, want_grad, reuse_logits=False
    ):
        import dataclasses

        from crossent import _reference
        from crossent._validate import LossShape

        self.calls += 1
        assert x.shape == (outer, classes, inner)
        assert target.shape == ((outer, classes, inner) if probability else (outer, inner))
        o = opts if normalizer is None else dataclasses.replace(opts, normalizer=normalizer)
        shape = LossShape(1, classes, (outer, inner), probability)
        if not want_grad:
            return _reference.cross_entropy(jnp, x, target, weight, shape, o), None
        ones = jnp.ones((outer, inner), x.dtype) if opts.reduction == "none" else None
        return _reference.cross_entropy_and_grad(jnp, x, target, weight, shape, o, ones)

    def nll_loss_fwd(self, x, target, weight, normalizer, *, outer, classes, inner, opts):
        from crossent import _reference
        from crossent._validate import LossShape

        self.calls += 1
        return _reference.nll_loss(jnp, x, target, weight, LossShape(1, classes, (outer, inner), False), opts)

    def softmax_op(self, x, *, outer, classes, inner, op):
        from crossent import _reference

        self.calls += 1
        return _reference.logsumexp(jnp, x, 1, False) if op == "logsumexp" else getattr(_reference, op)(jnp, x, 1)


@pytest.mark.parametrize("backend", ["ffi", "auto"])
def test_ffi_wiring_through_the_agreed_interface(rng, monkeypatch, backend):
    from crossent.jax import _backend

    fake = _FakeFFI()
    monkeypatch.setattr(_backend, "_ffi", fake)
    with cj.use_backend(backend):
        for transform, reduction, probability in [("jit", "none", False), ("vmap_grad", "mean", True),
                                                  ("jit_grad", "sum", False)]:  # fmt: skip
            case = make_case(rng, (3, 5, 4), np.float64, probability=probability, weighted=True,
                             ignore_some=not probability, reduction=reduction, label_smoothing=0.1)  # fmt: skip
            check_against_oracle(case, rng, transform)
        x = rng.standard_normal((3, 5, 4))
        got = jax.jit(lambda x: cj.logsumexp(x, axis=1))(x)
        oracle.assert_close(got, torch.logsumexp(torch.tensor(x), 1).numpy(), np.float64)
        t = np.array([[0, 1, 2, 3], [4, 0, 1, 2], [3, 3, 3, 3]])
        got = jax.jit(lambda x: cj.nll_loss(x, t, reduction="sum"))(x)
        oracle.assert_close(got, oracle.nll_loss(x, t, reduction="sum"), np.float64)
    assert fake.calls >= 5


def test_probability_targets_refuse_ignore_index_like_numpy(rng):
    import crossent

    x = rng.standard_normal((4, 3))
    probs = np.full((4, 3), 1 / 3)
    match = "ignore_index is not supported for floating point target"
    with pytest.raises(ValueError, match=match):
        crossent.cross_entropy(x, probs, ignore_index=0)
    with pytest.raises(ValueError, match=match):
        cj.cross_entropy(x, probs, ignore_index=0)
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda x, p: cj.cross_entropy(x, p, ignore_index=1))(x, probs)
    with pytest.raises(ValueError, match=match):  # a named axis without a mesh: vmap's axis_name
        jax.vmap(lambda x: cj.vocab_parallel_cross_entropy(x, probs, "v", ignore_index=0), axis_name="v")(x[None])
    # A negative ignore_index (the default) is accepted, as by torch.
    oracle.assert_close(cj.cross_entropy(x, probs, ignore_index=-1), oracle.cross_entropy(x, probs).loss, np.float64)


# The normalizer's rule (issue 16, item 2): 0 divides by 0 (0 with zero_if_all_ignored, gradient too);
# negative, infinite or NaN raises where the value can be read and is NaN where it cannot (under jit).
X2 = np.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [0.0, 0.0, 0.0]])
Y2 = np.array([0, 2, -100])
NORMALIZED = {
    "cross_entropy": lambda x, y, **kw: cj.cross_entropy(x, y, **kw),
    "nll_loss": lambda x, y, **kw: cj.nll_loss(x, y, **kw),
    "linear_cross_entropy": lambda x, y, **kw: cj.linear_cross_entropy(x, jnp.eye(3, dtype=x.dtype), y, **kw),
}
PATHS = [
    (b, name) for b in ["jnp", "ffi"] for name in NORMALIZED if not (b == "ffi" and name == "linear_cross_entropy")
]


@functools.cache
def _normalized_step(backend, name, zero_if_all_ignored):
    """Loss and d/dx under jit, with the targets and the normalizer arguments (traced): one compilation."""
    fn = NORMALIZED[name]
    with cj.use_backend(backend):
        f = jax.jit(jax.value_and_grad(lambda x, y, n: fn(x, y, normalizer=n, zero_if_all_ignored=zero_if_all_ignored)))
        f.lower(jnp.asarray(X2), jnp.asarray(Y2), jnp.asarray(0.0))  # traced now, under this backend
    return f


def _normalized(backend, name, y, normalizer, zero_if_all_ignored=False):
    if backend == "ffi" and not cj.ffi_available():
        pytest.skip("crossent's XLA FFI target is not built in this installation")
    with cj.use_backend(backend):
        return _normalized_step(backend, name, zero_if_all_ignored)(
            jnp.asarray(X2), jnp.asarray(y), jnp.asarray(normalizer)
        )


@pytest.mark.parametrize(("backend", "name"), PATHS)
def test_normalizer_zero_divides_by_zero(backend, name):
    ignored = np.array([-100, -100, -100])
    loss, grad = _normalized(backend, name, ignored, 0.0)
    assert np.isnan(loss) and (grad == 0).all(), (loss, grad)  # 0 / 0, and no target to move
    # The sum over 0 (IEEE's infinity of the sum's sign), never a default denominator.
    total = oracle.nll_loss(X2, Y2, reduction="sum") if name == "nll_loss" else oracle.cross_entropy(X2, Y2).loss * 2
    loss, grad = _normalized(backend, name, Y2, 0.0)
    assert loss == np.copysign(np.inf, total), (loss, total)
    for y in (ignored, Y2):
        loss, grad = _normalized(backend, name, y, 0.0, zero_if_all_ignored=True)
        assert loss == 0 and (grad == 0).all(), (loss, grad)


@pytest.mark.parametrize(("backend", "name"), PATHS)
def test_bad_normalizer_raises_when_readable_and_is_nan_under_jit(backend, name):
    if backend == "ffi" and not cj.ffi_available():
        pytest.skip("crossent's XLA FFI target is not built in this installation")
    fn = NORMALIZED[name]
    match = "normalizer must be a finite number >= 0"
    for value in (-1.0, np.nan, np.inf):
        with cj.use_backend(backend):
            for norm in (value, np.asarray(value), jnp.asarray(value)):
                with pytest.raises(ValueError, match=match):
                    fn(jnp.asarray(X2), Y2, normalizer=norm)
                with pytest.raises(ValueError, match=match):  # a constant closed over by jit is readable
                    jax.jit(lambda x, norm=norm: fn(x, Y2, normalizer=norm))(X2)
        loss, grad = _normalized(backend, name, Y2, value)
        # NaN wherever a counted row's target moves the loss (nll_loss's gradient is 0 off the targets).
        assert np.isnan(loss) and np.isnan(grad[[0, 1], Y2[:2]]).all(), (value, loss, grad)


@pytest.mark.skipif(not cj.ffi_available(), reason="crossent's XLA FFI target is not built in this installation")
def test_ffi_runs_under_vmap_and_the_gradient_may_take_the_logits_buffer(rng):
    x = rng.standard_normal((6, 5)).astype(np.float32)
    ys = rng.integers(0, 5, (3, 6))
    with cj.use_backend("ffi"):
        # vmap over the targets only: the logits are shared by the batch (no aliasing there).
        f = jax.jit(jax.vmap(jax.value_and_grad(lambda x, y: cj.cross_entropy(x, y, label_smoothing=0.1)), (None, 0)))
        assert "crossent_cross_entropy" in f.lower(x, ys).as_text()  # the kernel, not the jnp fallback
        losses, grads = f(x, ys)
        for i, y in enumerate(ys):
            expected = oracle.cross_entropy(x, y, label_smoothing=0.1)
            oracle.assert_close(losses[i], expected.loss, np.float32, what=f"vmap loss {i}")
            oracle.assert_close(grads[i], expected.grad, np.float32, what=f"vmap grad {i}")
        # Unbatched, the gradient may overwrite the logits' buffer; logits still used afterwards are
        # copied by XLA first, so the caller's values are intact.
        xj = jnp.asarray(x)
        g = jax.jit(lambda x: (jax.grad(cj.cross_entropy)(x, ys[0]), x * 1))
        assert "output_to_operand_aliasing" in g.lower(xj).compile().as_text()
        grad, same = g(xj)
    np.testing.assert_array_equal(np.asarray(same), x)
    np.testing.assert_array_equal(np.asarray(xj), x)
    oracle.assert_close(grad, oracle.cross_entropy(x, ys[0]).grad, np.float32)


@pytest.mark.skipif(not cj.ffi_available(), reason="crossent's XLA FFI target is not built in this installation")
def test_ffi_gradient_needs_no_buffer_or_pass_beyond_the_kernels(rng):
    x = jnp.asarray(rng.standard_normal((64, 1000)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 1000, 64))
    with cj.use_backend("ffi"):
        # value_and_grad seeds an upstream gradient of exactly 1: XLA folds the multiply of the saved
        # gradient by it, so the program is the custom call alone (plus the copy of the argument).
        plain = jax.jit(jax.value_and_grad(cj.cross_entropy)).lower(x, y).compile()
        # Logits made inside the program: the gradient takes their buffer, one logits-sized temporary
        # in all (a fresh one for the gradient would make two).
        inside = jax.jit(jax.value_and_grad(lambda s, x, y: cj.cross_entropy(x * s, y))).lower(1.0, x, y).compile()
    hlo = plain.as_text()
    assert "crossent_cross_entropy" in hlo and "multiply" not in hlo
    assert inside.memory_analysis().temp_size_in_bytes < 1.5 * x.nbytes
