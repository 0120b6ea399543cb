"""crossent.torch against torch.nn.functional: values and gradients, the native and the torch-ops path,
torch.compile without graph breaks, the modules, and the fused linear + cross-entropy."""

from __future__ import annotations

import itertools
import warnings

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional
ct = pytest.importorskip("crossent.torch")

PATHS = ["native", "torch-ops"]


def _path(name):
    return ct.use_backend("torch" if name == "torch-ops" else "native")


def _problem(shape, class_axis, dtype, *, probability, ignore, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
    n_classes = shape[class_axis]
    if probability:
        t = torch.rand(*shape, generator=g, dtype=torch.float64)
        target = (t / t.sum(class_axis, keepdim=True)).to(dtype)
    else:
        batch = shape[:class_axis] + shape[class_axis + 1 :]
        target = torch.randint(0, n_classes, batch, generator=g)
        if ignore:
            target[torch.rand(batch, generator=g) < 0.3] = -100
    return x, target


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    ("shape", "axis"), [((13, 7), None), ((3, 5, 4, 2), None), ((7,), None), ((2, 6, 9), -1)], ids=str
)
@pytest.mark.parametrize(
    ("reduction", "weighted", "label_smoothing", "probability"),
    list(itertools.product(["mean", "sum", "none"], [False, True], [0.0, 0.2], [False, True])),
)
def test_drop_in_matches_torch(path, dtype, shape, axis, reduction, weighted, label_smoothing, probability):
    class_axis = (0 if len(shape) == 1 else 1) if axis is None else axis % len(shape)
    x, target = _problem(shape, class_axis, dtype, probability=probability, ignore=True)
    w = torch.rand(shape[class_axis], dtype=dtype) + 0.1 if weighted else None
    kw = {"reduction": reduction, "label_smoothing": label_smoothing}
    x_ours = x.clone().requires_grad_(True)
    x_theirs = x.clone().requires_grad_(True)
    with _path(path):
        ours = ct.cross_entropy(x_ours, target, w, axis=axis, **kw)
    moved = x_theirs if axis is None else torch.movedim(x_theirs, axis, 1)
    t_moved = target if axis is None or not probability else torch.movedim(target, axis, 1)
    theirs = F.cross_entropy(moved, t_moved, w, **kw)
    upstream = torch.rand(ours.shape, dtype=dtype) if reduction == "none" else torch.tensor(0.7, dtype=dtype)
    ours.backward(upstream)
    theirs.backward(upstream)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-10}
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, **tol, equal_nan=True)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, **tol)


@pytest.mark.parametrize("path", PATHS)
def test_extras_match_torch_primitives(path):
    x, y = _problem((9, 11), 1, torch.float64, probability=False, ignore=True)
    xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with _path(path):
        ours = ct.cross_entropy(xo, y, z_loss=0.01, softcap=3.0, normalizer=5.0)
    capped = 3.0 * torch.tanh(xt / 3.0)
    per = F.cross_entropy(capped, y, reduction="none") + torch.where(y != -100, 0.01 * capped.logsumexp(1) ** 2, 0.0)
    theirs = per.sum() / 5.0
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(xo.grad, xt.grad)


def test_native_and_torch_ops_paths_agree_in_half_precision():
    x, y = _problem((64, 300), 1, torch.bfloat16, probability=False, ignore=True)
    results = []
    for path in PATHS:
        xx = x.clone().requires_grad_(True)
        with _path(path):
            loss = ct.cross_entropy(xx, y, label_smoothing=0.1)
        loss.backward()
        assert loss.dtype == torch.bfloat16 and xx.grad.dtype == torch.bfloat16
        results.append((loss.float(), xx.grad.float()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-4, rtol=2e-2)
    exact = F.cross_entropy(x.double(), y, label_smoothing=0.1)
    torch.testing.assert_close(results[0][0].double(), exact, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("path", PATHS)
def test_gradients_flow_to_probability_targets_like_torch(path):
    x, t = _problem((5, 6), 1, torch.float64, probability=True, ignore=False)
    w = torch.rand(6, dtype=torch.float64)
    to, tt = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
    with _path(path):
        ours = ct.cross_entropy(x, to, w, label_smoothing=0.3)
    theirs = F.cross_entropy(x, tt, w, label_smoothing=0.3)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(to.grad, tt.grad)


@pytest.mark.parametrize("path", PATHS)
def test_gradcheck_in_float64(path):
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 4, -100], [1, 1, 2], [3, 0, 4], [2, -100, 1]])
    w = torch.rand(5, dtype=torch.float64)
    with _path(path):
        assert torch.autograd.gradcheck(lambda x: ct.cross_entropy(x, y, w, label_smoothing=0.1, z_loss=1e-2), (x,))
        assert torch.autograd.gradcheck(lambda x: ct.cross_entropy(x, y, reduction="none", softcap=2.0), (x,))


@pytest.mark.parametrize("path", PATHS)
def test_second_derivatives_like_torch(path):
    # Hessian-vector products and MAML differentiate the gradient again.
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[0, 4, -100], [1, 1, 2], [3, 0, 4], [2, -100, 1]])
    w = torch.rand(5, dtype=torch.float64)
    p = torch.softmax(torch.randn(4, 5, 3, dtype=torch.float64), 1).requires_grad_(True)
    with _path(path):
        assert torch.autograd.gradgradcheck(lambda x: ct.cross_entropy(x, y, w, label_smoothing=0.1), (x,))
        assert torch.autograd.gradgradcheck(lambda x, p: ct.cross_entropy(x, p, z_loss=1e-2, softcap=2.0), (x, p))
        v = torch.randn_like(x)
        hvp = []
        for loss_fn in (ct.cross_entropy, F.cross_entropy):
            (g,) = torch.autograd.grad(loss_fn(x, y, w, reduction="sum"), x, create_graph=True)
            hvp.append(torch.autograd.grad((g * v).sum(), x)[0])
    torch.testing.assert_close(hvp[0], hvp[1])


def test_losses_computed_outside_autograd_refuse_a_second_derivative():
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    for loss in (ct.linear_cross_entropy(x, W, y), ct.cross_entropy((x @ W.T), y, inplace_backward=True)):
        with pytest.raises(RuntimeError, match="has no second derivative"):
            torch.autograd.grad(loss, x, create_graph=True)


def test_compile_fullgraph_traces_a_model_without_graph_breaks():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    loss_fn = ct.CrossEntropyLoss(label_smoothing=0.1)

    def step(x, y):
        return loss_fn(model(x), y)

    explanation = torch._dynamo.explain(step)(torch.randn(4, 8), torch.randint(0, 5, (4,)))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True)  # raises on any graph break
    x, y = torch.randn(12, 8), torch.randint(0, 5, (12,))
    loss = compiled(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = F.cross_entropy(model(x), y, label_smoothing=0.1)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for got, want in zip(grads, [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want)


def test_compile_traces_the_functional_loss_without_cache_warnings():
    # The options cache is skipped while dynamo traces (it warns on functools caches it bypasses).
    torch._dynamo.reset()
    x, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = torch.compile(lambda a, b: ct.cross_entropy(a, b, label_smoothing=0.2), fullgraph=True)(x, y)
    assert not [w for w in caught if "cache" in str(w.message)], [str(w.message) for w in caught]
    torch.testing.assert_close(loss, F.cross_entropy(x, y, label_smoothing=0.2))


def test_module_weight_buffer_state_dict_and_repr():
    w = torch.rand(4)
    loss = ct.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1)
    assert repr(loss) == "CrossEntropyLoss(reduction='mean', ignore_index=2, label_smoothing=0.1)"
    state = loss.state_dict()
    assert list(state) == ["weight"]
    other = ct.CrossEntropyLoss(weight=torch.zeros(4), ignore_index=2, label_smoothing=0.1)
    other.load_state_dict(state)
    torch.testing.assert_close(other.weight, w)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    torch.testing.assert_close(other(x, y), F.cross_entropy(x, y, w, ignore_index=2, label_smoothing=0.1))
    assert other.to(torch.float64).weight.dtype == torch.float64
    nll = ct.NLLLoss(weight=w)
    torch.testing.assert_close(nll(torch.log_softmax(x, 1), y), F.nll_loss(torch.log_softmax(x, 1), y, w))


def test_bad_input_raises_before_anything_runs():
    x = torch.randn(3, 4)
    with pytest.raises(IndexError, match="target value 4"):
        ct.cross_entropy(x, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match="expected target shape"):
        ct.cross_entropy(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label_smoothing"):
        ct.cross_entropy(x, torch.tensor([0, 1, 2]), label_smoothing=-0.5)
    with pytest.raises(TypeError, match="torch tensors"):
        ct.cross_entropy(x.numpy(), torch.tensor([0, 1, 2]))


def test_the_callers_logits_are_never_written():
    x = torch.randn(5, 7, requires_grad=True)
    before = x.detach().clone()
    version = x._version
    ct.cross_entropy(x, torch.randint(0, 7, (5,))).backward()
    assert x._version == version
    torch.testing.assert_close(x.detach(), before, rtol=0, atol=0)


def test_gradients_in_reused_memory_match_torch(fresh_buffer_cache):
    # 4 MiB gradients (2^20 elements): large enough for crossent's buffer cache, which hands a freed
    # one's memory on, both for the gradient the forward saves and for the one backward returns.
    addresses = []
    for seed in range(3):
        x, target = _problem((512, 2048), 1, torch.float32, probability=False, ignore=True, seed=seed)
        ours = x.clone().requires_grad_(True)
        theirs = x.clone().requires_grad_(True)
        ct.cross_entropy(ours, target).backward()
        F.cross_entropy(theirs, target).backward()
        torch.testing.assert_close(ours.grad, theirs.grad)
        addresses.append(ours.grad.data_ptr())
        del ours  # its gradient with it: the next step's may take its memory
    assert addresses[1] == addresses[0] and addresses[2] == addresses[0]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("shape", "axis"), [((9, 2500), None), ((3, 6, 5, 4), None), ((2, 5, 40), -1)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inplace_backward_gives_torchs_gradients_through_the_logits_memory(path, shape, axis, reduction):
    g = torch.Generator().manual_seed(11)
    d = 6
    class_axis = 1 if axis is None else len(shape) - 1
    h = torch.randn(*shape[:class_axis], *shape[class_axis + 1 :], d, generator=g, dtype=torch.float64)
    W = torch.randn(shape[class_axis], d, generator=g, dtype=torch.float64)
    _, y = _problem(shape, class_axis, torch.float64, probability=False, ignore=True, seed=12)
    weight = torch.rand(shape[class_axis], generator=g, dtype=torch.float64) + 0.5
    kw = {"reduction": reduction, "label_smoothing": 0.1, "weight": weight}
    grads = []
    for inplace in [False, True]:
        hi, Wi = h.clone().requires_grad_(True), W.clone().requires_grad_(True)
        logits = (hi @ Wi.T).movedim(-1, class_axis).contiguous()  # a non-leaf, like a model's head
        version = logits._version
        with _path(path):
            loss = ct.cross_entropy(logits, y, axis=axis, inplace_backward=inplace, **kw)
        if not inplace:
            upstream = torch.rand(loss.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
            expected = F.cross_entropy(logits.movedim(class_axis, 1), y, **kw)
            torch.testing.assert_close(loss, expected)
        assert (logits._version > version) == inplace  # the caller's logits are written only when asked
        loss.backward(upstream)
        grads.append((hi.grad, Wi.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_inplace_backward_misuse_raises():
    g = torch.Generator().manual_seed(13)
    h, W = torch.randn(8, 5, generator=g, requires_grad=True), torch.randn(30, 5, generator=g, requires_grad=True)
    y = torch.randint(0, 30, (8,), generator=g)
    logits = h @ W.T
    # Another term saved the logits for its own backward: their version counter catches the overwrite.
    penalty = logits.pow(2).mean()
    loss = ct.cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + penalty).backward()
    loss = ct.cross_entropy(h @ W.T, y, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    t = torch.softmax(torch.randn(8, 30, generator=g), 1).requires_grad_(True)
    with pytest.raises(ValueError, match="probability target's gradient"):
        ct.cross_entropy(h @ W.T, t, inplace_backward=True)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_the_naive_loss(path, reduction, bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 16, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(37, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, 37, (2, 9), generator=g)
    y[0, :4] = -100
    w = torch.rand(37, generator=g, dtype=torch.float64) + 0.5
    kw = {"weight": w, "reduction": reduction, "label_smoothing": 0.1}
    with _path(path):
        ours = ct.linear_cross_entropy(x, W, y, linear_bias=b, chunk_size=5, **kw)
    naive = F.cross_entropy(F.linear(x, W, b).movedim(-1, 1), y, **kw)
    torch.testing.assert_close(ours, naive)
    upstream = torch.rand(ours.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
    params = [x, W] + ([b] if bias else [])
    got = torch.autograd.grad(ours, params, upstream)
    want = torch.autograd.grad(naive, params, upstream)
    for a, c in zip(got, want, strict=True):
        # float64 throughout: an upstream gradient rounded to float32 on the way would show at 1e-7.
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_linear_cross_entropy_is_chunk_size_invariant_and_skips_ignored_rows():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 8, generator=g, requires_grad=True)
    W = torch.randn(101, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 101, (50,), generator=g)
    y[::3] = -100
    results = []
    for chunk in [1, 7, 50, None]:
        loss = ct.linear_cross_entropy(x, W, y, chunk_size=chunk, z_loss=1e-3)
        results.append((loss, *torch.autograd.grad(loss, (x, W))))
    for other in results[1:]:
        for a, c in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)
    assert torch.all(results[0][1][::3] == 0)  # ignored rows get no gradient


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("probability", [False, True])
@pytest.mark.parametrize(
    "options", [{"label_smoothing": 0.1, "weighted": True, "bias": True}, {"z_loss": 1e-3, "softcap": 4.0}], ids=str
)
def test_linear_cross_entropy_in_vocabulary_chunks_matches_the_naive_loss(path, reduction, probability, options):
    # Chunks of 6 rows x 10 classes: each chunk's logits are computed per vocabulary chunk, twice.
    g = torch.Generator().manual_seed(6)
    kw = {k: v for k, v in options.items() if k not in ("weighted", "bias")}
    x = torch.randn(20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(37, generator=g, dtype=torch.float64, requires_grad=True) if options.get("bias") else None
    if options.get("weighted"):
        kw["weight"] = torch.rand(37, generator=g, dtype=torch.float64) + 0.5
    if probability:
        y = torch.softmax(torch.randn(20, 37, generator=g, dtype=torch.float64), 1)
    else:
        y = torch.randint(0, 37, (20,), generator=g)
        y[::4] = -100
    params = [x, W] + ([b] if b is not None else [])
    with _path(path):
        ours = ct.linear_cross_entropy(
            x, W, y, linear_bias=b, reduction=reduction, chunk_size=6, vocab_chunk_size=10, **kw
        )
    naive = ct.cross_entropy(F.linear(x, W, b), y, reduction=reduction, **kw)
    if "softcap" not in kw and "z_loss" not in kw:  # torch's own loss where it has the options
        torch.testing.assert_close(naive, F.cross_entropy(F.linear(x, W, b), y, reduction=reduction, **kw))
    torch.testing.assert_close(ours, naive)
    upstream = torch.rand(ours.shape, generator=g, dtype=torch.float64) if reduction == "none" else None
    for a, c in zip(
        torch.autograd.grad(ours, params, upstream), torch.autograd.grad(naive, params, upstream), strict=True
    ):
        torch.testing.assert_close(a, c)


def test_linear_chunks_stay_within_the_memory_budget_at_any_vocabulary():
    from crossent.torch._linear import _CHUNK_BUDGET_BYTES, _bytes_per_class, _chunk_shape

    assert _chunk_shape(32768, 4, None, None) == (192, 32768)  # 24 MiB of float32 logits
    for vocab, itemsize in [(32768, 4), (131072, 2), (262144, 4), (2**20, 2), (2**22, 4)]:
        rows, classes = _chunk_shape(vocab, itemsize, None, None)
        chunk_bytes = rows * classes * _bytes_per_class(itemsize)
        assert rows >= 128 and classes <= vocab
        assert chunk_bytes <= 4 * _CHUNK_BUDGET_BYTES, (vocab, itemsize, rows, classes)
        if classes < vocab:  # split: one budget
            assert chunk_bytes <= _CHUNK_BUDGET_BYTES


def test_linear_chunks_of_whole_rows_when_small_against_the_input():
    from crossent.torch._linear import _chunk_shape

    # 128 rows of V = 262144 float32 (128 MiB) are past the split threshold, but only an eighth of
    # 1024 rows' logits: no fourth matmul for a few percent of the naive loss's memory.
    assert _chunk_shape(262144, 4, None, None, n_rows=1024) == (128, 262144)
    assert _chunk_shape(262144, 4, None, None, n_rows=1023)[1] < 262144
    assert _chunk_shape(262144, 4, None, None)[1] < 262144


def test_linear_cross_entropy_probability_targets():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(6, 9, generator=g, dtype=torch.float64), 1)
    ours = ct.linear_cross_entropy(x, W, t, chunk_size=4)
    naive = F.cross_entropy(x @ W.T, t)
    torch.testing.assert_close(ours, naive)
    for a, c in zip(torch.autograd.grad(ours, (x, W)), torch.autograd.grad(naive, (x, W)), strict=True):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("matmul", ["float32", "input dtype"])
@pytest.mark.parametrize(
    ("chunk_size", "vocab_chunk_size", "budget"),
    [
        (16, None, None),
        (16, 64, None),
        # The defaults for half-precision weights: all rows in one chunk, the weight gradient written
        # once per vocabulary block in the weight's dtype (whole vocabulary, or blocks of a small budget).
        (None, None, None),
        (None, None, 40 * 64 * 4),
    ],
)
def test_linear_cross_entropy_in_half_precision(dtype, matmul, chunk_size, vocab_chunk_size, budget, monkeypatch):
    # Both matmul paths, whatever this CPU has: float32 matmuls (CPUs without half-precision matrix
    # instructions), whose float32 logits give a loss as exact as its rounding to `dtype`; and matmuls
    # in the input's dtype (CPUs with them, GPUs), whose logits are rounded to `dtype` as torch's
    # F.linear rounds them: the oracle is then the float64 loss of those rounded logits (torch's own
    # float16 loss overflows to inf here).
    from crossent.torch import _linear

    monkeypatch.setattr(_linear, "_matmul_dtype", lambda t: torch.float32 if matmul == "float32" else t.dtype)
    monkeypatch.setattr(_linear, "_MATMUL_CLASS_BLOCK", 128)  # several class blocks, the last one shorter
    if budget is not None:
        monkeypatch.setattr(_linear, "_CHUNK_BUDGET_BYTES", budget)
        monkeypatch.setattr(_linear, "_MIN_VOCAB_BLOCK", 1)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 32, generator=g).to(dtype).requires_grad_(True)
    W = (torch.randn(300, 32, generator=g) / 3).to(dtype).requires_grad_(True)
    b = torch.randn(300, generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, 300, (40,), generator=g)
    y[::5] = -100
    loss = ct.linear_cross_entropy(
        x, W, y, linear_bias=b, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, label_smoothing=0.05
    )
    grads = torch.autograd.grad(loss, (x, W, b))
    assert loss.dtype == dtype and [t.dtype for t in grads] == [dtype] * 3
    if matmul == "float32":
        leaves = [t.detach().double().requires_grad_(True) for t in (x, W, b)]
        want = F.cross_entropy(F.linear(*leaves), y, label_smoothing=0.05)
        want_grads = torch.autograd.grad(want, leaves)
        rtol = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-10  # one rounding to dtype
    else:
        want = F.cross_entropy(F.linear(x, W, b).double(), y, label_smoothing=0.05)
        want_grads = torch.autograd.grad(want, (x, W, b))
        rtol = 2.0**-5 if dtype == torch.bfloat16 else 2.0**-8  # a few roundings of the logits
    torch.testing.assert_close(loss.double(), want.double(), rtol=rtol, atol=0)
    for got, exp in zip(grads, want_grads, strict=True):
        scale = exp.abs().max().double()
        torch.testing.assert_close(got.double(), exp.double(), rtol=4 * rtol, atol=4 * rtol * scale)


def test_linear_module_and_argument_checks():
    loss = ct.LinearCrossEntropyLoss(8, 20, bias=True)
    x, y = torch.randn(5, 8), torch.randint(0, 20, (5,))
    torch.testing.assert_close(loss(x, y), F.cross_entropy(loss.linear(x), y))
    with pytest.raises(ValueError, match="does not match linear_weight's in_features 8"):
        ct.linear_cross_entropy(torch.randn(5, 7), loss.linear.weight, y)
    with pytest.raises(IndexError, match="target value 20"):
        ct.linear_cross_entropy(x, loss.linear.weight, torch.tensor([0, 1, 20, 3, 4]))
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        ct.linear_cross_entropy(x, loss.linear.weight, y, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_chunk_size must be at least 1, got 0"):
        ct.linear_cross_entropy(x, loss.linear.weight, y, vocab_chunk_size=0)
    with pytest.raises(ValueError, match=r"linear_weight has dtype torch\.float64, expected input's dtype"):
        ct.linear_cross_entropy(x, loss.linear.weight.double(), y)


def test_import_crossent_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, crossent; assert 'torch' not in sys.modules and 'jax' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
