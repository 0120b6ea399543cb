"""The host side of crossent's Triton kernel: layouts, block sizes, the launch, the batch reduction.

Imported only when the Triton backend runs (crossent.torch._backend), so that ``import crossent.torch``
never imports triton. Every call is asynchronous on a GPU: the mean's denominator and the upstream
gradient are tensors computed by torch operations, read by the kernel from device memory, and the
batch sum is ``torch.sum`` over the per-row losses (a fixed order, no atomics): no host
synchronisation, and the same bits run after run.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
import triton

from ..._validate import LossOptions, LossShape
from .._reduction import mean_denominator_and_scale, reduce_losses
from . import kernels

# Whether Triton runs under its interpreter: TRITON_INTERPRET=1 when triton was first imported (its own
# library functions, tl.max's and tl.sum's combine functions among them, are decorated then) and when
# crossent's kernels were. Programs then run on CPU tensors, one at a time, in NumPy.
INTERPRETED = all(
    type(f).__name__ == "InterpretedFunction"
    for f in (kernels.cross_entropy_kernel, triton.language.standard._sum_combine)
)


@contextlib.contextmanager
def _launch_scope(x: torch.Tensor) -> Iterator[None]:
    """Where a launch runs: on a GPU, the tensor's device made current (Triton launches on the current
    device, which need not be the tensor's); on the CPU, TRITON_INTERPRET=1 for the duration of the
    launch (the interpreter reads it while it runs too, and a test may have unset it after loading
    triton and the kernels)."""
    if x.device.type != "cpu":
        with torch.cuda.device(x.device):
            yield
        return
    if os.environ.get("TRITON_INTERPRET") == "1":
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Which rows are read once. A row whose block (its classes padded to a power of two) is at most
# MAX_KEPT_CLASSES is loaded once and kept in registers, as loaded, for both the statistics and the
# gradient; the program's warps grow with it (16 values a thread up to 32 warps, as quack's kernel
# does). Longer rows are read in blocks of LOOP_BLOCK twice, once for the statistics and once for the
# loss terms and the gradient: holding them would spill registers to local memory, and the second read
# of a row just read mostly hits the L2 cache (50 MB on an H100/H200, a few MB of rows in flight). That
# is the design reasoning: no GPU has measured it yet.
#
# The limits are register counts measured by compiling for sm_90 without a GPU (triton.compile +
# cuobjdump -res-usage; stack bytes are spills), with the gradient:
#   class indices, no weights/smoothing/cap (z-loss allowed): 32768 classes at 32 warps (1024 threads,
#     64 registers each): float32 64 registers, 0 (z-loss: 64) stack bytes; bfloat16 56 (144). 16-bit
#     logits take no fewer registers (they are widened as loaded): 65536 bfloat16 classes spill 424
#     bytes even without options, so the limit is in classes, not bytes;
#   weights, smoothing, soft cap or probability targets: 8192 classes at 16 warps: 128 registers, up to
#     64 stack bytes; their extra per-class terms at 32 warps (the 64-register cap) spill 290-2000 bytes,
#     and 16384 classes at 16 warps 450-470;
#   longer rows in blocks of 4096 at 8 warps: float32 109 / 171 registers (none / every option), no spill.
MAX_KEPT_CLASSES = 32768
MAX_KEPT_CLASSES_WITH_OPTIONS = 8192
LOOP_BLOCK = 4096
LOOP_WARPS = 8
MAX_WARPS = 32
_VALUES_PER_THREAD = 16


def _block(n_classes: int, plain: bool) -> tuple[int, bool, int]:
    """(BLOCK, ONE_BLOCK, num_warps) for a row of ``n_classes``; ``plain``: class-index targets without
    weights, smoothing or soft cap."""
    block = max(16, triton.next_power_of_2(n_classes))
    if block <= (MAX_KEPT_CLASSES if plain else MAX_KEPT_CLASSES_WITH_OPTIONS):
        return block, True, _warps(block)
    return LOOP_BLOCK, False, LOOP_WARPS


def _warps(block: int) -> int:
    return min(MAX_WARPS, max(4, block // (32 * _VALUES_PER_THREAD)))


def check_device(t: torch.Tensor) -> None:
    """Raise unless the kernels can run on ``t``'s device (a GPU, or the CPU under the interpreter)."""
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "crossent.torch.use_backend('triton') got CPU tensors, which Triton runs only under its "
            "interpreter: set the environment variable TRITON_INTERPRET=1 before triton is first imported in "
            "the process (it was not set then, or not when crossent's kernels were first loaded)"
        )
    if t.dtype not in DTYPES:
        raise TypeError(
            f"crossent's Triton kernel takes float32, bfloat16 or float16 logits, got {t.dtype}; "
            "use crossent.torch.use_backend('torch') (or 'native' on the CPU) for float64"
        )


def rows_loss_and_grad(
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    class_axis: int,
    opts: LossOptions,
    upstream: torch.Tensor | None,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row float32 losses (shape: the batch, flattened) of contiguous ``x``; with ``grad`` (a
    tensor like ``x``, possibly ``x`` itself) the gradient for the per-row ``upstream`` (0-d: shared by
    every row; (rows,): one each, float32) is written there. ``opts`` is taken per row: its reduction,
    normalizer and zero_if_all_ignored are the caller's business."""
    check_device(x)
    n_classes = x.shape[class_axis]
    inner = math.prod(x.shape[class_axis + 1 :])
    rows = x.numel() // n_classes if n_classes else math.prod(x.shape[:class_axis]) * inner
    per_row = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return per_row
    probability = target.is_floating_point()
    smooth = opts.label_smoothing > 0
    if upstream is None:
        upstream = torch.ones((), dtype=torch.float32, device=x.device)
    upstream = upstream.to(torch.float32).contiguous()
    w = None if weight is None else weight.contiguous()
    w_sum = w.to(torch.float32).sum().reshape(1) if w is not None and smooth and not probability else None
    with _launch_scope(x):
        _launch(x, target, w, w_sum, upstream, per_row, grad, n_classes, inner, opts, probability, smooth)
    return per_row


def _launch(x, target, w, w_sum, upstream, per_row, grad, n_classes, inner, opts, probability, smooth) -> None:
    plain = not (probability or smooth or w is not None or opts.softcap is not None)
    block, one, warps = _block(n_classes, plain)
    rows = per_row.numel()
    kernels.cross_entropy_kernel[(rows,)](
        x, target.contiguous(), w if w is not None else x, w_sum if w_sum is not None else per_row,
        upstream, 0 if upstream.ndim == 0 else 1, per_row, grad if grad is not None else x,
        n_classes, inner, opts.ignore_index, float(opts.label_smoothing), float(opts.z_loss),
        float(opts.softcap or 0.0),
        PROB=probability, HAS_WEIGHT=w is not None, SMOOTH=smooth, ZLOSS=opts.z_loss > 0,
        SOFTCAP=opts.softcap is not None, WRITE_GRAD=grad is not None, ONE_BLOCK=one, BLOCK=block,
        num_warps=warps,
    )  # fmt: skip


def loss_and_grad(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    shape: LossShape,
    opts: LossOptions,
    compute_grad: bool,
    *,
    in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The op's contract (crossent.torch._ops): the reduced loss in the input's dtype and d(loss)/d(input)
    for a unit upstream gradient per element (for mean: 1 / the denominator, as a tensor). ``in_place``:
    the gradient overwrites the (contiguous) input."""
    check_device(input)
    x = input if in_place else input.contiguous()
    rows = math.prod(shape.batch_shape)
    denom, scale = mean_denominator_and_scale(target, weight, opts, rows=rows)
    grad = (x if in_place else torch.empty_like(x)) if compute_grad else None
    per_row_opts = opts
    per_row = rows_loss_and_grad(x, target, weight, shape.class_axis, per_row_opts, scale, grad)
    per_element = per_row.reshape(shape.batch_shape)
    if opts.reduction == "none":
        return per_element.to(input.dtype), grad
    return reduce_losses(per_element, denom, opts).to(input.dtype), grad


NLL_ROWS = 256  # rows per program of the NLL gather


def nll_loss(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, shape: LossShape, opts: LossOptions
) -> torch.Tensor:
    """crossent.torch._nll's contract: the reduced NLL loss in the input's dtype (-w_y input[y] per
    element; the mean over the summed weights of the counted targets), computed in float32. The batch
    reduction is the cross-entropy's (torch.sum over the per-row losses: a fixed order)."""
    check_device(input)
    x = input.contiguous()
    rows = math.prod(shape.batch_shape)
    per_row = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        inner = math.prod(x.shape[shape.class_axis + 1 :])
        w = None if weight is None else weight.contiguous()
        with _launch_scope(x):
            kernels.nll_kernel[(triton.cdiv(rows, NLL_ROWS),)](
                x, target.contiguous(), w if w is not None else x, per_row, rows, shape.n_classes, inner,
                opts.ignore_index, HAS_WEIGHT=w is not None, BLOCK=NLL_ROWS,
            )  # fmt: skip
    per_element = per_row.reshape(shape.batch_shape)
    if opts.reduction == "none":
        return per_element.to(input.dtype)
    denom, _scale = mean_denominator_and_scale(target, weight, opts, rows=rows)
    return reduce_losses(per_element, denom, opts).to(input.dtype)


def slice_gradient(
    local: torch.Tensor,
    target: torch.Tensor,
    start: int,
    total: int,
    weight: torch.Tensor | None,
    opts: LossOptions,
    terms: Any,
    upstream: torch.Tensor,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """crossent.torch._vocab_slices.slice_gradient's contract with the kernel: the gradient of one
    (rows, V_slice) slice of logits from the combined row terms, into ``out`` (any float dtype) or a
    tensor like ``local``. ``weight``: the slice's class weights."""
    check_device(local)
    x = local.contiguous()
    rows, n_classes = x.shape
    grad = out if out is not None else torch.empty_like(x)
    if rows == 0 or n_classes == 0:
        return grad
    f32 = [t.to(torch.float32).contiguous() for t in (terms.lse, terms.A, terms.B, terms.fix, upstream)]
    probability = target.is_floating_point()
    block = min(LOOP_BLOCK, max(16, triton.next_power_of_2(n_classes)))
    warps = min(LOOP_WARPS, _warps(block))
    with _launch_scope(x):
        kernels.slice_gradient_kernel[(rows,)](
            x, target.contiguous(), weight.contiguous() if weight is not None else x, *f32,
            terms.valid.contiguous(), grad, n_classes, start, float(opts.label_smoothing), total,
            float(opts.softcap or 0.0),
            PROB=probability, HAS_WEIGHT=weight is not None, SMOOTH=opts.label_smoothing > 0,
            SOFTCAP=opts.softcap is not None, BLOCK=block, num_warps=warps,
        )  # fmt: skip
    return grad
