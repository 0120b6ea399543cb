"""The native kernel against the Array-API reference: every option, layout, dtype and instruction set;
bitwise invariance to the thread count; the accuracy of its exp; inputs above 2^31 elements."""

from __future__ import annotations

import json
import subprocess
import sys

import array_api_compat.numpy as xp_numpy
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import crossent
import oracle
from cases import grad_output_for, make_case
from crossent import _memory, _native, _reference, _validate

pytestmark = pytest.mark.skipif(_native.extension is None, reason=f"native kernel not built: {_native.load_error}")

ISAS = list(_native.extension.available_isas()) if _native.extension is not None else []


@pytest.fixture(params=ISAS)
def isa(request):
    _native.extension.select_isa(request.param)
    yield request.param
    _native.extension.select_isa("best")


def reference_loss_and_grad(case, grad_output):
    """crossent's own spec (the Array-API reference) on the same NumPy arrays."""
    kw = dict(case.kwargs)
    weight = kw.pop("weight", None)
    axis = kw.pop("axis", None)
    opts = _validate.loss_options(**kw)
    shape = _validate.loss_shape(xp_numpy, case.x, case.target, axis, allow_probabilities=True)
    with np.errstate(all="ignore"):
        return _reference.cross_entropy_and_grad(xp_numpy, case.x, case.target, weight, shape, opts, grad_output)


def kernel_tolerance(dtype):
    name = np.dtype(dtype).name
    return {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}[name]


def assert_matches_reference(case, rng):
    go = grad_output_for(case, rng)
    loss, grad = crossent.cross_entropy_and_grad(case.x, case.target, grad_output=go, **case.kwargs)
    ref_loss, ref_grad = reference_loss_and_grad(case, go)
    tol = kernel_tolerance(case.x.dtype)
    assert loss.dtype == case.x.dtype and grad.dtype == case.x.dtype
    np.testing.assert_allclose(
        np.asarray(loss, np.float64), np.asarray(ref_loss, np.float64), rtol=tol, atol=tol, equal_nan=True
    )
    scale = max(1.0, float(np.nanmax(np.abs(np.asarray(ref_grad, np.float64)), initial=0.0)))
    np.testing.assert_allclose(
        np.asarray(grad, np.float64), np.asarray(ref_grad, np.float64), rtol=tol, atol=tol * scale, equal_nan=True
    )


def _dtypes():
    dtypes = [np.float32, np.float64, np.float16]
    try:
        import ml_dtypes

        dtypes.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    return dtypes


LAYOUTS = [
    ((37, 1500), None),  # classes contiguous, two chunks' worth of rows
    ((300, 10), None),  # few classes contiguous: vectorised across rows, two full tiles and a partial one
    ((2, 70, 32), -1),  # the most classes that path takes
    ((5, 2100, 3), None),  # strided (N, C, d), C over the 1024-class chunk
    ((3, 7, 9, 11), None),  # segmentation (N, C, H, W), tiles shorter than 64
    ((2, 9, 150), None),  # strided with a partial second tile
    ((4, 6, 300), -1),  # (N, T, C) classes last
    ((19,), None),  # unbatched
]


@pytest.mark.parametrize("dtype", _dtypes(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=str)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weighted": True, "ignore_some": True, "label_smoothing": 0.2, "reduction": "sum"},
        {"probability": True, "weighted": True, "label_smoothing": 0.1, "reduction": "none"},
        {"ignore_some": True, "z_loss": 1e-3, "softcap": 15.0, "reduction": "none"},
        {"probability": True, "softcap": 5.0, "normalizer": 11.0},
    ],
    ids=str,
)
def test_kernel_matches_reference(isa, rng, dtype, shape, axis, options):
    case = make_case(rng, shape, dtype, axis=axis, **options)
    assert_matches_reference(case, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "softcap": 200.0}], ids=str)
def test_rows_whose_maximum_moves_between_chunks_match_torch(isa, rng, dtype, options):
    # The online pass over 1024-class chunks takes a chunk's exponentials against the running maximum
    # when the chunk's own maximum is at most 16 above it, and redoes the chunk otherwise: rows whose
    # chunks climb by 10 (kept, then rescaled) or by 40 (redone), fall, start with a chunk of -inf
    # before a maximum below -88 (its gradient was NaN: the factor of the chunk's stand-in shift
    # overflowed), or end in an outlier.
    chunks, width = 5, 1024
    offsets = np.array(
        [
            10.0 * np.arange(chunks),
            40.0 * np.arange(chunks),
            -10.0 * np.arange(chunks),
            [-np.inf, -300.0, -np.inf, -290.0, -310.0],
            [0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    x = (rng.standard_normal((len(offsets), chunks, width)) + offsets[:, :, None]).reshape(len(offsets), -1)
    x[-1, -1] = 100.0  # an outlier in the last chunk
    x = x.astype(dtype)
    target = rng.integers(width, chunks * width, len(offsets))  # never in the -inf first chunk
    upstream = rng.standard_normal(len(offsets)).astype(dtype)
    loss, grad = crossent.cross_entropy_and_grad(x, target, reduction="none", grad_output=upstream, **options)
    expected = oracle.cross_entropy(x, target, reduction="none", grad_output=upstream, **options)
    tol = kernel_tolerance(dtype)
    np.testing.assert_allclose(loss, expected.loss, rtol=tol, atol=tol)
    np.testing.assert_allclose(grad, expected.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", _dtypes(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=str)
@pytest.mark.parametrize(
    "options",
    [
        {"weighted": True, "ignore_some": True, "label_smoothing": 0.2},
        {"probability": True, "z_loss": 1e-3, "softcap": 5.0, "reduction": "none"},
    ],
    ids=str,
)
def test_gradient_written_over_the_logits_equals_the_separate_gradient(rng, dtype, shape, axis, options):
    # out=input: the gradient overwrites the logits (row by row from a copy when the classes are
    # contiguous, through a temporary otherwise); bitwise the gradient written elsewhere.
    case = make_case(rng, shape, dtype, axis=axis, **options)
    go = grad_output_for(case, rng)
    expected_loss, expected_grad = crossent.cross_entropy_and_grad(case.x, case.target, grad_output=go, **case.kwargs)
    logits = case.x.copy()
    loss, grad = crossent.cross_entropy_and_grad(logits, case.target, grad_output=go, out=logits, **case.kwargs)
    assert grad is logits
    np.testing.assert_array_equal(loss, expected_loss)
    np.testing.assert_array_equal(grad, expected_grad)


@given(
    shape=st.sampled_from([(9, 2000), (3, 5, 70), (2, 1, 3), (1, 3000), (6, 4, 1, 5)]),
    probability=st.booleans(),
    weighted=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    label_smoothing=st.sampled_from([0.0, 0.3]),
    z_loss=st.sampled_from([0.0, 0.01]),
    softcap=st.sampled_from([None, 3.0]),
    scale=st.sampled_from([0.5, 5.0, 80.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_kernel_matches_reference_on_random_problems(
    shape, probability, weighted, reduction, label_smoothing, z_loss, softcap, scale, seed
):
    rng = np.random.default_rng(seed)
    case = make_case(
        rng, shape, np.float64, probability=probability, weighted=weighted, ignore_some=not probability,
        reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, scale=scale,
    )  # fmt: skip
    assert_matches_reference(case, rng)


@pytest.mark.parametrize("target_dtype", [np.int64, np.int32, np.uint8, np.int16])
def test_kernel_target_dtypes(rng, target_dtype):
    case = make_case(rng, (30, 40), np.float32, ignore_some=True, ignore_index=255)
    case.target = case.target.astype(target_dtype)
    assert_matches_reference(case, rng)


# (100, 3000): enough rows for the rows layout to run on several threads (13 items of up to 8 rows, the
# last one short). (2, 3, 40000): enough positions for the weighted mean's denominator to be summed in
# parallel too.
@pytest.mark.parametrize(
    ("shape", "axis"),
    [((8, 3000), 1), ((100, 3000), 1), ((4, 7, 130), 1), ((3, 5, 7), 2), ((2, 3, 40000), 1)],
    ids=str,
)
def test_results_are_bitwise_identical_for_any_thread_count(rng, shape, axis):
    x = (4 * rng.standard_normal(shape)).astype(np.float32)
    batch = shape[:axis] + shape[axis + 1 :]
    y = rng.integers(0, shape[axis], size=batch)
    weight = rng.uniform(0.1, 2.0, shape[axis]).astype(np.float32)
    previous = crossent.get_num_threads()
    results = []
    try:
        for threads in [1, 2, 3, 7]:
            crossent.set_num_threads(threads)
            loss, grad = crossent.cross_entropy_and_grad(x, y, weight, axis=axis, label_smoothing=0.1)
            rows = crossent.cross_entropy(x, y, axis=axis, reduction="none")
            results.append((loss.tobytes(), grad.tobytes(), rows.tobytes(), crossent.log_softmax(x, axis).tobytes()))
    finally:
        crossent.set_num_threads(previous)
    assert all(r == results[0] for r in results[1:])


def test_kernel_rows_are_summed_blockwise_for_a_million_rows(rng):
    # float32 mean over 10^6 rows: the kernel sums in double, so it matches the float64 oracle.
    x = rng.standard_normal((1_000_000, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=1_000_000)
    exact = float(np.mean(np.log(np.exp(x.astype(np.float64)).sum(axis=1)) - x[np.arange(len(y)), y]))
    got = float(crossent.cross_entropy(x, y))
    assert abs(got - exact) <= np.spacing(np.float32(exact))


@pytest.mark.parametrize("dtype", _dtypes(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("shape", "axis"), [((13, 2500), 1), ((4, 9, 70), 1), ((6, 5, 33), -1), ((7,), 0)], ids=str)
def test_softmax_family_kernel_matches_reference(isa, rng, dtype, shape, axis):
    x = (6 * rng.standard_normal(shape)).astype(dtype)
    tol = kernel_tolerance(dtype)
    with np.errstate(all="ignore"):
        for name in ["log_softmax", "softmax"]:
            got = getattr(crossent, name)(x, axis=axis)
            want = getattr(_reference, name)(xp_numpy, x, axis % x.ndim)
            assert got.dtype == x.dtype
            np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)
        got = crossent.logsumexp(x, axis=axis, keepdims=True)
        want = _reference.logsumexp(xp_numpy, x, axis % x.ndim, True)
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)


def test_nll_kernel_matches_reference(rng):
    for shape in [(20, 7), (3, 6, 5, 4), (9,)]:
        case = make_case(rng, shape, np.float32, ignore_some=True, weighted=True)
        axis = 0 if len(shape) == 1 else 1
        shape_info = _validate.loss_shape(xp_numpy, case.x, case.target, None, allow_probabilities=False)
        for reduction in ["mean", "sum", "none"]:
            opts = _validate.loss_options(reduction=reduction, ignore_index=-100)
            want = _reference.nll_loss(xp_numpy, case.x, case.target, case.kwargs["weight"], shape_info, opts)
            got = crossent.nll_loss(case.x, case.target, case.kwargs["weight"], reduction=reduction, axis=axis)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _ulp_error(got: np.ndarray, exact: np.ndarray, dtype) -> np.ndarray:
    rounded = exact.astype(dtype)
    return np.abs(got.astype(np.float64) - exact) / np.spacing(np.abs(rounded)).astype(np.float64)


def test_vectorised_exp_is_accurate_to_a_few_ulp(isa):
    # float32 over the range the loss needs (x - max <= 0) and beyond, against float64 exp.
    x32 = np.linspace(-87.0, 88.0, 2_000_003, dtype=np.float32)
    out32 = np.empty_like(x32)
    _native.extension.exp(x32, out32)
    assert _ulp_error(out32, np.exp(x32.astype(np.float64)), np.float32).max() <= 2.0
    # float64 against the C library's exp (correctly rounded to within 1 ulp).
    x64 = np.linspace(-708.0, 709.0, 2_000_003)
    out64 = np.empty_like(x64)
    _native.extension.exp(x64, out64)
    assert _ulp_error(out64, np.exp(x64), np.float64).max() <= 3.0
    # The edges the kernel relies on: exp(-inf) = 0, exp(0) = 1, NaN stays NaN.
    special = np.array([-np.inf, 0.0, np.nan, -100.0, -1e30], dtype=np.float32)
    out = np.empty_like(special)
    _native.extension.exp(special, out)
    assert out[0] == 0.0 and out[1] == 1.0 and np.isnan(out[2]) and out[3] == 0.0 and out[4] == 0.0


def test_vectorised_log_is_accurate_to_a_few_ulp(isa):
    # Over what the kernel takes logs of (sums of exponentials, from 1 up) and the rest of the range,
    # normal numbers only, against float64 log (float32) or the C library's (float64).
    x32 = np.geomspace(1.2e-38, 3.0e38, 2_000_003, dtype=np.float32)
    out32 = np.empty_like(x32)
    _native.extension.log(x32, out32)
    assert _ulp_error(out32, np.log(x32.astype(np.float64)), np.float32).max() <= 2.0
    x64 = np.geomspace(2.3e-308, 1.7e308, 2_000_003)
    out64 = np.empty_like(x64)
    _native.extension.log(x64, out64)
    assert _ulp_error(out64, np.log(x64), np.float64).max() <= 2.0
    # The edges the kernel relies on: log(0) = -inf (an all -inf row), log(1) = 0, inf, NaN.
    for dtype in (np.float32, np.float64):
        special = np.array([0.0, 1.0, np.inf, np.nan, -1.0], dtype=dtype)
        out = np.empty_like(special)
        _native.extension.log(special, out)
        assert out[0] == -np.inf and out[1] == 0.0 and out[2] == np.inf
        assert np.isnan(out[3]) and np.isnan(out[4])


def test_the_fallback_path_gives_the_same_answers(rng):
    from crossent import _dispatch

    case = make_case(rng, (6, 5, 4), np.float64, weighted=True, ignore_some=True, label_smoothing=0.1)
    native = crossent.cross_entropy_and_grad(case.x, case.target, **case.kwargs)
    previous = _dispatch.use_native(False)
    try:
        fallback = crossent.cross_entropy_and_grad(case.x, case.target, **case.kwargs)
    finally:
        _dispatch.use_native(previous)
    np.testing.assert_allclose(native[0], fallback[0], rtol=1e-12)
    np.testing.assert_allclose(native[1], fallback[1], rtol=1e-12, atol=1e-15)


def test_show_config_reports_the_native_path(capsys):
    crossent.show_config()
    out = capsys.readouterr().out
    assert "native: True" in out and f"isa: {_native.extension.isa()}" in out
    assert crossent.config()["threads"] == crossent.get_num_threads()
    with pytest.raises(ValueError, match="at least 1, got 0"):
        crossent.set_num_threads(0)


_PEAK_SCRIPT = """
import json, resource, sys
import numpy as np, crossent
x = np.random.default_rng(0).standard_normal((2048, 32768), dtype=np.float32)  # 256 MiB
y = np.zeros(2048, dtype=np.int64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "forward":
    crossent.cross_entropy(x, y)
else:
    crossent.cross_entropy_and_grad(x, y)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_kib": after - before, "input_kib": x.nbytes // 1024}))
"""


@pytest.mark.parametrize(("mode", "allowed_inputs"), [("forward", 0.05), ("backward", 1.05)])
def test_no_temporary_as_large_as_the_input(mode, allowed_inputs):
    # Peak memory in a fresh process: forward allocates nothing input-sized; backward only the gradient.
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, mode], capture_output=True, text=True, check=True)
    peak = json.loads(out.stdout)
    assert peak["extra_kib"] <= allowed_inputs * peak["input_kib"], peak


@given(
    values=st.lists(st.integers(-200, 300), min_size=0, max_size=300),
    n_classes=st.integers(1, 260),
    ignore_index=st.sampled_from([-100, 0, 5, 255, 2**40]),
    dtype=st.sampled_from(["int64", "int32", "uint8"]),
)
def test_native_class_index_check_agrees_with_numpy(values, n_classes, ignore_index, dtype):
    info = np.iinfo(dtype)
    target = np.array([v for v in values if info.min <= v <= info.max], dtype=dtype)
    wide = target.astype(np.int64)
    expected = bool(np.all(((wide >= 0) & (wide < n_classes)) | (wide == ignore_index)))
    assert _native.class_indices_valid(target, n_classes, ignore_index) is expected
    # Strided or of a width the kernel does not read: never vouched for, the Python check runs.
    if target.size > 1:
        assert _native.class_indices_valid(np.repeat(target, 2)[::2], n_classes, ignore_index) is False
    assert _native.class_indices_valid(target.astype(np.int16), n_classes, ignore_index) is False


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("target_dtype", [np.int64, np.int32, np.uint8])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_plain_calls_take_the_one_call_path_and_match_torch(rng, dtype, target_dtype, reduction, ignore_index):
    x = (rng.standard_normal((37, 11)) * 4).astype(dtype)
    y = rng.integers(0, 11, 37).astype(target_dtype)
    y[::5] = 3
    direct = _native.plain_cross_entropy(x, y, ignore_index, reduction)
    assert direct is not None and direct.dtype == dtype and direct.shape == ()
    expected = oracle.cross_entropy(x, y, ignore_index=ignore_index, reduction=reduction, want_grad=False).loss
    oracle.assert_close(direct, expected, dtype)
    public = crossent.cross_entropy(x, y, ignore_index=ignore_index, reduction=reduction)
    assert type(public) is np.ndarray and public.dtype == dtype and public == direct


def test_plain_call_path_declines_what_it_does_not_check(rng):
    x = rng.standard_normal((8, 5)).astype(np.float32)
    y = rng.integers(0, 5, 8)
    plain = _native.plain_cross_entropy
    assert plain(x, y, -100, "none") is None
    assert plain(x, y, -100, "average") is None
    assert plain(x, y, True, "mean") is None  # a bool is not an index
    assert plain(x, y, 2**63, "mean") is None
    assert plain(x.astype(np.float16), y, -100, "mean") is None
    assert plain(x.astype(">f4"), y, -100, "mean") is None
    assert plain(x, y.astype(">i8"), -100, "mean") is None
    assert plain(x.astype(np.longdouble), y, -100, "mean") is None
    assert plain(x.astype(object), y, -100, "mean") is None
    assert plain(x[:, ::2], y % 3, -100, "mean") is None  # strided
    assert plain(x, y, -100, "mean") is not None
    assert plain(x, y.astype(np.int16), -100, "mean") is None
    assert plain(x, y[:7], -100, "mean") is None
    assert plain(x[:0], y[:0], -100, "mean") is None
    assert plain(x[0], y[0:1], -100, "mean") is None  # unbatched
    bad = y.copy()
    bad[6] = 5
    assert plain(x, bad, -100, "mean") is None
    # The general path then reports what the one-call path refused.
    with pytest.raises(IndexError, match="target value 5 is out of range for 5 classes"):
        crossent.cross_entropy(x, bad)
    with pytest.raises(ValueError, match="average"):
        crossent.cross_entropy(x, y, reduction="average")


def test_read_only_inputs(rng):
    # Read-only arrays (memory maps opened read-only, frozen buffers) are inputs like any other.
    x = rng.standard_normal((6, 4))
    y = rng.integers(0, 4, 6)
    weight = rng.uniform(0.5, 2, 4)
    for a in (x, y, weight):
        a.flags.writeable = False
    expected = oracle.cross_entropy(x, y, weight)
    loss, grad = crossent.cross_entropy_and_grad(x, y, weight)
    oracle.assert_close(loss, expected.loss, np.float64)
    oracle.assert_close(grad, expected.grad, np.float64)
    oracle.assert_close(crossent.cross_entropy(x, y), oracle.cross_entropy(x, y, want_grad=False).loss, np.float64)
    oracle.assert_close(crossent.nll_loss(x, y, weight), oracle.nll_loss(x, y, weight), np.float64)
    oracle.assert_close(crossent.log_softmax(x, axis=1), oracle.log_softmax(x, 1), np.float64)


def test_large_outputs_are_cache_line_aligned(rng):
    # glibc puts large blocks 16 bytes past a page: the gradient and softmax outputs must not stay there.
    x = rng.standard_normal((512, 1000)).astype(np.float32)  # 2 MB: past the alignment threshold
    y = rng.integers(0, 1000, 512)
    loss, grad = crossent.cross_entropy_and_grad(x, y)
    x64 = x.astype(np.float64)
    log_p = x64 - x64.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    rows = np.arange(512)
    expected_loss = -log_p[rows, y].mean()
    expected_grad = np.exp(log_p)
    expected_grad[rows, y] -= 1
    expected_grad /= 512
    assert grad.ctypes.data % 64 == 0 and grad.shape == x.shape and grad.dtype == np.float32
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    assert crossent.softmax(x, axis=1).ctypes.data % 64 == 0
    zeros = _memory.empty((700, 300), np.float64, zero=True)
    assert zeros.ctypes.data % 64 == 0 and zeros.shape == (700, 300) and not zeros.any()


def test_a_freed_gradient_is_reused_and_a_live_one_never(rng, fresh_buffer_cache):
    xs = [rng.standard_normal((256, 2048)).astype(np.float32) for _ in range(3)]  # 2 MiB gradients
    y = rng.integers(0, 2048, 256)
    _, first = crossent.cross_entropy_and_grad(xs[0], y)
    view = first[10:]  # a view alone keeps the memory in use
    address = first.ctypes.data
    del first
    _, second = crossent.cross_entropy_and_grad(xs[1], y)
    assert second.ctypes.data != address
    np.testing.assert_allclose(view, oracle.cross_entropy(xs[0], y).grad[10:], rtol=1e-4, atol=1e-10)
    del view  # now the first gradient's block is free: the next gradient of that size takes it
    assert _memory.buffer_cache_bytes()[0] > 0
    _, third = crossent.cross_entropy_and_grad(xs[2], y)
    assert third.ctypes.data == address and third.ctypes.data % 64 == 0
    np.testing.assert_allclose(third, oracle.cross_entropy(xs[2], y).grad, rtol=1e-4, atol=1e-10)
    np.testing.assert_allclose(second, oracle.cross_entropy(xs[1], y).grad, rtol=1e-4, atol=1e-10)
    # A reused block asked for zeroed is zeroed.
    del third
    zeros = _memory.empty((256, 2048), np.float32, zero=True)
    assert zeros.ctypes.data == address and not zeros.any()


def test_bfloat16_outputs_keep_their_dtype(rng, fresh_buffer_cache):
    import ml_dtypes

    x = rng.standard_normal((256, 4096)).astype(ml_dtypes.bfloat16)  # a 2 MiB gradient: a cached block
    y = rng.integers(0, 4096, 256)
    expected = oracle.cross_entropy(x.astype(np.float32), y).grad  # bfloat16 to float32 is exact
    for _ in range(2):  # fresh memory, then the same block again
        _, grad = crossent.cross_entropy_and_grad(x, y)
        assert grad.dtype == x.dtype and grad.shape == x.shape
        np.testing.assert_allclose(grad.astype(np.float64), expected, rtol=2e-2, atol=1e-6)
        del grad


def test_a_block_freed_while_the_cache_is_busy_is_let_go(fresh_buffer_cache):
    block = _memory.empty((1024, 1024), np.float32)
    with _memory._cache._lock:  # as when the collector runs a lease's __del__ inside take or resize
        del block
    assert _memory.buffer_cache_bytes()[0] == 0


def test_the_buffer_cache_keeps_within_its_limit(rng, fresh_buffer_cache):
    y = rng.integers(0, 2048, 256)
    grads = [
        crossent.cross_entropy_and_grad(rng.standard_normal((256, 2048)).astype(np.float32), y)[1] for _ in range(4)
    ]
    grads.pop()
    block = _memory.buffer_cache_bytes()[0]  # what one gradient's block takes
    assert block >= 256 * 2048 * 4
    crossent.set_buffer_cache(2 * block)
    del grads  # three more blocks freed, two fit: the oldest are let go
    assert _memory.buffer_cache_bytes() == (2 * block, 2 * block)
    crossent.set_buffer_cache(block + 1)
    assert _memory.buffer_cache_bytes() == (block, block + 1)
    crossent.set_buffer_cache(0)
    assert _memory.buffer_cache_bytes() == (0, 0)
    with pytest.raises(ValueError, match="max_bytes must be at least 0, got -1"):
        crossent.set_buffer_cache(-1)


@pytest.mark.slow
def test_inputs_above_2_to_the_31_elements():
    # 32769 x 65536 float16 = 2^31 + 65536 elements (4 GiB): every index past 2^31 must be reached.
    rows, classes = 32769, 65536
    x = np.zeros((rows, classes), dtype=np.float16)  # zero pages: cheap to create
    y = np.zeros(rows, dtype=np.int64)
    last = rows - 1
    x[last, classes - 1] = 8.0  # the very last logits, beyond 2^31
    y[last] = classes - 1
    x[0, 5] = 4.0
    losses = crossent.cross_entropy(x, y, reduction="none")
    uniform = np.log(classes)
    assert losses.shape == (rows,)
    np.testing.assert_allclose(losses[1:last].astype(np.float64), uniform, rtol=1e-3)
    expected_last = np.log(classes - 1 + np.exp(8.0)) - 8.0
    expected_first = np.log(classes - 1 + np.exp(4.0)) - 0.0
    np.testing.assert_allclose(float(losses[last]), expected_last, rtol=2e-3)
    np.testing.assert_allclose(float(losses[0]), expected_first, rtol=2e-3)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_loads_and_stores_round_trip_every_finite_value(half):
    # logsumexp over one class is the value itself: m + log(exp(0)) = m, so the kernel's load to float32
    # and store back must give every finite 16-bit value back exactly (subnormals included).
    dtype = np.float16 if half == "float16" else pytest.importorskip("ml_dtypes").bfloat16
    values = np.arange(65536, dtype=np.uint16).view(dtype)
    finite = values[np.isfinite(values.astype(np.float32))]
    out = crossent.logsumexp(finite[:, None], axis=1)
    assert out.dtype == finite.dtype
    np.testing.assert_array_equal(out.astype(np.float32), finite.astype(np.float32))
