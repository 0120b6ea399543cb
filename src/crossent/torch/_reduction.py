"""What ``mean`` divides by, and the reduction itself, for every torch path (the op's torch
implementation, the linear loss, the vocabulary-parallel loss): one home for torch's denominator rule,
crossent's normalizer and the all-ignored case."""

from __future__ import annotations

import array_api_compat.torch as xp_torch
import torch

from .._reference import reduce_losses as reduce_reference
from .._validate import LossOptions


def checked_normalizer(normalizer: torch.Tensor | float) -> torch.Tensor:
    """The normalizer as a float64 tensor, NaN where it is negative, NaN or infinite: a value that
    crossent._validate could not read without a host synchronisation (a CUDA tensor, a tensor traced by
    torch.compile) makes the loss and its gradient NaN rather than finite and wrong."""
    denom = torch.as_tensor(normalizer, dtype=torch.float64)
    return torch.where((denom >= 0) & (denom < torch.inf), denom, torch.full_like(denom, torch.nan))


def mean_denominator_and_scale(
    target: torch.Tensor,
    weight: torch.Tensor | None,
    opts: LossOptions,
    *,
    rows: int,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(denominator, upstream gradient of each element) in float64, as tensors (no host synchronisation).

    mean: the normalizer if given (NaN if negative, NaN or infinite, see checked_normalizer); else the
    number of rows for probability targets; else the summed weights of the non-ignored targets. The
    scale is 1 / denominator; where the denominator is 0, NaN (the mean's gradient is undefined), or 0
    with ``zero_if_all_ignored``. sum and none: (1, 1).
    """
    acc, device = torch.float64, target.device
    if opts.reduction != "mean":
        one = torch.ones((), dtype=acc, device=device)
        return one, one
    if normalizer is None:
        normalizer = opts.normalizer
    if normalizer is not None:
        denom = checked_normalizer(torch.as_tensor(normalizer, dtype=acc, device=device))
    elif target.is_floating_point():
        denom = torch.tensor(float(rows), dtype=acc, device=device)
    else:
        valid = target != opts.ignore_index
        if weight is None:
            denom = valid.sum(dtype=acc)
        else:
            # An unchecked class index outside [0, C) (on an accelerator) gives NaN, not an
            # out-of-bounds read: see crossent._reference's _class_index_terms.
            inside = (target >= 0) & (target < weight.shape[0])
            safe = torch.where(valid & inside, target, 0).long()
            denom = torch.where(valid, torch.where(inside, weight.to(acc)[safe], torch.nan), 0).sum()
    # A denominator of 0 leaves the mean's gradient undefined: NaN on the elements that count (ignored
    # ones get 0 whatever the scale), or 0 with zero_if_all_ignored (as crossent._reference._upstream).
    undefined = torch.zeros_like(denom) if opts.zero_if_all_ignored else torch.full_like(denom, torch.nan)
    scale = torch.where(denom == 0, undefined, 1.0 / denom)
    return denom, scale


def reduce_losses(per_element: torch.Tensor, denom: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """The reference's reduction (crossent._reference.reduce_losses) on torch tensors."""
    return reduce_reference(xp_torch, per_element, denom, opts)
