"""crossent.torch.nll_loss follows use_backend as cross_entropy does: the backend chosen runs (or raises),
against torch's nll_loss in float64; one autograd formula for every backend."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("crossent.torch")

import oracle  # noqa: E402
from crossent import _native  # noqa: E402
from crossent.torch import _nll  # noqa: E402

F = torch.nn.functional


def _spy(monkeypatch, owner, name):
    calls = []
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def _problem(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.log_softmax(3 * torch.randn(6, 5, generator=g, dtype=torch.float64), 1)
    target = torch.tensor([0, 4, -100, 2, 2, 1])
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    return x.to(dtype), target, w.to(dtype)


@pytest.mark.parametrize("backend", ["auto", "native", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_backends_against_torch(monkeypatch, backend, reduction, dtype):
    if _native.extension is None and backend != "torch":
        pytest.skip("the native kernel is not built")
    native = _spy(monkeypatch, _native.KERNEL, "nll_loss")
    reference = _spy(monkeypatch, _nll._reference, "nll_loss")
    x, target, w = _problem(dtype=dtype)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with ct.use_backend(backend):
        loss = ct.nll_loss(xr, target, wr, reduction=reduction)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    loss.backward(upstream.to(dtype))
    # The forward ran on the backend chosen (auto on the CPU: the native kernel); the weight's gradient
    # is the reference's under autograd on every backend.
    assert native == ([] if backend == "torch" else ["nll_loss"])
    assert reference[: 1 if backend == "torch" else 0] == (["nll_loss"] if backend == "torch" else [])
    x64, w64 = x.double().requires_grad_(True), w.double().requires_grad_(True)
    expected = F.nll_loss(x64, target, w64.detach(), reduction=reduction)
    expected.backward(upstream)
    oracle.assert_close(loss.detach().double().numpy(), expected.detach().numpy(), dtype, what="loss")
    oracle.assert_close(xr.grad.double().numpy(), x64.grad.numpy(), dtype, what="grad input")
    # torch's nll_loss is not differentiable in the weight: the float64 formula, by autograd.
    (expected_w,) = torch.autograd.grad(_nll_formula(x.double(), target, w64, reduction), w64, upstream)
    oracle.assert_close(wr.grad.double().numpy(), expected_w.numpy(), dtype, what="grad weight")


def _nll_formula(x, target, w, reduction="mean"):
    valid = target != -100
    safe = torch.where(valid, target, 0)
    w_y = torch.where(valid, w[safe], 0.0)
    per = -w_y * x.gather(1, safe[:, None])[:, 0]
    return {"none": per, "sum": per.sum(), "mean": per.sum() / w_y.sum()}[reduction]


def test_native_by_name_raises_where_it_cannot_run(monkeypatch):
    from crossent.torch import _backend

    x, target, _ = _problem()
    with ct.use_backend("native"), pytest.raises(RuntimeError, match="CPU tensors only, got a meta tensor"):
        _nll.compute_nll(x.to("meta"), target.to("meta"), None, *_shape_and_options())
    monkeypatch.setattr(_native, "supports", lambda a: False)
    with ct.use_backend("native"), pytest.raises(RuntimeError, match="use_backend\\('native'\\) cannot run"):
        ct.nll_loss(x, target)
    # auto falls back to torch operations where the kernel does not take the arrays, as cross_entropy
    torch.testing.assert_close(ct.nll_loss(x, target), F.nll_loss(x, target))
    assert _backend.current() == "auto"


def _shape_and_options():
    from crossent.torch._ops import loss_options

    shape = _nll._validate.LossShape(class_axis=1, n_classes=5, batch_shape=(6,), probability_target=False)
    return shape, loss_options(reduction="mean", ignore_index=-100)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_mean_with_a_zero_denominator(backend):
    # Every target ignored: the mean is NaN (0 with zero_if_all_ignored), as torch's; its gradient NaN
    # on the rows that count (none here): 0 everywhere.
    x, _, _ = _problem()
    target = torch.full((6,), -100)
    with ct.use_backend(backend):
        for zero in (False, True):
            xr = x.clone().requires_grad_(True)
            loss = ct.nll_loss(xr, target, zero_if_all_ignored=zero)
            loss.backward()
            assert (loss.item() == 0) if zero else torch.isnan(loss)
            assert torch.equal(xr.grad, torch.zeros_like(x))


def test_second_derivative_through_the_weight():
    x, target, w = _problem(seed=2)
    wr = w.clone().requires_grad_(True)
    with ct.use_backend("native" if _native.extension is not None else "torch"):
        (g,) = torch.autograd.grad(ct.nll_loss(x, target, wr), wr, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), wr)
    w64 = w.clone().requires_grad_(True)
    (e,) = torch.autograd.grad(_nll_formula(x, target, w64), w64, create_graph=True)
    (ee,) = torch.autograd.grad(e.square().sum(), w64)
    oracle.assert_close(gg.numpy(), ee.numpy(), torch.float64)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_second_derivatives_with_ignored_rows(backend, reduction):
    # The input gradient differentiated again, in the input and the weight, with ignore_index in the
    # target: torch's own double backward (finite differences of the analytic first derivative).
    x, _, w = _problem(seed=4)
    x = x.reshape(2, 3, 5).permute(0, 2, 1).contiguous().requires_grad_(True)  # (N, C, d)
    target = torch.tensor([[0, -100, 4], [1, 2, 2]])
    wr = w.clone().requires_grad_(True)
    with ct.use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda a, b: ct.nll_loss(a, target, b, reduction=reduction), (x, wr))
        # d/ds of <d(s * loss)/dx, 1> is the input gradient summed: -(sum of w_y over counted rows) / denominator
        s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        (gx,) = torch.autograd.grad(s * ct.nll_loss(x, target, w, reduction="sum"), x, create_graph=True)
        (ds,) = torch.autograd.grad(gx.sum(), s)
    counted = target[target != -100]
    torch.testing.assert_close(ds, -w[counted].sum())


def test_torch_compile_fullgraph():
    x, target, w = _problem(seed=3, dtype=torch.float32)
    xr = x.clone().requires_grad_(True)
    loss = torch.compile(lambda a, t: ct.nll_loss(a, t, w), fullgraph=True, backend="eager")(xr, target)
    loss.backward()
    x64 = x.double().requires_grad_(True)
    expected = F.nll_loss(x64, target, w.double())
    expected.backward()
    oracle.assert_close(loss.detach().double().numpy(), expected.detach().numpy(), torch.float32)
    oracle.assert_close(xr.grad.double().numpy(), x64.grad.numpy(), torch.float32)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_under_a_named_backend(backend, reduction):
    # Nothing to compute: every named CPU backend returns torch's NaN mean, 0 sum or empty rows, and a
    # gradient of the input's (empty) shape, for cross_entropy and nll_loss alike.
    for ours, theirs in ((ct.cross_entropy, F.cross_entropy), (ct.nll_loss, F.nll_loss)):
        x = torch.empty(0, 5, dtype=torch.float64, requires_grad=True)
        target = torch.empty(0, dtype=torch.long)
        with ct.use_backend(backend):
            loss = ours(x, target, reduction=reduction)
        expected = theirs(x.detach(), target, reduction=reduction)
        torch.testing.assert_close(loss.detach(), expected, equal_nan=True)
        loss.sum().backward()
        assert x.grad is not None and x.grad.shape == (0, 5)
