"""crossent.token_stats, crossent.torch.token_stats and crossent.torch.linear_token_stats against
float64 torch on the materialised logits (tests/oracle.py): values and gradients of a random
combination of the three statistics."""

from __future__ import annotations

import numpy as np
import pytest

import crossent
import oracle
from crossent._dispatch import use_native

torch = pytest.importorskip("torch")
ct = pytest.importorskip("crossent.torch")


def _case(rng, shape, axis, *, ignore=True, neg_inf=True, scale=3.0):
    """Logits of ``shape`` with classes on ``axis``, targets, some ignored, some -inf logits (one of
    them at a target)."""
    x = rng.normal(size=shape) * scale
    classes = shape[axis]
    batch = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    y = rng.integers(0, classes, size=batch)
    y = np.asarray(y)
    if ignore and y.ndim:
        y.reshape(-1)[::5] = -100
    if neg_inf:
        xl = np.moveaxis(x, axis, -1)
        xl.reshape(-1, classes)[1::3, : classes // 3] = -np.inf  # a third of the classes on some rows
        rows = xl.reshape(-1, classes)
        flat_y = y.reshape(-1)
        k = next((i for i in range(1, rows.shape[0], 3) if flat_y[i] != -100), None)
        if k is not None:
            flat_y[k] = 0  # a target whose logit is -inf: log_prob -inf
    return x, y


def _oracle(x, y, axis, temperature, weights=None):
    x64 = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    stats = oracle.token_stats(x64, torch.tensor(y), axis=axis, temperature=temperature)
    grad = None
    if weights is not None:
        total = sum((w * torch.nan_to_num(s, neginf=0.0)).sum() for w, s in zip(weights, stats, strict=True))
        (grad,) = torch.autograd.grad(total, x64)
    return [s.detach().numpy() for s in stats], None if grad is None else grad.numpy()


LAYOUTS = [((37, 50), None), ((5, 11, 3, 4), None), ((4, 6, 19), -1), ((13,), None), ((3, 700), 1)]


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_numpy_values_match_float64_torch(rng, native, dtype, temperature, shape, axis):
    x, y = _case(rng, shape, 1 if axis is None and len(shape) > 1 else (axis if axis is not None else 0))
    x = x.astype(dtype)
    axis_ = axis if axis is not None else (1 if len(shape) > 1 else 0)
    expected, _ = _oracle(x.astype(np.float64), y, axis_, temperature)
    previous = use_native(native)
    try:
        got = crossent.token_stats(x, y, axis=axis, temperature=temperature)
    finally:
        use_native(previous)
    assert isinstance(got, crossent.TokenStats)
    tol = 1e-12 if dtype == "float64" else 3e-5
    for g, e in zip(got, expected, strict=True):
        assert g.shape == y.shape and g.dtype == x.dtype
        np.testing.assert_allclose(g, e, rtol=tol, atol=tol)


def test_numpy_half_and_bfloat16(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x, y = _case(rng, (20, 300), 1)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        xh = x.astype(dtype)
        expected, _ = _oracle(xh.astype(np.float64), y, 1, 0.8)
        got = crossent.token_stats(xh, y, temperature=0.8)
        for g, e in zip(got, expected, strict=True):
            assert g.dtype == xh.dtype
            np.testing.assert_allclose(g.astype(np.float64), e, rtol=1e-2, atol=2e-2)


def test_ignored_positions_are_zero_and_all_minus_inf_row_is_nan():
    x = np.array([[1.0, 2.0, 3.0], [-np.inf, -np.inf, -np.inf], [0.0, 1.0, 2.0]])
    s = crossent.token_stats(x, np.array([0, 1, -1]), ignore_index=-1)
    assert s.log_prob[2] == 0 and s.entropy[2] == 0 and s.logsumexp[2] == 0
    # torch: log_softmax of an all -inf row is NaN, logsumexp -inf.
    assert np.isnan(s.log_prob[1]) and np.isnan(s.entropy[1]) and s.logsumexp[1] == -np.inf


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"temperature": 0.0}, ValueError),
        ({"temperature": -1.0}, ValueError),
        ({"temperature": float("nan")}, ValueError),
        ({"temperature": float("inf")}, ValueError),
        ({"temperature": "1"}, TypeError),
    ],
)
def test_bad_temperature(kwargs, error):
    with pytest.raises(error, match="temperature"):
        crossent.token_stats(np.zeros((2, 3)), np.array([0, 1]), **kwargs)
    with pytest.raises(error, match="temperature"):
        ct.token_stats(torch.zeros(2, 3), torch.tensor([0, 1]), **kwargs)


def test_bad_target():
    with pytest.raises(IndexError, match="target value 3"):
        crossent.token_stats(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(TypeError, match="integer"):
        crossent.token_stats(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(IndexError, match="target value 3"):
        ct.token_stats(torch.zeros(2, 3), torch.tensor([0, 3]))


def _weights(rng, shape):
    return [torch.tensor(rng.normal(size=shape)) for _ in range(3)]


@pytest.mark.parametrize("torch_ops", [False, True], ids=["kernel", "torch-ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_torch_values_and_gradients(rng, torch_ops, dtype, temperature, shape, axis):
    axis_ = axis if axis is not None else (1 if len(shape) > 1 else 0)
    x, y = _case(rng, shape, axis_)
    weights = _weights(rng, y.shape)
    expected, expected_grad = _oracle(x, y, axis_, temperature, weights)
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    with ct.use_backend("torch" if torch_ops else "auto"):
        s = ct.token_stats(xt, torch.tensor(y), axis=axis, temperature=temperature)
        total = sum((w.to(dtype) * torch.nan_to_num(v, neginf=0.0)).sum() for w, v in zip(weights, s, strict=True))
        total.backward()
    tol = 1e-11 if dtype == torch.float64 else 5e-5
    for g, e in zip(s, expected, strict=True):
        assert g.dtype == dtype and tuple(g.shape) == y.shape
        np.testing.assert_allclose(g.detach().double().numpy(), e, rtol=tol, atol=tol)
    assert not torch.isnan(xt.grad).any()
    np.testing.assert_allclose(xt.grad.double().numpy(), expected_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_torch_gradient_of_one_statistic(rng, which):
    x, y = _case(rng, (9, 40), 1)
    weights = [torch.zeros(y.shape, dtype=torch.float64) for _ in range(3)]
    weights[which] = torch.tensor(rng.normal(size=y.shape))
    _, expected_grad = _oracle(x, y, 1, 1.3, weights)
    xt = torch.tensor(x, requires_grad=True)
    s = ct.token_stats(xt, torch.tensor(y), temperature=1.3)
    (weights[which] * torch.nan_to_num(s[which], neginf=0.0)).sum().backward()  # the others get no gradient
    np.testing.assert_allclose(xt.grad.numpy(), expected_grad, rtol=1e-11, atol=1e-11)


def test_torch_bfloat16(rng):
    x, y = _case(rng, (16, 200), 1, neg_inf=False)
    weights = _weights(rng, y.shape)
    xb = torch.tensor(x).to(torch.bfloat16)
    expected, expected_grad = _oracle(xb.double().numpy(), y, 1, 0.9, weights)
    xt = xb.clone().requires_grad_(True)
    s = ct.token_stats(xt, torch.tensor(y), temperature=0.9)
    sum((w.to(torch.bfloat16) * v).sum() for w, v in zip(weights, s, strict=True)).backward()
    for g, e in zip(s, expected, strict=True):
        np.testing.assert_allclose(g.double().detach().numpy(), e, rtol=2e-2, atol=3e-2)
    np.testing.assert_allclose(xt.grad.double().numpy(), expected_grad, rtol=3e-2, atol=3e-3)


def _linear_oracle(h, W, b, y, temperature, weights):
    h64, W64 = (torch.tensor(a, requires_grad=True) for a in (h, W))
    b64 = None if b is None else torch.tensor(b, requires_grad=True)
    logits = h64 @ W64.T + (0 if b64 is None else b64)
    stats = oracle.token_stats(logits, torch.tensor(y), temperature=temperature)
    total = sum((w * s).sum() for w, s in zip(weights, stats, strict=True))
    leaves = [h64, W64] + ([] if b64 is None else [b64])
    grads = torch.autograd.grad(total, leaves)
    return [s.detach().numpy() for s in stats], [g.numpy() for g in grads]


@pytest.mark.parametrize("torch_ops", [False, True], ids=["kernel", "torch-ops"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("temperature", "chunk_size"), [(1.0, None), (0.7, 7), (1.9, 64)])
def test_linear_token_stats_float32(rng, torch_ops, bias, temperature, chunk_size):
    n, d, v = 50, 16, 300
    h = rng.normal(size=(n, d))
    W = rng.normal(size=(v, d)) / d**0.5 * 3
    b = rng.normal(size=v) if bias else None
    y = rng.integers(0, v, size=n)
    y[::4] = -100
    weights = _weights(rng, (n,))
    expected, expected_grads = _linear_oracle(h, W, b, y, temperature, weights)
    leaves = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (h, W) + ((b,) if bias else ())]
    with ct.use_backend("torch" if torch_ops else "auto"):
        s = ct.linear_token_stats(
            leaves[0], leaves[1], torch.tensor(y), bias=leaves[2] if bias else None, temperature=temperature,
            chunk_size=chunk_size,
        )  # fmt: skip
        sum((w.float() * v).sum() for w, v in zip(weights, s, strict=True)).backward()
    for g, e in zip(s, expected, strict=True):
        assert g.dtype == torch.float32 and tuple(g.shape) == (n,)
        np.testing.assert_allclose(g.detach().double().numpy(), e, rtol=1e-4, atol=1e-4)
    for leaf, e in zip(leaves, expected_grads, strict=True):
        np.testing.assert_allclose(leaf.grad.double().numpy(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("matmul", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk_size", [4, None], ids=["rows", "vocab-blocks"])
def test_linear_token_stats_batch_shape_and_bfloat16(rng, matmul, chunk_size, monkeypatch):
    # Both matmul paths whatever this CPU has (float32 where it lacks bfloat16 matrix instructions,
    # bfloat16 where it has them), several class blocks (the last shorter) and vocabulary blocks.
    from crossent.torch import _linear, _token_stats

    for module in (_linear, _token_stats):
        monkeypatch.setattr(module, "_matmul_dtype", lambda t: getattr(torch, matmul))
    monkeypatch.setattr(_linear, "_MATMUL_CLASS_BLOCK", 64)
    monkeypatch.setattr(_token_stats, "_MIN_VOCAB_BLOCK", 1)
    monkeypatch.setattr(_token_stats, "_CHUNK_BUDGET_BYTES", 15 * 200 * 10)
    b_, t_, d, v = 3, 5, 32, 500
    h = rng.normal(size=(b_, t_, d))
    W = rng.normal(size=(v, d)) / d**0.5 * 2
    y = rng.integers(0, v, size=(b_, t_))
    y[0, :2] = -100
    hb, Wb = (torch.tensor(a).to(torch.bfloat16) for a in (h, W))
    weights = _weights(rng, (b_ * t_,))
    expected, expected_grads = _linear_oracle(
        hb.double().reshape(-1, d).numpy(), Wb.double().numpy(), None, y.reshape(-1), 1.2, weights
    )
    ht, Wt = hb.clone().requires_grad_(True), Wb.clone().requires_grad_(True)
    s = ct.linear_token_stats(ht, Wt, torch.tensor(y), temperature=1.2, chunk_size=chunk_size)
    assert all(tuple(v.shape) == (b_, t_) and v.dtype == torch.bfloat16 for v in s)
    sum((w.reshape(b_, t_).to(torch.bfloat16) * v).sum() for w, v in zip(weights, s, strict=True)).backward()
    for g, e in zip(s, expected, strict=True):
        np.testing.assert_allclose(g.double().detach().numpy().reshape(-1), e, rtol=2e-2, atol=5e-2)
    assert ht.grad.dtype == torch.bfloat16 and Wt.grad.dtype == torch.bfloat16
    for leaf, e in zip((ht, Wt), expected_grads, strict=True):
        got = leaf.grad.double().numpy().reshape(e.shape)
        assert np.abs(got - e).max() <= 2e-2 * np.abs(e).max() + 1e-3


def _nonfinite_case():
    """Rows holding +inf, +inf twice, NaN, +inf with NaN, all -inf, and an ordinary row."""
    inf, nan = np.inf, np.nan
    x = np.array(
        [[inf, 1.0, 0.0, -2.0], [inf, inf, 0.0, 1.0], [0.5, nan, 1.0, 2.0], [inf, nan, 0.0, 0.0],
         [-inf, -inf, -inf, -inf], [1.0, 2.0, -inf, 0.5]]
    )  # fmt: skip
    return x, np.array([0, 2, 1, 3, 0, 1])


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numpy_rows_with_inf_or_nan_match_torch(native, dtype):
    x, y = _nonfinite_case()
    expected, _ = _oracle(x, y, 1, 0.8)
    assert expected[2][0] == np.inf and np.isnan(expected[2][3])  # torch: +inf, NaN with a NaN
    previous = use_native(native)
    try:
        with np.errstate(all="ignore"):  # the reference's NumPy warns at inf - inf, log 0
            got = crossent.token_stats(x.astype(dtype), y, temperature=0.8)
    finally:
        use_native(previous)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=3e-6, atol=3e-6)  # NaN where torch has NaN, inf where inf


@pytest.mark.parametrize("native", [True, False], ids=["native", "reference"])
@pytest.mark.parametrize(("dtype", "big"), [("float32", 1e20), ("float64", 1e30)])
@pytest.mark.parametrize("temperature", [3.0, 0.001])
def test_numpy_huge_finite_logits_with_a_temperature(rng, native, dtype, big, temperature):
    # Finite logits far from 0: the maximum's shifted logit must be exactly 0 (a fused x / T - m gave
    # log_prob 4.95e12 at x = 1e30, T = 3), values and gradients as float64 torch gives them.
    x = np.array([[big, 0.0, -big, big / 2], [1.0, big, 2.0, -1.0], [big, big, 0.0, 0.0]], dtype=dtype)
    y = np.array([0, 2, 1])
    weights = _weights(rng, y.shape)
    expected, grad = _oracle(x.astype(np.float64), y, 1, temperature, weights)
    previous = use_native(native)
    try:
        got = crossent.token_stats(x, y, temperature=temperature)
    finally:
        use_native(previous)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6)
    xt = torch.tensor(x, requires_grad=True)
    s = ct.token_stats(xt, torch.tensor(y), temperature=temperature)
    sum((w.to(xt.dtype) * v).sum() for w, v in zip(weights, s, strict=True)).backward()
    np.testing.assert_allclose(xt.grad.double().numpy(), grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("torch_ops", [False, True], ids=["kernel", "torch-ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_rows_with_inf_or_nan_match_torch(rng, torch_ops, dtype):
    x, y = _nonfinite_case()
    weights = _weights(rng, y.shape)
    x64 = torch.tensor(x, requires_grad=True)
    stats = oracle.token_stats(x64, torch.tensor(y), axis=1, temperature=0.8)
    sum((w * s).sum() for w, s in zip(weights, stats, strict=True)).backward()
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    with ct.use_backend("torch" if torch_ops else "auto"):
        s = ct.token_stats(xt, torch.tensor(y), temperature=0.8)
        sum((w.to(dtype) * v).sum() for w, v in zip(weights, s, strict=True)).backward()
    for g, e in zip(s, stats, strict=True):
        np.testing.assert_allclose(g.detach().double().numpy(), e.detach().numpy(), rtol=3e-6, atol=3e-6)
    assert torch.isnan(x64.grad[:5]).all()  # torch: every row holding +inf, NaN or only -inf is NaN
    np.testing.assert_allclose(xt.grad.double().numpy(), x64.grad.numpy(), rtol=3e-6, atol=3e-6)


def test_temperature_as_zero_dimensional_array_or_tensor(rng):
    x, y = _case(rng, (6, 9), 1)
    want = crossent.token_stats(x, y, temperature=0.6)
    for t in (np.array(0.6), np.float32(0.6), np.array(0.6, dtype=np.float32)):
        got = crossent.token_stats(x, y, temperature=t)
        np.testing.assert_allclose(got.entropy, want.entropy, rtol=1e-6)
    xt, yt = torch.tensor(x), torch.tensor(y)
    got_t = ct.token_stats(xt, yt, temperature=torch.tensor(0.6, dtype=torch.float64))
    np.testing.assert_allclose(got_t.entropy.numpy(), want.entropy, rtol=1e-12)
    h, W = torch.randn(6, 4), torch.randn(9, 4)
    lin = ct.linear_token_stats(h, W, yt, temperature=torch.tensor(0.6))
    ref = ct.token_stats(h @ W.T, yt, temperature=0.6)
    np.testing.assert_allclose(lin.log_prob.numpy(), ref.log_prob.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("temperature", "error", "match"),
    [
        (np.array([0.6]), TypeError, r"0-d real array, got shape \(1,\)"),
        (np.array(True), TypeError, "0-d real array"),
        (np.array(0.0), ValueError, "finite and > 0, got 0.0"),
        (np.array(np.nan), ValueError, "finite and > 0"),
    ],
)
def test_bad_array_temperature(temperature, error, match):
    with pytest.raises(error, match=match):
        crossent.token_stats(np.zeros((2, 3)), np.array([0, 1]), temperature=temperature)
    with pytest.raises(error, match=match):
        ct.token_stats(torch.zeros(2, 3), torch.tensor([0, 1]), temperature=torch.from_numpy(temperature))


def test_temperature_tensor_requiring_grad_raises():
    t = torch.tensor(0.7, requires_grad=True)
    with pytest.raises(TypeError, match=r"temperature .*requires a gradient.*detach"):
        ct.token_stats(torch.zeros(2, 3), torch.tensor([0, 1]), temperature=t)
    with pytest.raises(TypeError, match=r"temperature .*requires a gradient"):
        ct.linear_token_stats(torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor([0, 1]), temperature=t)


def test_linear_token_stats_non_tensor_arguments():
    h, W, y = torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor([0, 1])
    with pytest.raises(TypeError, match=r"target must be a torch\.Tensor, got ndarray"):
        ct.linear_token_stats(h, W, np.array([0, 1]))
    with pytest.raises(TypeError, match=r"weight must be a torch\.Tensor, got ndarray"):
        ct.linear_token_stats(h, np.zeros((3, 4)), y)
    with pytest.raises(TypeError, match=r"bias must be a torch\.Tensor, got list"):
        ct.linear_token_stats(h, W, y, bias=[0.0, 0.0, 0.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_token_stats_half_backward_over_vocabulary_blocks(rng, monkeypatch, dtype, bias):
    # A small budget: 512-class blocks over 1300 classes (three, the last partial).
    from crossent.torch import _token_stats

    monkeypatch.setattr(_token_stats, "_CHUNK_BUDGET_BYTES", 1024)
    n, d, v = 40, 16, 1300
    h = rng.normal(size=(n, d))
    W = rng.normal(size=(v, d)) / d**0.5 * 2
    b = rng.normal(size=v) if bias else None
    y = rng.integers(0, v, size=n)
    y[::5] = -100
    y[(y >= 600) & (y < 700)] = 5  # none at the -inf logits below
    y[1], y[2] = 3, 1299  # targets in the first and the last block
    hh, Wh = (torch.tensor(a).to(dtype) for a in (h, W))
    bh = None if b is None else torch.tensor(b).to(dtype)
    if bh is not None:
        bh[600:700] = -float("inf")  # -inf logits inside a block
    weights = _weights(rng, (n,))
    expected, expected_grads = _linear_oracle(
        hh.double().numpy(), Wh.double().numpy(), None if bh is None else bh.double().numpy(), y, 0.8, weights
    )
    leaves = [t.clone().requires_grad_(True) for t in (hh, Wh) + (() if bh is None else (bh,))]
    s = ct.linear_token_stats(leaves[0], leaves[1], torch.tensor(y), bias=leaves[2] if bias else None, temperature=0.8)
    sum((w.to(dtype) * v).sum() for w, v in zip(weights, s, strict=True)).backward()
    for g, e in zip(s, expected, strict=True):
        np.testing.assert_allclose(g.double().detach().numpy(), e, rtol=2e-2, atol=5e-2)
    for leaf, e in zip(leaves, expected_grads, strict=True):
        assert leaf.grad.dtype == dtype and not torch.isnan(leaf.grad).any()
        got = leaf.grad.double().numpy()
        assert np.abs(got - e).max() <= 1e-2 * np.abs(e).max() + 1e-3
