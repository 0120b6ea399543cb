"""Issue 16, items 5, 6, 8, 9, 10 and 11: faults found by public bug reports and peer test suites, one
named test per item, on every path that shares the cause. Right values come from torch in float64
(autograd of the loss written from torch primitives where torch refuses the call) or from NumPy."""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
from datetime import timedelta

import numpy as np
import pytest

import crossent

torch = pytest.importorskip("torch")
F = torch.nn.functional
ct = pytest.importorskip("crossent.torch")
distributed = pytest.importorskip("crossent.torch.distributed")

f64 = torch.float64


def _hand_cross_entropy(x, y, w, *, reduction="mean", eps=0.0, z_loss=0.0, softcap=None, normalizer=None):
    """torch's cross_entropy written from primitives (torch's own refuses a class weight that requires
    a gradient with class-index targets): the oracle for d(loss)/d(weight). Classes on axis 1."""
    xc = x if softcap is None else softcap * torch.tanh(x / softcap)
    lp = torch.log_softmax(xc, 1)
    n_classes = x.shape[1]
    w_view = w.view(1, -1, *([1] * (x.ndim - 2)))
    if y.is_floating_point():
        t = (1 - eps) * y + eps / n_classes
        per = -(w_view * t * lp).sum(1)
        valid = torch.ones_like(per, dtype=torch.bool)
        denom = torch.tensor(float(per.numel()), dtype=x.dtype)
    else:
        valid = y != -100
        safe = torch.where(valid, y, 0)
        w_y = torch.where(valid, w[safe], 0.0)
        nll = -lp.gather(1, safe.unsqueeze(1)).squeeze(1)
        per = torch.where(valid, (1 - eps) * w_y * nll + eps / n_classes * -(lp * w_view).sum(1), 0.0)
        denom = w_y.sum()
    if z_loss:
        per = per + torch.where(valid, z_loss * torch.logsumexp(xc, 1) ** 2, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / (denom if normalizer is None else torch.tensor(normalizer, dtype=x.dtype))


def _problem(shape, probability, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*shape, dtype=f64, generator=g)
    batch = (shape[0], *shape[2:])
    if probability:
        y = torch.softmax(torch.randn(*shape, dtype=f64, generator=g), 1)
    else:
        y = torch.randint(0, shape[1], batch, generator=g)
        y.view(-1)[0] = -100
    w = torch.rand(shape[1], dtype=f64, generator=g) + 0.5
    return x, y, w


def _to_numpy(a):
    return a.numpy() if isinstance(a, torch.Tensor) else np.from_dlpack(a)


def _upstream(loss):
    return torch.linspace(-1.0, 2.0, loss.numel(), dtype=f64).reshape(loss.shape) if loss.ndim else torch.tensor(1.7)


# -- Item 5: out-of-range class indices are always caught (IndexError on CPU, NaN where unchecked) --


@pytest.mark.parametrize("loss", ["nll_loss", "cross_entropy", "linear_cross_entropy"])
def test_item5_out_of_range_target_raises_under_torch_compile(loss):
    x = torch.randn(3, 4, dtype=f64)
    y = torch.tensor([0, 7, 2])  # 7 for 4 classes
    if loss == "linear_cross_entropy":
        W = torch.randn(4, 4, dtype=f64)
        fn = torch.compile(lambda a, b: ct.linear_cross_entropy(a, W, b), backend="eager")
    else:
        fn = torch.compile(getattr(ct, loss), backend="eager")
    with pytest.raises(IndexError, match="target value 7 is out of range for 4 classes"):
        fn(x.log_softmax(1) if loss == "nll_loss" else x, y)


@pytest.mark.slow
def test_item5_nll_loss_raises_under_inductor():
    compiled = torch.compile(lambda a, b: ct.nll_loss(a, b))
    with pytest.raises(IndexError, match="target value 7"):
        compiled(torch.randn(3, 4).log_softmax(1), torch.tensor([0, 7, 2]))


def test_item5_vocab_parallel_out_of_range_target_raises_under_torch_compile(one_rank_group):
    fn = torch.compile(
        lambda a, b: distributed.vocab_parallel_cross_entropy(a, b, vocab_start=0, vocab_size=4), backend="eager"
    )
    with pytest.raises(IndexError, match="target value 7"):
        fn(torch.randn(3, 4, dtype=f64), torch.tensor([0, 7, 2]))


@pytest.mark.parametrize("weighted", [False, True])
def test_item5_unchecked_out_of_range_target_gives_nan_not_a_finite_number(weighted):
    """Where a check is impossible (an accelerator: no host sync), the torch-ops path and the reference
    give NaN for the row, the mean and the gradient. Checked here by running the CPU reference and the
    torch denominator directly, past the validation that would raise."""
    import array_api_compat.torch as xp_torch

    from crossent import _reference, _validate
    from crossent.torch._reduction import mean_denominator_and_scale

    x = torch.randn(3, 4, dtype=f64)
    y = torch.tensor([0, 7, 2])
    w = torch.rand(4, dtype=f64) + 0.5 if weighted else None
    shape = _validate.loss_shape(xp_torch, x, y, None, allow_probabilities=False)
    per_row = _validate.loss_options(reduction="none", ignore_index=-100)
    mean = _validate.loss_options(reduction="mean", ignore_index=-100)
    for loss in (
        _reference.nll_loss(xp_torch, x.log_softmax(1), y, w, shape, per_row),
        _reference.cross_entropy(xp_torch, x, y, w, shape, per_row),
    ):
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.isnan(_reference.cross_entropy(xp_torch, x, y, w, shape, mean))
    _, grad = _reference.cross_entropy_and_grad(xp_torch, x, y, w, shape, per_row, torch.ones(3, dtype=f64))
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all()
    denom, _ = mean_denominator_and_scale(y, w, mean, rows=3)
    if weighted:
        assert torch.isnan(denom)  # an out-of-bounds weight read would be a crash on CUDA
    # The vocabulary-sliced loss (the linear loss's vocabulary chunks, compiled on an accelerator).
    from crossent.torch._vocab_slices import SliceStats, VocabSlice, combine, slice_gradient, slice_statistics

    slices = [VocabSlice(0, 2, 4, w), VocabSlice(2, 4, 4, w)]
    stats = [slice_statistics(x[:, s.start : s.end], y, s, per_row) for s in slices]
    loss, terms = combine(SliceStats.stack(stats), y, VocabSlice(0, 4, 4, w), per_row, lambda t: t.amax(0),
                          lambda t: t.sum(0))  # fmt: skip
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    terms.lse_local = stats[0].lse
    grad = slice_gradient(x[:, :2], y, slices[0], per_row, terms, torch.ones(3, dtype=f64))
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all()


# -- Item 6: gradients that went missing: the class weight, the linear loss's probability target --


CE_OPTIONS = [
    dict(zip(("reduction", "eps", "z_loss", "softcap", "normalizer"), values, strict=True))
    for values in itertools.product(["mean", "sum", "none"], [0.0, 0.3], [0.0, 0.1], [None, 3.0], [None, 7.0])
    if values[4] is None or values[0] == "mean"
]


@pytest.mark.parametrize("path", ["native", "torch_ops"])
@pytest.mark.parametrize("probability", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2)])
def test_item6_cross_entropy_gives_the_class_weight_its_gradient(path, probability, shape):
    x, y, w0 = _problem(shape, probability)
    for o in CE_OPTIONS:
        w, xx = w0.clone().requires_grad_(), x.clone().requires_grad_()
        with ct.use_backend("torch" if path == "torch_ops" else "auto"):
            loss = ct.cross_entropy(
                xx, y, weight=w, reduction=o["reduction"], label_smoothing=o["eps"], z_loss=o["z_loss"],
                softcap=o["softcap"], normalizer=o["normalizer"],
            )  # fmt: skip
        g = _upstream(loss)
        loss.backward(g)
        w2, x2 = w0.clone().requires_grad_(), x.clone().requires_grad_()
        expected = _hand_cross_entropy(x2, y, w2, **o)
        expected.backward(g)
        torch.testing.assert_close(loss, expected, msg=str(o))
        torch.testing.assert_close(w.grad, w2.grad, msg=str(o))
        torch.testing.assert_close(xx.grad, x2.grad, msg=str(o))


def test_item6_torch_itself_agrees_with_the_hand_oracle_for_probability_targets():
    """torch accepts a class weight that requires a gradient with probability targets: there the
    hand-written oracle is checked against torch's own F.cross_entropy."""
    x, y, w0 = _problem((5, 4), True)
    w, w2 = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    F.cross_entropy(x, y, weight=w, label_smoothing=0.3).backward()
    _hand_cross_entropy(x, y, w2, eps=0.3).backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_item6_class_weight_gradient_is_differentiable_again():
    x, y, w0 = _problem((5, 4), False)
    results = []
    for build in ("crossent", "oracle"):
        xx, w = x.clone().requires_grad_(), w0.clone().requires_grad_()
        if build == "crossent":
            loss = ct.cross_entropy(xx, y, weight=w, label_smoothing=0.2)
        else:
            loss = _hand_cross_entropy(xx, y, w, eps=0.2)
        gx, gw = torch.autograd.grad(loss, (xx, w), create_graph=True)
        results.append((gw, *torch.autograd.grad(gx.square().sum() + gw.square().sum(), (xx, w))))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected)


def test_item6_all_ignored_mean_gives_a_zero_weight_gradient_with_zero_if_all_ignored():
    x = torch.randn(3, 4, dtype=f64)
    w = torch.rand(4, dtype=f64, requires_grad=True)
    loss = ct.cross_entropy(x, torch.full((3,), -100), weight=w, zero_if_all_ignored=True)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(w.grad, torch.zeros(4, dtype=f64))


def test_item6_nll_loss_gives_the_class_weight_its_gradient():
    x, y, w0 = _problem((5, 4), False)
    logp = torch.log_softmax(x, 1)
    w, w2 = w0.clone().requires_grad_(), w0.clone().requires_grad_()
    ct.nll_loss(logp, y, weight=w).backward()
    _hand_cross_entropy(x, y, w2).backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_item6_inplace_backward_refuses_a_weight_that_needs_its_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="class weight's gradient"):
        ct.cross_entropy(x, torch.tensor([0, 1, 2]), weight=torch.ones(4, requires_grad=True), inplace_backward=True)


@pytest.mark.parametrize("probability", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_item6_linear_cross_entropy_gives_weight_and_probability_target_their_gradients(
    probability, reduction, compiled
):
    g = torch.Generator().manual_seed(1)
    x, W, b = (torch.randn(*s, dtype=f64, generator=g) for s in ((7, 5), (6, 5), (6,)))
    w0 = torch.rand(6, dtype=f64, generator=g) + 0.5
    y = torch.softmax(torch.randn(7, 6, dtype=f64, generator=g), 1) if probability else torch.randint(0, 6, (7,))
    if not probability:
        y[3] = -100
    loss_fn = ct.linear_cross_entropy
    if compiled:
        loss_fn = torch.compile(ct.linear_cross_entropy, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, W, b, w0, y)] if probability else None
    if leaves is None:
        leaves = [t.clone().requires_grad_() for t in (x, W, b, w0)] + [y]
    loss = loss_fn(leaves[0], leaves[1], leaves[4], linear_bias=leaves[2], weight=leaves[3], reduction=reduction,
                   label_smoothing=0.1, chunk_size=3)  # fmt: skip
    up = _upstream(loss)
    loss.backward(up)
    oracle = [t.clone().requires_grad_() for t in (x, W, b, w0)] + [y.clone().requires_grad_() if probability else y]
    logits = oracle[0] @ oracle[1].T + oracle[2]
    expected = _hand_cross_entropy(logits, oracle[4], oracle[3], reduction=reduction, eps=0.1)
    expected.backward(up)
    torch.testing.assert_close(loss, expected)
    for name, got, want in zip(("x", "W", "b", "weight", "target"), leaves, oracle, strict=True):
        if want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, msg=name)


VOCAB_WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vocab_parallel_weight_grad_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """A rank of test_item6_vocab_parallel_gives_the_class_weight_its_gradient."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    failures = []
    sizes = [3, 4]
    start, end = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for probability, reduction, eps in itertools.product([False, True], ["mean", "sum", "none"], [0.2]):
        x, y, w0 = _problem((5, 7), probability, seed=2)
        w, w2 = w0.clone().requires_grad_(), w0.clone().requires_grad_()
        local = x[:, start:end].clone().requires_grad_()
        target = y[:, start:end].clone().requires_grad_() if probability else y
        loss = distributed.vocab_parallel_cross_entropy(
            local, target, vocab_start=start, vocab_size=7, weight=w, reduction=reduction, label_smoothing=eps
        )
        up = _upstream(loss)
        loss.backward(up)
        xx = x.clone().requires_grad_()
        yy = y.clone().requires_grad_() if probability else y
        expected = _hand_cross_entropy(xx, yy, w2, reduction=reduction, eps=eps)
        expected.backward(up)
        checks = [("loss", loss, expected), ("weight", w.grad, w2.grad), ("x", local.grad, xx.grad[:, start:end])]
        if probability:
            checks.append(("target", target.grad, yy.grad[:, start:end]))
        for name, got, want in checks:
            if not torch.allclose(got, want, rtol=1e-10, atol=1e-12):
                failures.append(f"rank {rank} {probability=} {reduction} {eps=}: {name} {got} != {want}")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(failures, f)
    dist.barrier()
    os._exit(0)


def test_item6_vocab_parallel_gives_the_class_weight_its_gradient(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    sys.modules.setdefault("test_faults_api", sys.modules[__name__])
    mp.spawn(
        vocab_parallel_weight_grad_worker, args=(VOCAB_WORLD, _free_port(), str(tmp_path)), nprocs=VOCAB_WORLD,
        join=True,
    )  # fmt: skip
    failures = [f for r in range(VOCAB_WORLD) for f in json.loads((tmp_path / f"rank{r}.json").read_text())]
    assert not failures, "\n".join(failures[:5])


# -- Item 8: probability targets refuse ignore_index >= 0, as torch does --


def test_item8_probability_target_with_ignore_index_raises_on_every_path(one_rank_group):
    x = np.random.default_rng(0).normal(size=(3, 4))
    t = np.full((3, 4), 0.25)
    with pytest.raises(RuntimeError, match=r"ignore_index is not supported for floating point target"):
        F.cross_entropy(torch.tensor(x), torch.tensor(t), ignore_index=1)  # torch's own rule
    message = r"ignore_index is not supported for floating point target.*ignore_index=1"
    for run in (
        lambda: crossent.cross_entropy(x, t, ignore_index=1),
        lambda: crossent.cross_entropy_and_grad(x, t, ignore_index=1),
        lambda: crossent.cross_entropy(x.tolist(), t.tolist(), ignore_index=1),  # the reference's namespace
        lambda: ct.cross_entropy(torch.tensor(x), torch.tensor(t), ignore_index=1),
        lambda: ct.CrossEntropyLoss(ignore_index=1)(torch.tensor(x), torch.tensor(t)),
        lambda: ct.linear_cross_entropy(torch.tensor(x), torch.randn(4, 4, dtype=f64), torch.tensor(t), ignore_index=1),
        lambda: distributed.vocab_parallel_cross_entropy(
            torch.tensor(x), torch.tensor(t), vocab_start=0, vocab_size=4, ignore_index=1
        ),
    ):
        with pytest.raises(ValueError, match=message):
            run()
    # The default (-100), and negative values, stay accepted.
    np.testing.assert_allclose(
        crossent.cross_entropy(x, t, ignore_index=-1), F.cross_entropy(torch.tensor(x), torch.tensor(t)).item()
    )


# -- Item 9: a class weight of another float dtype is cast (documented difference) --


@pytest.mark.parametrize("weight_dtype", [np.float16, np.float64])
def test_item9_class_weight_of_another_dtype_is_cast_to_the_logits(weight_dtype):
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 1])
    w = np.array([0.5, 1.0, 2.0, 1.5], dtype=weight_dtype)
    with pytest.raises(RuntimeError):  # torch refuses; crossent casts (docs/differences-from-pytorch.md)
        F.cross_entropy(torch.tensor(x), torch.tensor(y), weight=torch.tensor(w))
    expected = F.cross_entropy(torch.tensor(x, dtype=f64), torch.tensor(y), weight=torch.tensor(w, dtype=f64))
    for got in (
        crossent.cross_entropy(x, y, w),
        ct.cross_entropy(torch.tensor(x), torch.tensor(y), weight=torch.tensor(w)),
    ):
        np.testing.assert_allclose(float(got), expected.item(), rtol=2e-5)
    assert crossent.cross_entropy(x, y, w).dtype == np.float32
    doc = os.path.join(os.path.dirname(__file__), "..", "docs", "differences-from-pytorch.md")
    assert "float16 or float64 class weight" in open(doc).read()


# -- Item 10: what torch accepts: 0-d softmax family, logsumexp over several axes, K-dim linear weight --


@pytest.mark.parametrize("library", ["numpy", "torch", "array_api_strict"])
@pytest.mark.parametrize("value", [1.5, -2.0, -np.inf, np.nan])
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_item10_zero_dimensional_inputs_like_torch(library, value, name):
    mod = pytest.importorskip(library)
    x = mod.asarray(value, dtype=mod.float64) if library != "torch" else torch.tensor(value, dtype=f64)
    expected = getattr(torch, name)(torch.tensor(value, dtype=f64), 0)  # torch gives 1, 0 and x
    for axis in (0, -1):
        got = getattr(crossent, name)(x, axis=axis)
        assert tuple(got.shape) == ()
        np.testing.assert_array_equal(_to_numpy(got), expected.numpy())
    with pytest.raises(ValueError, match="out of range"):
        getattr(crossent, name)(x, axis=1)
    if name == "logsumexp":
        assert tuple(crossent.logsumexp(x, axis=0, keepdims=True).shape) == ()  # torch: 0-d as well


AXES = [(0, 1), (0, 2), (2, 0), (-1, -3), (1,), None, ()]


@pytest.mark.parametrize("library", ["numpy", "torch", "array_api_strict"])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES, ids=str)
def test_item10_logsumexp_over_several_axes(library, axis, keepdims):
    mod = pytest.importorskip(library)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4, 5)) * 10
    x[1, :, 2] = -np.inf
    # float64 NumPy math: the log of the sum of the exponentials (no overflow at these magnitudes)
    if axis == ():
        expected = x
    else:
        expected = np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims))
    a = torch.tensor(x) if library == "torch" else mod.asarray(x)
    got = crossent.logsumexp(a, axis=axis, keepdims=keepdims)
    got = _to_numpy(got)
    assert got.shape == np.shape(expected)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    if axis not in (None, ()):
        torch_got = torch.logsumexp(torch.tensor(x), dim=axis, keepdim=keepdims).numpy()
        np.testing.assert_allclose(got, torch_got, rtol=1e-12)


def test_item10_logsumexp_axis_errors():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="names an axis twice"):
        crossent.logsumexp(x, axis=(0, -2))
    with pytest.raises(ValueError, match="out of range"):
        crossent.logsumexp(x, axis=(0, 2))
    with pytest.raises(TypeError, match="axis must be an int"):
        crossent.logsumexp(x, axis=(0, 1.0))


@pytest.mark.parametrize("out", [(3,), (3, 2)])
@pytest.mark.parametrize("probability", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_item10_linear_cross_entropy_with_a_k_dimensional_weight_matches_torch(out, probability, reduction):
    g = torch.Generator().manual_seed(3)
    n, c, d = 5, 4, 6
    x = torch.randn(n, d, dtype=f64, generator=g)
    W = torch.randn(c, *out, d, dtype=f64, generator=g)
    b = torch.randn(c, *out, dtype=f64, generator=g)
    w = torch.rand(c, dtype=f64, generator=g) + 0.5
    if probability:
        y = torch.softmax(torch.randn(n, c, *out, dtype=f64, generator=g), 1)
    else:
        y = torch.randint(0, c, (n, *out), generator=g)
        y.view(-1)[0] = -100
    ins = [t.clone().requires_grad_() for t in (x, W, b)]
    loss = ct.linear_cross_entropy(ins[0], ins[1], y, linear_bias=ins[2], weight=w, reduction=reduction,
                                   label_smoothing=0.1)  # fmt: skip
    ref = [t.clone().requires_grad_() for t in (x, W, b)]
    expected = F.linear_cross_entropy(ref[0], ref[1], y, linear_bias=ref[2], weight=w, reduction=reduction,
                                      label_smoothing=0.1, ignore_index=None if probability else -100)  # fmt: skip
    up = _upstream(expected)
    loss.backward(up)
    expected.backward(up)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(ins, ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


def test_item10_k_dimensional_linear_weight_argument_checks():
    W = torch.randn(4, 3, 6)
    with pytest.raises(ValueError, match="needs a batched input"):
        ct.linear_cross_entropy(torch.randn(6), W, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="linear_bias must have shape"):
        ct.linear_cross_entropy(torch.randn(2, 6), W, torch.zeros(2, 3, dtype=torch.long), linear_bias=torch.randn(4))
    with pytest.raises(ValueError, match="target shape"):
        ct.linear_cross_entropy(torch.randn(2, 6), W, torch.zeros(2, dtype=torch.long))


# -- Item 11: linear_cross_entropy compiles with fullgraph=True and still checks its targets --


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_item11_linear_cross_entropy_compiles_without_graph_breaks(reduction):
    g = torch.Generator().manual_seed(4)
    x, W = torch.randn(9, 5, generator=g), torch.randn(7, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, -100, 2])

    def step(x, W, y):
        return ct.linear_cross_entropy(x, W, y, reduction=reduction, chunk_size=4)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # raises on any graph break
    xs, Ws = x.clone().requires_grad_(), W.clone().requires_grad_()
    loss = compiled(xs, Ws, y)
    up = _upstream(loss).float()
    loss.backward(up)
    xr, Wr = x.double().requires_grad_(), W.double().requires_grad_()
    expected = F.cross_entropy(xr @ Wr.T, y, reduction=reduction)
    expected.backward(up.double())
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(Ws.grad.double(), Wr.grad, rtol=2e-5, atol=2e-6)
    with pytest.raises(IndexError, match="target value 9 is out of range for 7 classes"):
        compiled(x, W, torch.tensor([0, 1, 2, 3, 4, 5, 6, 9, 2]))


@pytest.mark.slow
def test_item11_linear_cross_entropy_compiles_with_inductor():
    x, W, y = torch.randn(6, 5), torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, -100])
    compiled = torch.compile(lambda a, b, t: ct.linear_cross_entropy(a, b, t), fullgraph=True)
    xs = x.clone().requires_grad_()
    loss = compiled(xs, W, y)
    loss.backward()
    xr = x.double().requires_grad_()
    expected = F.cross_entropy(xr @ W.double().T, y)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=2e-5, atol=2e-6)
    with pytest.raises(IndexError, match="target value 8"):
        compiled(x, W, torch.tensor([0, 1, 2, 8, 4, -100]))


@pytest.fixture
def one_rank_group():
    """A one-process gloo group, for the vocabulary-parallel loss's argument checks in this process."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()
