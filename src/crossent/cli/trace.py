"""``crossent explain`` as data: the notebooks' computation, row by row, with its checks.

``build_trace`` computes everything (numbers only, no formatting); ``crossent.cli.render`` turns a trace
into text, JSON or a plot. The per-row numbers are the stable form of the seed notebooks' formula
loss = -x[class] + log(sum_j exp(x[j])): the row maximum, the shifted log-sum-exp, -x[class] and the loss.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import crossent

# The 5 x 3 logits printed in seed 001 and its targets; the notebook prints a loss of 1.7603.
SEED_001_LOGITS = [
    [-0.9997, 0.9024, 1.5058],
    [1.2295, -1.2791, 0.6434],
    [-1.9006, 1.4064, 1.3669],
    [-0.8453, 0.9917, 0.6591],
    [0.3560, 0.9731, 0.3480],
]
SEED_001_TARGET = [2, 0, 0, 0, 2]


@dataclass
class Options:
    weight: list[float] | None = None
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    axis: int | None = None
    z_loss: float = 0.0
    softcap: float | None = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ignore_index": self.ignore_index,
            "reduction": self.reduction,
            "label_smoothing": self.label_smoothing,
            "axis": self.axis,
            "z_loss": self.z_loss,
            "softcap": self.softcap,
        }
        if self.weight is not None:
            out["weight"] = np.asarray(self.weight, dtype=np.float64)
        return out


@dataclass
class Row:
    index: tuple[int, ...]  # position in the batch shape
    logits: list[float]
    target: int | list[float]  # class index, or class probabilities
    ignored: bool
    max: float
    logsumexp: float
    minus_target_logit: float | None  # -x[class] (class-index targets)
    weight: float  # w[class], or 1 (0 when ignored)
    loss: float
    probabilities: list[float]
    capped_logits: list[float] | None = None  # softcap * tanh(logits / softcap), with softcap
    smoothing: float | None = None  # eps / C * sum_c w[c] * (logsumexp - x[c]), class indices with eps > 0
    z_term: float | None = None  # z_loss * logsumexp ** 2, with z_loss > 0


@dataclass
class Check:
    name: str
    difference: float  # largest absolute difference found
    tolerance: float

    @property
    def holds(self) -> bool:
        return bool(self.difference <= self.tolerance)


@dataclass
class Trace:
    title: str
    shape: tuple[int, ...]
    class_axis: int
    probability_target: bool
    options: Options
    rows: list[Row]
    total: float  # sum of the per-element losses
    denominator: float | None  # what mean divides by
    loss: Any  # float, or a list for reduction="none"
    checks: list[Check] = field(default_factory=list)
    frameworks: list[dict[str, Any]] = field(default_factory=list)
    omitted_rows: int = 0


def _class_axis(ndim: int, axis: int | None) -> int:
    return (0 if ndim == 1 else 1) if axis is None else axis % ndim


def build_trace(
    logits: np.ndarray, target: np.ndarray, options: Options, *, title: str, max_rows: int | None = None
) -> Trace:
    """Compute the loss of ``logits`` against ``target`` step by step, with the identity checks and the
    cross-checks against torch and JAX. Raises crossent's own exceptions for bad input.

    NaN and inf are results here (a mean over no counted target is 0/0), reported in the trace, so NumPy's
    warnings about them are silenced.
    """
    with np.errstate(all="ignore"):
        return _build_trace(logits, target, options, title=title, max_rows=max_rows)


def _build_trace(
    logits: np.ndarray, target: np.ndarray, options: Options, *, title: str, max_rows: int | None
) -> Trace:
    logits = np.asarray(logits, dtype=np.float64)
    kwargs = options.kwargs()
    # The public function validates everything first, so bad input fails here with crossent's message.
    loss, grad = crossent.cross_entropy_and_grad(
        logits, target, grad_output=np.ones(_batch_shape(logits, options)) if options.reduction == "none" else None,
        **kwargs,
    )  # fmt: skip
    axis = _class_axis(logits.ndim, options.axis)
    moved = np.moveaxis(logits, axis, -1)  # (..., C)
    probability = np.issubdtype(np.asarray(target).dtype, np.floating)
    t_moved = np.moveaxis(np.asarray(target, dtype=np.float64), axis, -1) if probability else np.asarray(target)
    capped = moved if options.softcap is None else options.softcap * np.tanh(moved / options.softcap)
    per_element = np.asarray(crossent.cross_entropy(logits, target, **{**kwargs, "reduction": "none"}))
    lse = np.asarray(crossent.logsumexp(capped, axis=-1))
    probs = np.asarray(crossent.softmax(capped, axis=-1))
    n_classes = moved.shape[-1]
    weight = np.ones(n_classes) if options.weight is None else np.asarray(options.weight, dtype=np.float64)

    rows: list[Row] = []
    batch_shape = moved.shape[:-1]
    positions = list(np.ndindex(*batch_shape)) if batch_shape else [()]
    shown = positions if max_rows is None or len(positions) <= max_rows else positions[:max_rows]
    for pos in shown:
        x = capped[pos]
        if probability:
            row_target: int | list[float] = [float(v) for v in t_moved[pos]]
            ignored, w_y, minus_x = False, 1.0, None
        else:
            y = int(t_moved[pos])
            row_target = y
            ignored = y == options.ignore_index
            w_y = 0.0 if ignored else float(weight[y])
            minus_x = None if ignored else float(-x[y])
        # The terms the options add to the row's loss (each 0 on an ignored row): label smoothing's share
        # of the uniform target (a probability target holds it inside its smoothed t'), the z-loss.
        eps, smoothing, z_term = options.label_smoothing, None, None
        if eps > 0 and not probability:
            terms = np.where(weight != 0, weight * (lse[pos] - x), 0.0)  # a 0 weight at -inf adds 0
            smoothing = 0.0 if ignored else float(eps / n_classes * np.sum(terms))
        if options.z_loss > 0:
            z_term = 0.0 if ignored else float(options.z_loss * lse[pos] ** 2)
        rows.append(
            Row(
                index=tuple(int(i) for i in pos),
                logits=[float(v) for v in moved[pos]],
                target=row_target,
                ignored=ignored,
                max=float(np.max(x)),
                logsumexp=float(lse[pos]),
                minus_target_logit=minus_x,
                weight=w_y,
                loss=float(per_element[pos]),
                probabilities=[float(v) for v in probs[pos]],
                capped_logits=None if options.softcap is None else [float(v) for v in x],
                smoothing=smoothing,
                z_term=z_term,
            )
        )
    total = float(np.sum(per_element))
    denominator: float | None = None
    if options.reduction == "mean":
        if probability:
            denominator = float(per_element.size)
        else:
            valid = t_moved != options.ignore_index
            denominator = float(np.sum(np.where(valid, weight[np.where(valid, t_moved, 0)], 0.0)))
    trace = Trace(
        title=title,
        shape=tuple(int(s) for s in logits.shape),
        class_axis=axis,
        probability_target=probability,
        options=options,
        rows=rows,
        total=total,
        denominator=denominator,
        loss=np.asarray(loss).tolist(),
        omitted_rows=len(positions) - len(shown),
    )
    trace.checks = _identity_checks(logits, target, options, loss, grad, probability)
    trace.frameworks = _cross_checks(logits, target, options, loss)
    return trace


def _batch_shape(logits: np.ndarray, options: Options) -> tuple[int, ...]:
    axis = _class_axis(logits.ndim, options.axis)
    return logits.shape[:axis] + logits.shape[axis + 1 :]


def _identity_checks(
    logits: np.ndarray, target: Any, options: Options, loss: Any, grad: np.ndarray, probability: bool
) -> list[Check]:
    kwargs = options.kwargs()
    axis = _class_axis(logits.ndim, options.axis)
    checks: list[Check] = []
    tol = 1e-9
    log_probs = np.asarray(crossent.log_softmax(logits, axis=axis))
    twice = np.asarray(crossent.log_softmax(log_probs, axis=axis))
    finite = np.isfinite(log_probs)
    idem = float(np.max(np.abs(np.where(finite, twice - log_probs, 0.0)), initial=0.0))
    checks.append(Check("log_softmax(log_softmax(x)) = log_softmax(x)", idem, tol))
    plain = options.z_loss == 0 and options.softcap is None
    if plain:
        again = crossent.cross_entropy(log_probs, target, **kwargs)
        checks.append(Check("CE(log_softmax(x)) = CE(x)", _max_diff(again, loss), tol))
    if plain and not probability and options.label_smoothing == 0:
        nll_kwargs = {k: kwargs[k] for k in ("ignore_index", "reduction", "axis") if k in kwargs}
        nll = crossent.nll_loss(log_probs, target, kwargs.get("weight"), **nll_kwargs)
        checks.append(Check("CE(x) = NLL(log_softmax(x))", _max_diff(nll, loss), tol))
        # gradient = (softmax - one-hot) * w[class] / denominator for mean (times 1 for sum and none), on
        # the elements that count; an ignored element contributes nothing, so its gradient is exactly 0.
        # With every target ignored the mean's denominator is 0 and the loss 0/0 = NaN, but no element
        # counts: the gradient is 0 everywhere (torch's too). A counted element of weight 0 over a
        # denominator of 0 is 0 * (1/0) = NaN, as in torch.
        moved = np.moveaxis(logits, axis, -1)
        n_classes = moved.shape[-1]
        t = np.asarray(target)
        valid = t != options.ignore_index
        onehot = np.eye(n_classes)[np.where(valid, t, 0)] * valid[..., None]
        w = np.ones(n_classes) if options.weight is None else np.asarray(options.weight, dtype=np.float64)
        w_y = np.where(valid, w[np.where(valid, t, 0)], 0.0)
        p = np.asarray(crossent.softmax(moved, axis=-1))
        scale = w_y / np.sum(w_y) if options.reduction == "mean" else w_y
        expected = np.moveaxis(np.where(valid[..., None], (p - onehot) * scale[..., None], 0.0), -1, axis)
        checks.append(Check("gradient = (softmax - one-hot) * w[class] / denominator", _max_diff(grad, expected), tol))
    return checks


def _max_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))  # equal infinities and NaN against NaN agree
    with np.errstate(invalid="ignore"):
        return float(np.max(np.where(same, 0.0, np.abs(a - b)), initial=0.0))


def _cross_checks(logits: np.ndarray, target: Any, options: Options, loss: Any) -> list[dict[str, Any]]:
    """The same loss from every installed framework, and the largest difference from crossent's."""
    found: list[dict[str, Any]] = []
    extras = (
        options.z_loss != 0
        or options.softcap is not None
        or (options.axis not in (None, _class_axis(logits.ndim, None)))
    )
    for name, compute in (("torch", _torch_loss), ("jax", _jax_loss)):
        if importlib.util.find_spec(name) is None:
            continue
        entry: dict[str, Any] = {"framework": name, "version": importlib.import_module(name).__version__}
        if extras:
            entry["note"] = "not compared: z_loss, softcap and axis are crossent's extras"
        else:
            value = compute(logits, target, options)
            entry["loss"] = np.asarray(value).tolist()
            entry["difference"] = _max_diff(value, loss)
        found.append(entry)
    return found


def _torch_loss(logits: np.ndarray, target: Any, options: Options) -> Any:
    torch = importlib.import_module("torch")
    t = np.asarray(target)
    tt = torch.from_numpy(t.astype(np.float64) if np.issubdtype(t.dtype, np.floating) else t.astype(np.int64))
    w = None if options.weight is None else torch.tensor(options.weight, dtype=torch.float64)
    out = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), tt, w, ignore_index=options.ignore_index, reduction=options.reduction,
        label_smoothing=options.label_smoothing,
    )  # fmt: skip
    return out.numpy()


def _jax_loss(logits: np.ndarray, target: Any, options: Options) -> Any:
    jax = importlib.import_module("jax")
    jax.config.update("jax_enable_x64", True)
    jnp = importlib.import_module("jax.numpy")
    axis = _class_axis(logits.ndim, None)
    log_probs = jnp.moveaxis(jax.nn.log_softmax(jnp.asarray(logits), axis=axis), axis, -1)  # (..., C)
    n_classes = log_probs.shape[-1]
    w = jnp.ones(n_classes) if options.weight is None else jnp.asarray(options.weight)
    eps = options.label_smoothing
    t = np.asarray(target)
    if np.issubdtype(t.dtype, np.floating):
        tp = (1 - eps) * jnp.moveaxis(jnp.asarray(t), axis, -1) + eps / n_classes
        per = -jnp.sum(w * tp * log_probs, axis=-1)
        denom = per.size
    else:
        valid = t != options.ignore_index
        safe = jnp.where(valid, t, 0)
        picked = jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
        w_y = jnp.where(valid, w[safe], 0.0)
        per = (1 - eps) * w_y * -picked
        if eps > 0:  # without smoothing there is no such term, not 0 * (a sum that may be inf)
            per = per + eps / n_classes * -jnp.sum(w * log_probs, axis=-1)
        per = jnp.where(valid, per, 0.0)
        denom = jnp.sum(w_y)
    if options.reduction == "none":
        return np.asarray(per)
    if options.reduction == "sum":
        return np.asarray(jnp.sum(per))
    return np.asarray(jnp.sum(per) / denom)
