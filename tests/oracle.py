"""The one parity oracle: PyTorch's own cross_entropy / nll_loss with autograd, in float64 by default.

crossent's extras that torch lacks are built here from torch primitives, the way a user would write
them by hand: ``softcap`` with ``torch.tanh`` before the loss, ``z_loss`` from a log-sum-exp (see _logsumexp),
``normalizer`` as a sum divided by that number, ``axis`` with ``torch.movedim``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional


@dataclass
class Oracle:
    loss: np.ndarray
    grad: np.ndarray | None


def _tensor(a: Any, dtype: Any = None) -> Any:
    return torch.tensor(np.asarray(a), dtype=dtype)


def cross_entropy(
    x: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    axis: int | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: float | None = None,
    zero_if_all_ignored: bool = False,
    grad_output: Any = None,
    dtype: Any = None,
    want_grad: bool = True,
) -> Oracle:
    """Loss and d(loss)/d(x) from torch (``dtype`` defaults to float64, computed on the CPU)."""
    dtype = torch.float64 if dtype is None else dtype
    xt = _tensor(x, dtype).requires_grad_(want_grad)
    probability = np.issubdtype(np.asarray(target).dtype, np.floating)
    moved = xt if axis is None or xt.ndim < 2 else torch.movedim(xt, axis, 1)
    tt = _tensor(target, dtype) if probability else _tensor(target).long()
    if probability and axis is not None and xt.ndim >= 2:
        tt = torch.movedim(tt, axis, 1)
    logits = moved if softcap is None else softcap * torch.tanh(moved / softcap)
    w = None if weight is None else _tensor(weight, dtype)
    by_hand = probability or w is not None or label_smoothing > 0
    plain = z_loss == 0 and normalizer is None and not zero_if_all_ignored and not by_hand
    if probability:
        per = _probability_cross_entropy(logits, tt, w, label_smoothing)
    elif by_hand:
        per = _class_index_cross_entropy(logits, tt, w, ignore_index, label_smoothing)
    else:
        per = F.cross_entropy(
            logits,
            tt,
            w,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reduction if plain else "none",
        )
    if not plain:
        class_dim = 0 if logits.ndim == 1 else 1
        valid = torch.ones_like(per, dtype=torch.bool) if probability else tt != ignore_index
        if z_loss:
            per = per + torch.where(valid, z_loss * _logsumexp(logits, class_dim) ** 2, 0.0)
        if reduction == "none":
            loss = per
        elif reduction == "sum":
            loss = per.sum()
        else:
            if normalizer is not None:
                denom = torch.tensor(float(normalizer), dtype=dtype)
            elif probability:
                denom = torch.tensor(float(per.numel()), dtype=dtype)
            else:
                tw = torch.ones(logits.shape[class_dim], dtype=dtype) if w is None else w
                denom = torch.where(valid, tw[tt.clamp(min=0) * valid], 0.0).sum()
            loss = per.sum() / denom
            if denom == 0 and not zero_if_all_ignored and want_grad:
                # crossent's rule for a denominator of 0 (docs/differences-from-pytorch.md): the loss is
                # the sum over 0, its gradient undefined, NaN on the elements that count (torch's ops
                # give +-inf or NaN by their order of operations); ignored elements keep 0.
                counted = valid.unsqueeze(class_dim).expand(logits.shape)
                grad_moved = torch.where(counted, torch.nan, 0.0).to(dtype)
                if axis is not None and xt.ndim >= 2:
                    grad_moved = torch.movedim(grad_moved, 1, axis)
                return Oracle(loss=loss.detach().numpy(), grad=grad_moved.numpy())
            if zero_if_all_ignored and denom == 0:
                # crossent's promise: exactly 0, gradient 0, even where a counted element of weight 0 is
                # NaN (a row of -inf logits); per.sum() * 0 would carry that NaN.
                loss = (xt * 0).sum().nan_to_num(0.0)
    else:
        loss = per
    grad = None
    if want_grad:
        g = torch.ones_like(loss) if grad_output is None else _tensor(grad_output, dtype)
        loss.backward(g)
        grad = xt.grad.numpy()
    return Oracle(loss=loss.detach().numpy(), grad=grad)


def _logsumexp(x: Any, dim: int) -> Any:
    """log(sum(exp(x))) whose gradient is the softmax as torch.softmax computes it. torch.logsumexp's
    backward is exp(x - logsumexp(x)), wrong where the result rounds: for x = [1e28, 1e28] it gives
    [1, 1] instead of [0.5, 0.5]."""
    m = x.amax(dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (m + torch.log(torch.exp(x - m).sum(dim, keepdim=True))).squeeze(dim)


def _probability_cross_entropy(logits: Any, target: Any, weight: Any, label_smoothing: float) -> Any:
    """torch's per-element cross-entropy of probability targets, -sum_c w_c t'_c log_softmax(x)_c with
    t' = (1 - eps) t + eps / C, except that a class whose weight w_c t'_c is exactly 0 adds 0 where its
    log-probability is -inf (0 log 0 = 0, as scipy.special.xlogy; torch gives NaN there). This is
    crossent's one intended difference for these targets (docs/differences-from-pytorch.md); the
    gradient is torch's either way."""
    class_dim = 0 if logits.ndim == 1 else 1
    n_classes = logits.shape[class_dim]
    t = (1 - label_smoothing) * target + label_smoothing / n_classes
    if weight is not None:
        shape = [1] * logits.ndim
        shape[class_dim] = n_classes
        t = t * weight.view(shape)
    log_probs = torch.log_softmax(logits, class_dim)
    # Only a -inf log-probability is spared; a NaN one (a row with no finite logit) stays NaN.
    zero_weight_at_minus_inf = (t == 0) & torch.isneginf(log_probs)
    return -torch.where(zero_weight_at_minus_inf, torch.zeros_like(log_probs), t * log_probs).sum(class_dim)


def _class_index_cross_entropy(logits: Any, target: Any, weight: Any, ignore_index: int, eps: float) -> Any:
    """torch's per-element cross-entropy of class indices with class weights and label smoothing,
    (1 - eps) w_y (-log p_y) + eps / C sum_c w_c (-log p_c) on the elements that count, written from
    torch primitives with crossent's one difference: a term whose weight is exactly 0 adds 0 where its
    log-probability is -inf (torch: 0 * inf = NaN); a NaN log-probability stays NaN."""
    class_dim = 0 if logits.ndim == 1 else 1
    n_classes = logits.shape[class_dim]
    log_probs = torch.log_softmax(logits, class_dim)
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    w = torch.ones(n_classes, dtype=logits.dtype) if weight is None else weight
    shape = [1] * logits.ndim
    shape[class_dim] = n_classes

    def term(scale: Any, log_p: Any) -> Any:
        return torch.where((scale == 0) & torch.isneginf(log_p), torch.zeros_like(log_p), scale * -log_p)

    log_p_y = log_probs.gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)
    per = term((1 - eps) * w[safe], log_p_y)
    if eps > 0:
        per = per + term((eps / n_classes) * w.view(shape), log_probs).sum(class_dim)
    return torch.where(valid, per, torch.zeros_like(per))


def nll_loss(
    x: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    dtype: Any = None,
) -> np.ndarray:
    dtype = torch.float64 if dtype is None else dtype
    w = None if weight is None else _tensor(weight, dtype)
    out = F.nll_loss(_tensor(x, dtype), _tensor(target).long(), w, ignore_index=ignore_index, reduction=reduction)
    return out.numpy()


def log_softmax(x: np.ndarray, axis: int, dtype: Any = None) -> np.ndarray:
    return F.log_softmax(_tensor(x, torch.float64 if dtype is None else dtype), dim=axis).numpy()


def tolerances(dtype: Any) -> dict[str, float]:
    """rtol/atol for comparing a result computed in ``dtype`` with the float64 oracle."""
    name = np.dtype(dtype).name if not hasattr(dtype, "is_floating_point") else str(dtype).split(".")[-1]
    return {
        "float64": {"rtol": 1e-10, "atol": 1e-12},
        "float32": {"rtol": 2e-5, "atol": 2e-6},
        "float16": {"rtol": 2e-3, "atol": 2e-3},
        "bfloat16": {"rtol": 1.6e-2, "atol": 1.6e-2},
    }[name]


def assert_close(actual: Any, expected: Any, dtype: Any, *, what: str = "", scale: float = 1.0) -> None:
    """Shape, then values (NaN where the oracle has NaN), with tolerances scaled to ``dtype``."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != oracle {expected.shape}"
    tol = tolerances(dtype)
    np.testing.assert_allclose(
        actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=True, err_msg=what
    )


def token_stats(x: Any, target: Any, *, axis: int = -1, temperature: float = 1.0, ignore_index: int = -100) -> Any:
    """(log_prob, entropy, logsumexp) of x / temperature per position, from torch.log_softmax and
    torch.logsumexp on a float64 tensor (differentiable; 0 at ignored positions). The entropy is
    -sum p log p over the classes with p > 0 (0 log 0 = 0, where log p is -inf), not lse - sum p z,
    which cancels catastrophically when the logits are far from 0 (log 2 lost at z = 1e29)."""
    z = torch.movedim(x, axis, -1) / temperature
    lse = _logsumexp(z, -1)
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
    valid = target != ignore_index
    log_prob = log_p.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros_like(lse)
    return torch.where(valid, log_prob, zero), torch.where(valid, entropy, zero), torch.where(valid, lse, zero)
