"""crossent's Triton kernel under Triton's interpreter, on CPU tensors, against the float64 oracle.

Triton and the kernels are loaded here with TRITON_INTERPRET=1 (restored right after; crossent sets it
again around each launch on CPU tensors). What the interpreter cannot
show: it computes bfloat16 and tl.dot in float32 and runs programs one at a time, so GPU rounding and
races are invisible to it (see docs/gpu.md). The interpreter costs about 0.1 s per row and launch:
the shapes are small, with few rows.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

# Before triton is imported (nothing imports it at collection time): Triton decorates its own library
# functions as interpreted then. The variable is restored right after; crossent sets it again around
# each launch on CPU tensors, which the interpreter also reads.
_saved = os.environ.get("TRITON_INTERPRET")
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    triton = pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    ct = pytest.importorskip("crossent.torch")
    from crossent.torch import _triton
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

import oracle  # noqa: E402

if not _triton.INTERPRETED:  # triton was imported earlier in this process without the interpreter
    raise RuntimeError("triton was imported before tests/test_triton.py could set TRITON_INTERPRET=1")

F = torch.nn.functional


@pytest.fixture(autouse=True)
def _triton_backend():
    with ct.use_backend("triton"):
        yield


def _problem(shape, class_axis, *, probability, seed=0, ignore=0.3):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(*shape, generator=g, dtype=torch.float64)
    n_classes = shape[class_axis]
    if probability:
        t = torch.rand(*shape, generator=g, dtype=torch.float64)
        return x, t / t.sum(class_axis, keepdim=True)
    batch = shape[:class_axis] + shape[class_axis + 1 :]
    target = torch.randint(0, n_classes, batch, generator=g)
    target[torch.rand(batch, generator=g) < ignore] = -100
    return x, target


def _check(x64, target, dtype, *, axis=None, weighted=False, upstream_seed=1, **kw):
    """crossent under the Triton backend in ``dtype`` against the float64 oracle on the same (rounded)
    values: loss and d(loss)/d(x) for a random upstream gradient."""
    x = x64.to(dtype)
    class_axis = (0 if x.ndim == 1 else 1) if axis is None else axis % x.ndim
    w64 = None
    if weighted:
        w64 = torch.rand(x.shape[class_axis], generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    t = target.to(dtype) if target.is_floating_point() else target
    xr = x.clone().requires_grad_(True)
    loss = ct.cross_entropy(xr, t, None if w64 is None else w64.to(dtype), axis=axis, **kw)
    g = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.rand(loss.shape, generator=g, dtype=torch.float64) + 0.5
    loss.backward(upstream.to(dtype))
    kw = dict(kw)
    norm = kw.pop("normalizer", None)
    if isinstance(norm, torch.Tensor):
        norm = float(norm)
    expected = oracle.cross_entropy(
        x.double().numpy(), (t.double() if t.is_floating_point() else t).numpy(),
        None if w64 is None else w64.to(dtype).double().numpy(), axis=axis, normalizer=norm,
        grad_output=upstream.numpy(), **kw,
    )  # fmt: skip
    assert loss.dtype == dtype
    oracle.assert_close(loss.detach().double().numpy(), expected.loss, dtype, what="loss")
    oracle.assert_close(xr.grad.double().numpy(), expected.grad, dtype, what="grad")


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"weighted": True},
    {"label_smoothing": 0.2},
    {"weighted": True, "label_smoothing": 0.2, "reduction": "sum"},
    {"z_loss": 1e-2},
    {"softcap": 4.0},
    {"normalizer": 5.0},
    {"weighted": True, "normalizer": torch.tensor(3.0)},
    {"weighted": True, "z_loss": 1e-3, "softcap": 3.0, "label_smoothing": 0.1, "reduction": "none"},
]


@pytest.mark.parametrize("probability", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
@pytest.mark.parametrize("shape", [(3, 5), (7, 1000)], ids=str)
def test_option_grid_float32(shape, options, probability):
    x, target = _problem(shape, 1, probability=probability)
    _check(x, target, torch.float32, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("probability", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize(
    "options", [{}, {"weighted": True, "label_smoothing": 0.1, "z_loss": 1e-3}], ids=["defaults", "all"]
)
def test_half_precision(dtype, probability, options):
    x, target = _problem((7, 1000), 1, probability=probability, seed=2)
    _check(x, target, dtype, **options)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("axis", "options"),
    [(None, {}), (None, {"weighted": True, "label_smoothing": 0.2, "softcap": 2.0}), (-1, {"reduction": "none"})],
    ids=["dim1", "dim1-options", "last-axis"],
)
def test_spatial_layouts(axis, options):
    # (N, C, d1, d2) = (2, 3, 4, 5): classes strided by 20 within a row (inner = 20), 40 rows; or with
    # axis=-1 the 5 classes last, 24 rows.
    class_axis = 1 if axis is None else 3
    x, target = _problem((2, 3, 4, 5), class_axis, probability=False, seed=4)
    _check(x, target, torch.float32, axis=axis, **options)


def test_spatial_layout_with_probabilities():
    x, target = _problem((2, 3, 2, 3), 1, probability=True, seed=5)
    _check(x, target, torch.float32, weighted=True, label_smoothing=0.1)


@pytest.mark.parametrize("blocks", [None, (1024, 512)], ids=["one block", "blocks of 512"])
@pytest.mark.parametrize("probability", [False, True], ids=["indices", "probabilities"])
def test_2049_classes_across_block_edges(monkeypatch, blocks, probability):
    # 2049 = 4 * 512 + 1: with blocks of 512 the last block holds one class; in one block of 4096, 2047
    # lanes are padding.
    if blocks:
        monkeypatch.setattr(_triton, "MAX_KEPT_CLASSES_WITH_OPTIONS", blocks[0])
        monkeypatch.setattr(_triton, "LOOP_BLOCK", blocks[1])
    x, target = _problem((3, 2049), 1, probability=probability, seed=6)
    if not probability:
        target[0] = 2048  # the class alone in the last block
    _check(x, target, torch.float32, weighted=True, label_smoothing=0.1, z_loss=1e-3, softcap=6.0)


def test_which_rows_are_read_once():
    # The real limits (no launch): plain class-index rows are kept up to 32768 classes, rows with
    # weights, smoothing, a cap or probability targets up to 8192; warps grow with the kept row.
    assert _triton._block(32768, True) == (32768, True, 32)
    assert _triton._block(32769, True) == (_triton.LOOP_BLOCK, False, _triton.LOOP_WARPS)
    assert _triton._block(8192, False) == (8192, True, 16)
    assert _triton._block(8193, False) == (_triton.LOOP_BLOCK, False, _triton.LOOP_WARPS)
    assert _triton._block(5, True) == (16, True, 4)


def _spy_blocks(monkeypatch):
    """Record the ONE_BLOCK of every launch of the main kernel."""
    seen = []
    real = _triton._block

    def spy(n_classes, plain):
        result = real(n_classes, plain)
        seen.append(result[1])
        return result

    monkeypatch.setattr(_triton, "_block", spy)
    return seen


# Rows on both sides of each limit, with the limits lowered (32 classes plain, 16 with options; blocks
# of 8 beyond), in every dtype: the kept row (one read) and the two-pass row must both match the oracle.
THRESHOLD_CASES = [
    pytest.param(32, {}, False, True, id="plain-32-kept"),
    pytest.param(33, {}, False, False, id="plain-33-two-pass"),
    pytest.param(32, {"z_loss": 1e-2, "reduction": "none"}, False, True, id="z-32-kept"),
    pytest.param(33, {"z_loss": 1e-2, "reduction": "none"}, False, False, id="z-33-two-pass"),
    pytest.param(16, {"weighted": True, "label_smoothing": 0.1, "softcap": 3.0}, False, True, id="options-16-kept"),
    pytest.param(17, {"weighted": True, "label_smoothing": 0.1, "softcap": 3.0}, False, False, id="options-17-2pass"),
    pytest.param(16, {"label_smoothing": 0.1}, True, True, id="probabilities-16-kept"),
    pytest.param(17, {"label_smoothing": 0.1}, True, False, id="probabilities-17-two-pass"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n_classes", "options", "probability", "kept"), THRESHOLD_CASES)
def test_rows_on_both_sides_of_the_one_read_limit(monkeypatch, dtype, n_classes, options, probability, kept):
    monkeypatch.setattr(_triton, "MAX_KEPT_CLASSES", 32)
    monkeypatch.setattr(_triton, "MAX_KEPT_CLASSES_WITH_OPTIONS", 16)
    monkeypatch.setattr(_triton, "LOOP_BLOCK", 8)
    seen = _spy_blocks(monkeypatch)
    x, target = _problem((3, n_classes), 1, probability=probability, seed=13 + n_classes)
    _check(x, target, dtype, **options)
    assert seen == [kept]


@pytest.mark.parametrize(("n_classes", "kept"), [(32768, True), (32769, False)])
def test_rows_at_the_real_one_read_limit(monkeypatch, n_classes, kept):
    seen = _spy_blocks(monkeypatch)
    x, target = _problem((2, n_classes), 1, probability=False, seed=14, ignore=0.0)
    target[1] = n_classes - 1  # the last class: alone in the last block of the two-pass row
    _check(x, target, torch.bfloat16, z_loss=1e-3)
    assert seen == [kept]


@pytest.mark.parametrize("zero_if_all_ignored", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_batch(reduction, zero_if_all_ignored):
    x, _ = _problem((4, 6), 1, probability=False)
    target = torch.full((4,), -100)
    _check(x, target, torch.float32, reduction=reduction, zero_if_all_ignored=zero_if_all_ignored)


@pytest.mark.filterwarnings(
    "ignore:invalid value:RuntimeWarning", "ignore:divide by zero:RuntimeWarning"
)  # NumPy's, inside the interpreter
@pytest.mark.parametrize("blocks", [None, (4, 2)], ids=["one block", "blocks of 2"])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-2}], ids=["defaults", "smoothing,z"])
def test_rows_with_infinite_logits(monkeypatch, blocks, options):
    if blocks:
        for limit in ("MAX_KEPT_CLASSES", "MAX_KEPT_CLASSES_WITH_OPTIONS"):
            monkeypatch.setattr(_triton, limit, blocks[0])
        monkeypatch.setattr(_triton, "LOOP_BLOCK", blocks[1])
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x[0, :3] = -torch.inf  # some -inf (a whole first block of 2 among them), the target finite
    x[1, 2] = -torch.inf  # the target's logit is -inf: an infinite loss
    x[2, :] = -torch.inf  # no finite logit: NaN, as torch
    x[3, 4] = torch.inf  # +inf: NaN, as torch
    target = torch.tensor([4, 2, 1, 0, 6])
    _check(x, target, torch.float32, reduction="none", **options)


def test_deterministic():
    x, target = _problem((7, 1000), 1, probability=False, seed=8)
    runs = []
    for _ in range(2):
        xr = x.float().requires_grad_(True)
        loss = ct.cross_entropy(xr, target, label_smoothing=0.1)
        loss.backward()
        runs.append((loss.detach(), xr.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("axis", [None, -1])
def test_inplace_backward(axis):
    x, target = _problem((2, 3, 4), 1 if axis is None else 2, probability=False, seed=9)
    xr = x.float().requires_grad_(True)
    y = xr * 1.0  # a non-leaf the loss may overwrite
    loss = ct.cross_entropy(y, target, axis=axis, inplace_backward=True, label_smoothing=0.1)
    loss.backward()
    expected = oracle.cross_entropy(x.float().double().numpy(), target.numpy(), axis=axis, label_smoothing=0.1)
    oracle.assert_close(loss.detach().double().numpy(), expected.loss, torch.float32, what="loss")
    oracle.assert_close(xr.grad.double().numpy(), expected.grad, torch.float32, what="grad")


def test_out_of_range_class_gives_nan_in_the_kernel():
    # On the CPU the op raises before the kernel runs; a GPU cannot check without a host sync, so the
    # kernel itself gives NaN for the row (loss and gradient) and leaves the others exact.
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(10))
    target = torch.tensor([1, 7, 2])
    grad = torch.empty_like(x)
    opts = ct._functional.loss_options(reduction="none", ignore_index=-100)
    per_row = _triton.rows_loss_and_grad(x, target, None, 1, opts, None, grad)
    assert torch.isnan(per_row[1]) and torch.isnan(grad[1]).all()
    expected = oracle.cross_entropy(x.double().numpy(), np.array([1, 0, 2]), reduction="none")
    oracle.assert_close(per_row[[0, 2]].double().numpy(), expected.loss[[0, 2]], torch.float32)
    oracle.assert_close(grad[[0, 2]].double().numpy(), expected.grad[[0, 2]], torch.float32)


def test_out_of_range_class_still_raises_on_the_cpu():
    with pytest.raises(IndexError, match="target value 7 is out of range"):
        ct.cross_entropy(torch.randn(3, 5), torch.tensor([1, 7, 2]))


LINEAR_OPTIONS = [
    {},
    {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0},
    {"weighted": True, "label_smoothing": 0.2},
]


@pytest.mark.parametrize("probability", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("chunks", [{"chunk_size": 4}, {"chunk_size": 4, "vocab_chunk_size": 4}], ids=["rows", "vocab"])
@pytest.mark.parametrize("options", LINEAR_OPTIONS, ids=["defaults", "smoothing,z,cap", "weighted,smoothing"])
def test_linear_cross_entropy(chunks, options, probability):
    # vocab_chunk_size=4 over V = 11: slices of 4, 4 and 3 classes combined by crossent.torch._vocab_slices
    # (the vocabulary-parallel loss's code), each slice's gradient from the Triton slice kernel.
    g = torch.Generator().manual_seed(11)
    x64, W64, b64 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((9, 6), (11, 6), (11,)))
    if probability:
        t = torch.rand(9, 11, generator=g, dtype=torch.float64)
        target = t / t.sum(1, keepdim=True)
    else:
        target = torch.randint(0, 11, (9,), generator=g)
        target[2] = -100
    options = dict(options)
    w64 = torch.rand(11, generator=g, dtype=torch.float64) + 0.1 if options.pop("weighted", False) else None
    x, W, b = (t.float().requires_grad_(True) for t in (x64, W64, b64))
    loss = ct.linear_cross_entropy(
        x, W, target.float() if probability else target, linear_bias=b, weight=None if w64 is None else w64.float(),
        **chunks, **options,
    )  # fmt: skip
    loss.backward()
    ref = [t.clone().requires_grad_(True) for t in (x64, W64, b64)]
    logits = ref[0] @ ref[1].T + ref[2]
    cap = options.get("softcap")
    if cap:
        logits = cap * torch.tanh(logits / cap)
    smoothing = options.get("label_smoothing", 0.0)
    expected = F.cross_entropy(logits, target, w64, label_smoothing=smoothing, reduction="none")
    valid = torch.ones(9, dtype=torch.bool) if probability else target != -100
    z = options.get("z_loss", 0.0)
    expected = (expected + torch.where(valid, z * torch.logsumexp(logits, 1) ** 2, 0.0)).sum()
    if probability:
        expected = expected / 9
    else:
        expected = (
            expected / (valid.double() if w64 is None else torch.where(valid, w64[target.clamp(min=0)], 0.0)).sum()
        )
    expected.backward()
    oracle.assert_close(loss.detach().double().numpy(), expected.detach().numpy(), torch.float32, what="loss")
    for name, ours, theirs in zip(("x", "W", "b"), (x, W, b), ref, strict=True):
        oracle.assert_close(ours.grad.double().numpy(), theirs.grad.numpy(), torch.float32, what=name)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    x, target = _problem((3, 5), 1, probability=False, seed=12)
    xr = x.float().requires_grad_(True)
    fn = torch.compile(lambda a, t: ct.cross_entropy(a, t, label_smoothing=0.1), fullgraph=True, backend="eager")
    loss = fn(xr, target)
    loss.backward()
    expected = oracle.cross_entropy(x.float().double().numpy(), target.numpy(), label_smoothing=0.1)
    oracle.assert_close(loss.detach().double().numpy(), expected.loss, torch.float32)
    oracle.assert_close(xr.grad.double().numpy(), expected.grad, torch.float32)


def test_backend_errors():
    with pytest.raises(ValueError, match="'cuda'"):
        ct.use_backend("cuda")
    with pytest.raises(TypeError, match="float64"):
        ct.cross_entropy(torch.randn(3, 5, dtype=torch.float64), torch.tensor([1, 2, 3]))
    from crossent.torch import _backend

    # (a meta tensor stands for a GPU one: the loss itself would run its fake implementation)
    with ct.use_backend("native"), pytest.raises(RuntimeError, match="CPU tensors only, got a meta tensor"):
        _backend.resolve(torch.empty(3, 5, device="meta"))
    with pytest.raises(RuntimeError, match="CUDA/ROCm tensors, got a meta tensor"):
        _backend.resolve(torch.empty(3, 5, device="meta"))


def test_use_backend_as_a_call_and_a_context():
    from crossent.torch import _backend

    before = _backend.current()
    with ct.use_backend("torch"):
        assert _backend.current() == "torch"
        ct.use_backend("native")
        assert _backend.current() == "native"
    assert _backend.current() == before


@pytest.mark.slow
def test_cpu_tensors_without_the_interpreter_raise_a_clear_error():
    code = (
        "import torch, crossent.torch as ct\n"
        "with ct.use_backend('triton'):\n"
        "    ct.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    import crossent

    src = os.path.dirname(os.path.dirname(crossent.__file__))  # the crossent this process imported
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "TRITON_INTERPRET=1" in run.stderr, run.stderr[-2000:]


_COMPILE_FOR_A_GPU = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from crossent.torch._triton import kernels

main = {"x_ptr": "*bf16", "target_ptr": "*i64", "weight_ptr": "*fp32", "weight_sum_ptr": "*fp32",
        "upstream_ptr": "*fp32", "upstream_stride": "i32", "loss_ptr": "*fp32", "grad_ptr": "*bf16",
        "n_classes": "i32", "inner": "i32", "ignore_index": "i32", "eps": "fp32", "z_loss": "fp32",
        "softcap": "fp32"}
every = {"HAS_WEIGHT": True, "SMOOTH": True, "ZLOSS": True, "SOFTCAP": True}
none = {"HAS_WEIGHT": False, "SMOOTH": False, "ZLOSS": False, "SOFTCAP": False}
sliced = {"x_ptr": "*fp16", "target_ptr": "*i64", "weight_ptr": "*fp32", "lse_ptr": "*fp32", "a_ptr": "*fp32",
          "b_ptr": "*fp32", "fix_ptr": "*fp32", "scale_ptr": "*fp32", "valid_ptr": "*i1", "grad_ptr": "*fp32",
          "n_classes": "i32", "start": "i32", "eps": "fp32", "total": "i32", "softcap": "fp32"}
variants = [
    (kernels.cross_entropy_kernel, main, dict(PROB=False, WRITE_GRAD=True, ONE_BLOCK=True, BLOCK=4096, **every), 8),
    (kernels.cross_entropy_kernel, {**main, "target_ptr": "*bf16"},
     dict(PROB=True, WRITE_GRAD=True, ONE_BLOCK=False, BLOCK=4096, **every), 8),
    # Triton passes integer arguments equal to 1 as constants: a row of one class, classes last.
    (kernels.cross_entropy_kernel, main,
     dict(PROB=False, WRITE_GRAD=False, ONE_BLOCK=True, BLOCK=16, n_classes=1, inner=1, upstream_stride=1, **none), 4),
    # The largest kept rows: plain class indices (32768 classes, 32 warps), probabilities kept with the row.
    (kernels.cross_entropy_kernel, main,
     dict(PROB=False, WRITE_GRAD=True, ONE_BLOCK=True, BLOCK=32768, **{**none, "ZLOSS": True}), 32),
    (kernels.cross_entropy_kernel, {**main, "target_ptr": "*fp16", "x_ptr": "*fp16", "grad_ptr": "*fp16"},
     dict(PROB=True, WRITE_GRAD=True, ONE_BLOCK=True, BLOCK=8192, **every), 16),
    (kernels.slice_gradient_kernel, sliced,
     dict(PROB=False, HAS_WEIGHT=True, SMOOTH=True, SOFTCAP=True, BLOCK=4096), 8),
    (kernels.nll_kernel, {"x_ptr": "*bf16", "target_ptr": "*i64", "weight_ptr": "*bf16", "loss_ptr": "*fp32",
                          "n_rows": "i32", "n_classes": "i32", "inner": "i32", "ignore_index": "i32"},
     dict(HAS_WEIGHT=True, BLOCK=256), 4),
]
for fn, signature, constants, warps in variants:
    signature = {**signature, **{name: "constexpr" for name in constants}}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"], fn
print("compiled", len(variants))
"""


@pytest.mark.slow
def test_kernels_compile_for_a_gpu():
    # The interpreter runs the kernels' Python, not Triton's compiler: code that only fails to compile
    # (types, constants) would pass above. Compiling for sm_90 needs no GPU (Triton ships ptxas); it
    # must run without TRITON_INTERPRET, so in a subprocess.
    import crossent

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (os.path.dirname(os.path.dirname(crossent.__file__)), env.get("PYTHONPATH")) if p
    )
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_A_GPU], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0 and "compiled 7" in run.stdout, run.stderr[-3000:]


def _check_nll(x64, target, dtype, *, axis=None, weighted=False, reduction="mean", **kw):
    """crossent.torch.nll_loss under the Triton backend in ``dtype`` against torch's nll_loss in float64
    on the same (rounded) log-probabilities: loss and d(loss)/d(input) for a random upstream gradient."""
    x = x64.to(dtype)
    class_axis = (0 if x.ndim == 1 else 1) if axis is None else axis % x.ndim
    w = None
    if weighted:
        w = (torch.rand(x.shape[class_axis], generator=torch.Generator().manual_seed(3)) + 0.1).to(dtype)
    xr = x.clone().requires_grad_(True)
    loss = ct.nll_loss(xr, target, w, axis=axis, reduction=reduction, **kw)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    loss.backward(upstream.to(dtype))
    ref = x.double().movedim(class_axis, 1).contiguous() if x.ndim > 1 else x.double()
    ref = ref.requires_grad_(True)
    expected = F.nll_loss(ref, target, None if w is None else w.double(), reduction=reduction)
    if kw.get("normalizer") is not None:
        expected = F.nll_loss(ref, target, None if w is None else w.double(), reduction="sum") / kw["normalizer"]
    expected.backward(upstream)
    assert loss.dtype == dtype
    oracle.assert_close(loss.detach().double().numpy(), expected.detach().numpy(), dtype, what="loss")
    grad = ref.grad.movedim(1, class_axis) if x.ndim > 1 else ref.grad
    oracle.assert_close(xr.grad.double().numpy(), grad.numpy(), dtype, what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "options",
    [{}, {"reduction": "sum"}, {"reduction": "none"}, {"weighted": True}, {"weighted": True, "normalizer": 4.0}],
    ids=["mean", "sum", "none", "weighted", "weighted,normalizer"],
)
def test_nll_loss(dtype, options):
    # 600 rows: the gather kernel's 256 rows a program, the last program partly empty.
    x, target = _problem((600, 9), 1, probability=False, seed=15)
    _check_nll(torch.log_softmax(x, 1), target, dtype, **options)


@pytest.mark.parametrize("axis", [None, -1])
def test_nll_loss_layouts(axis):
    x, target = _problem((2, 3, 4, 5), 1 if axis is None else 3, probability=False, seed=16)
    _check_nll(torch.log_softmax(x, 1 if axis is None else 3), target, torch.float32, axis=axis, weighted=True)


def test_nll_loss_runs_the_triton_kernel(monkeypatch):
    calls = []
    real = _triton.nll_loss
    monkeypatch.setattr(_triton, "nll_loss", lambda *a: calls.append(1) or real(*a))
    ct.nll_loss(torch.randn(3, 4).log_softmax(1), torch.tensor([0, 1, 2]))
    assert calls == [1]
    with pytest.raises(TypeError, match="float64"):
        ct.nll_loss(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2]))


def test_nll_loss_out_of_range_class_gives_nan_in_the_kernel():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(17)).log_softmax(1)
    shape = _triton.LossShape(class_axis=1, n_classes=5, batch_shape=(3,), probability_target=False)
    opts = ct._functional.loss_options(reduction="none", ignore_index=-100)
    per_row = _triton.nll_loss(x, torch.tensor([1, 7, -100]), None, shape, opts)
    assert torch.isnan(per_row[1]) and per_row[2] == 0 and per_row[0] == -x[0, 1]
