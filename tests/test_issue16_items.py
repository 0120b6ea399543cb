"""Issue 16, items 1-12: each fault with the exact input the issue gives, and its right value from torch
in float64 (tests/oracle.py) or float64 NumPy math. Item 13 (the command line) is in test_cli.py; the
whole kinds are drawn by test_differential.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

import crossent
from crossent import _dispatch

torch = pytest.importorskip("torch")
oracle = pytest.importorskip("oracle")
import crossent.torch as ct  # noqa: E402

F = torch.nn.functional
INF = math.inf


@pytest.fixture(params=["numpy_kernel", "reference"])
def numpy_path(request):
    previous = _dispatch.use_native(request.param == "numpy_kernel")
    yield request.param
    _dispatch.use_native(previous)


# 1. 0 x inf in the probability-target path: eps/C on a -inf class makes the loss +inf.
@pytest.mark.parametrize("eps", [0.1, 1.0])
def test_item01_smoothing_onto_a_minus_inf_class_is_plus_inf(numpy_path, eps):
    x, t = np.array([[0.0, -INF, 1.0]]), np.array([[0.5, 0.0, 0.5]])
    expected = oracle.cross_entropy(x, t, label_smoothing=eps)
    assert expected.loss == INF
    loss, grad = crossent.cross_entropy_and_grad(x, t, label_smoothing=eps)
    assert loss == INF
    np.testing.assert_allclose(grad, expected.grad, rtol=1e-12)
    xt = torch.tensor(x, requires_grad=True)
    got = ct.cross_entropy(xt, torch.tensor(t), label_smoothing=eps)
    got.backward()
    assert got.item() == INF
    np.testing.assert_allclose(xt.grad.numpy(), expected.grad, rtol=1e-12)


def test_item01_vocab_parallel_smoothing_onto_a_minus_inf_class_is_plus_inf():
    from test_differential import Draw, vocab_parallel

    x, t = np.array([[0.0, -INF, 1.0]]), np.array([[0.5, 0.0, 0.5]])
    d = Draw(x, t, None, {"reduction": "mean", "label_smoothing": 0.1}, "float", None)
    loss, grad = vocab_parallel(d, [1])
    assert loss == INF
    np.testing.assert_allclose(grad, oracle.cross_entropy(x, t, label_smoothing=0.1).grad, rtol=1e-12)


# 2. A normalizer's type must not change its meaning; 0 divides by 0 (or gives 0 with zero_if_all_ignored).
X2, Y2 = np.array([[1.0, 2.0, 3.0]]), np.array([0])


def _normalizers(value: float) -> list:
    return [value, np.array(value), torch.tensor(value, dtype=torch.float64)]


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["float", "numpy-0d", "tensor-0d"])
def test_item02_normalizer_zero_divides_by_zero_whatever_its_type(numpy_path, kind):
    total = oracle.cross_entropy(X2, Y2, reduction="sum")
    assert total.loss > 0 and np.all(total.grad != 0)
    # The sum over 0: +inf; the mean's gradient is undefined there, NaN (crossent's rule for a
    # denominator of 0; torch's autograd gives +-inf or NaN by its order of operations).
    expected_loss, expected_grad = INF, np.full_like(total.grad, np.nan)
    norm = _normalizers(0.0)[kind]
    if kind != 2:
        loss, grad = crossent.cross_entropy_and_grad(X2, Y2, normalizer=norm)
        assert loss == expected_loss
        np.testing.assert_array_equal(grad, expected_grad)
        loss, grad = crossent.cross_entropy_and_grad(X2, Y2, normalizer=norm, zero_if_all_ignored=True)
        assert loss == 0.0 and np.all(grad == 0)
    norm = _normalizers(0.0)[kind] if kind != 1 else torch.tensor(0.0, dtype=torch.float64)
    xt = torch.tensor(X2, requires_grad=True)
    got = ct.cross_entropy(xt, torch.tensor(Y2), normalizer=norm)
    got.backward()
    assert got.item() == expected_loss
    np.testing.assert_array_equal(xt.grad.numpy(), expected_grad)


@pytest.mark.parametrize("value", [-1.0, math.nan])
@pytest.mark.parametrize("kind", [0, 1, 2], ids=["float", "numpy-0d", "tensor-0d"])
def test_item02_negative_or_nan_normalizer_raises_whatever_its_type(value, kind):
    norm = _normalizers(value)[kind]
    if kind != 2:
        with pytest.raises(ValueError, match="normalizer"):
            crossent.cross_entropy(X2, Y2, normalizer=norm)
    with pytest.raises(ValueError, match="normalizer"):
        ct.cross_entropy(torch.tensor(X2), torch.tensor(Y2), normalizer=torch.tensor(value) if kind == 1 else norm)


# 3. A vocabulary slice with no finite logit contributes nothing, gradient included.
def test_item03_vocab_slice_of_minus_inf_has_a_finite_gradient():
    from test_differential import Draw, vocab_parallel

    x, y = np.array([[-INF, -INF, 1.0, 2.0]]), np.array([3])
    expected = oracle.cross_entropy(x, y)
    d = Draw(x, y, None, {"reduction": "mean", "ignore_index": -100}, "float", None)
    loss, grad = vocab_parallel(d, [2])
    np.testing.assert_allclose(loss, expected.loss, rtol=1e-12)
    np.testing.assert_allclose(grad, expected.grad, rtol=1e-12, atol=1e-15)
    assert np.array_equal(grad[0, :2], [0.0, 0.0])


# 4. +inf logits follow torch's rule on every path.
def test_item04_logsumexp_of_plus_inf_is_plus_inf(numpy_path):
    assert crossent.logsumexp(np.array([1.0, INF])) == torch.logsumexp(torch.tensor([1.0, INF]), 0).item() == INF
    assert crossent.logsumexp(torch.tensor([1.0, INF])).item() == INF


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("row", [[1.0, INF], [INF, INF, 0.0], [-INF, INF], [np.nan, INF]])
def test_item04_softmax_with_plus_inf_has_torchs_nan_pattern(numpy_path, name, row):
    expected = getattr(torch, name)(torch.tensor(row, dtype=torch.float64), 0).numpy()
    np.testing.assert_array_equal(getattr(crossent, name)(np.array(row), axis=0), expected)
    np.testing.assert_array_equal(getattr(crossent, name)(torch.tensor(row), axis=0).numpy(), expected)


# 5. Out-of-range class indices are caught under torch.compile too.
@pytest.mark.slow
def test_item05_compiled_nll_loss_catches_an_out_of_range_target():
    x, y = torch.log_softmax(torch.randn(2, 4, dtype=torch.float64), 1), torch.tensor([1, 7])
    with pytest.raises(IndexError):
        F.nll_loss(x, y)
    with pytest.raises(IndexError):
        ct.nll_loss(x, y)
    torch._dynamo.reset()
    with pytest.raises(IndexError):
        torch.compile(ct.nll_loss)(x, y)


# 6. Gradients that go missing: a class weight that requires grad, a probability target that does.
def test_item06_cross_entropy_gives_the_class_weight_its_gradient():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(5, 3, dtype=torch.float64, generator=g), torch.tensor([0, 2, 1, 2, 2])
    w = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64, requires_grad=True)
    ct.cross_entropy(x, y, weight=w).backward()
    w_ref = w.detach().clone().requires_grad_(True)
    picked = -torch.log_softmax(x, 1)[torch.arange(5), y]
    ((w_ref[y] * picked).sum() / w_ref[y].sum()).backward()  # torch's weighted mean, by hand
    assert w.grad is not None
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-14)


def test_item06_linear_cross_entropy_gives_a_probability_target_its_gradient():
    g = torch.Generator().manual_seed(7)
    h, W = torch.randn(4, 3, dtype=torch.float64, generator=g), torch.randn(5, 3, dtype=torch.float64, generator=g)
    t = torch.softmax(torch.randn(4, 5, dtype=torch.float64, generator=g), 1).requires_grad_(True)
    ct.linear_cross_entropy(h, W, t).backward()
    t_ref = t.detach().clone().requires_grad_(True)
    F.cross_entropy(h @ W.T, t_ref).backward()
    assert t.grad is not None
    torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-12, atol=1e-14)


# 7. softcap in float32 with few classes: a loss is never negative.
def test_item07_softcapped_float32_loss_is_never_negative(numpy_path):
    x, y = np.array([[100.0, -100.0]], dtype=np.float32), np.array([0])
    # log(1 + exp(-(c tanh(100/c) - c tanh(-100/c)))) in float64: about 1e-26 (torch's float64 rounds it to 0)
    expected = float(np.log1p(np.exp(-2 * 30.0 * np.tanh(100.0 / 30.0))))
    assert 0 < expected < 1e-20
    loss = float(crossent.cross_entropy(x, y, softcap=30.0))
    assert 0 <= loss <= expected + 2e-6  # oracle.tolerances' float32 atol, as for the plain loss
    got = ct.cross_entropy(torch.from_numpy(x), torch.from_numpy(y), softcap=30.0).item()
    assert 0 <= got <= expected + 2e-6


# 8. A probability target with ignore_index >= 0 set raises, as torch does.
def test_item08_probability_target_with_ignore_index_raises(numpy_path):
    x, t = np.array([[0.0, 1.0, 2.0]]), np.array([[0.2, 0.3, 0.5]])
    with pytest.raises(RuntimeError, match="ignore_index"):
        F.cross_entropy(torch.tensor(x), torch.tensor(t), ignore_index=1)
    with pytest.raises(ValueError, match="ignore_index"):
        crossent.cross_entropy(x, t, ignore_index=1)
    with pytest.raises(ValueError, match="ignore_index"):
        ct.cross_entropy(torch.tensor(x), torch.tensor(t), ignore_index=1)


# 9. A float16 or float64 class weight with float32 logits is cast (a documented difference).
@pytest.mark.parametrize("wdtype", [torch.float16, torch.float64])
def test_item09_weight_of_another_dtype_is_cast(wdtype):
    x, y = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]]), torch.tensor([2, 0])
    w = torch.tensor([0.5, 1.0, 2.0], dtype=wdtype)
    expected = oracle.cross_entropy(x.double().numpy(), y.numpy(), w.double().numpy())
    got = ct.cross_entropy(x.requires_grad_(True), y, weight=w)
    got.backward()
    assert got.dtype == torch.float32
    oracle.assert_close(got.detach(), expected.loss, np.float32, what="loss")
    oracle.assert_close(x.grad, expected.grad, np.float32, what="gradient")


# 10. What torch accepts: 0-d inputs, logsumexp over several axes, a K-dimensional linear_weight.
def test_item10_zero_d_softmax_log_softmax_logsumexp(numpy_path):
    x = np.array(1.5)
    assert crossent.softmax(x, axis=0) == torch.softmax(torch.tensor(1.5, dtype=torch.float64), 0).item() == 1.0
    assert crossent.log_softmax(x, axis=0) == 0.0
    assert crossent.logsumexp(x, axis=0) == torch.logsumexp(torch.tensor(1.5, dtype=torch.float64), 0).item()
    assert crossent.softmax(torch.tensor(1.5), axis=0).item() == 1.0


def test_item10_logsumexp_over_several_axes(numpy_path):
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7
    expected = torch.logsumexp(torch.tensor(x), dim=(0, 1)).numpy()
    np.testing.assert_allclose(crossent.logsumexp(x, axis=(0, 1)), expected, rtol=1e-14)


def test_item10_linear_cross_entropy_with_a_k_dimensional_linear_weight():
    g = torch.Generator().manual_seed(10)
    h = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(5, 2, 4, dtype=torch.float64, generator=g)  # (C, *out, D) with out = (2,)
    y = torch.randint(0, 5, (3, 2), generator=g)
    expected = F.linear_cross_entropy(h, W, y)
    (expected_grad,) = torch.autograd.grad(expected, h)
    got = ct.linear_cross_entropy(h, W, y)
    (grad,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)


# 11. linear_cross_entropy compiles with no graph break and still catches out-of-range targets.
@pytest.mark.slow
def test_item11_linear_cross_entropy_compiles_fullgraph():
    g = torch.Generator().manual_seed(11)
    h, W = torch.randn(4, 3, dtype=torch.float64, generator=g), torch.randn(5, 3, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 4, 2, -100])
    torch._dynamo.reset()
    compiled = torch.compile(ct.linear_cross_entropy, fullgraph=True)
    torch.testing.assert_close(compiled(h, W, y), F.cross_entropy(h @ W.T, y), rtol=1e-12, atol=0)
    with pytest.raises(IndexError):
        compiled(h, W, torch.tensor([0, 5, 2, 1]))


# 12. NumPy labels beside JAX logits (how optax's tests call a loss) are converted to JAX.
def test_item12_jax_logits_with_numpy_labels():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = pytest.importorskip("jax.numpy")
    x, y = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]]), np.array([2, 0])
    expected = oracle.cross_entropy(x, y)
    got = crossent.cross_entropy(jnp.asarray(x), y)
    assert type(got).__module__.split(".")[0] in ("jax", "jaxlib")
    np.testing.assert_allclose(np.asarray(got), expected.loss, rtol=1e-12)
    got_w = crossent.cross_entropy(jnp.asarray(x), [2, 0], [1.0, 2.0, 0.5])
    np.testing.assert_allclose(
        np.asarray(got_w), oracle.cross_entropy(x, y, np.array([1.0, 2.0, 0.5])).loss, rtol=1e-12
    )
