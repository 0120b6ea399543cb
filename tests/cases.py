"""Random problems for the parity tests: odd shapes, every option, class-index or probability targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Odd shapes on purpose: unbatched, a single class, prime sizes, 1-wide spatial axes.
SHAPES = [(7,), (1, 1), (13, 5), (2, 1), (3, 11, 7), (2, 5, 3, 4), (4, 3, 1, 2, 3)]


@dataclass
class Case:
    x: np.ndarray
    target: np.ndarray
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def probability(self) -> bool:
        return np.issubdtype(self.target.dtype, np.floating)


def make_case(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    dtype: Any,
    *,
    probability: bool = False,
    weighted: bool = False,
    ignore_some: bool = False,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    axis: int | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: float | None = None,
    scale: float = 3.0,
) -> Case:
    """Logits of ``shape`` with classes on ``axis`` (torch's rule when None)."""
    x = (scale * rng.standard_normal(shape)).astype(dtype)
    class_axis = (0 if len(shape) == 1 else 1) if axis is None else axis % len(shape)
    n_classes = shape[class_axis]
    batch = shape[:class_axis] + shape[class_axis + 1 :]
    if probability:
        t = rng.random(shape)
        target = (t / t.sum(axis=class_axis, keepdims=True)).astype(dtype)
    else:
        target = rng.integers(0, n_classes, size=batch)
        if ignore_some:
            target = np.where(rng.random(batch) < 0.3, ignore_index, target)
        target = np.asarray(target, dtype=np.int64)
    kwargs: dict[str, Any] = {"reduction": reduction, "label_smoothing": label_smoothing, "ignore_index": ignore_index}
    if weighted:
        kwargs["weight"] = (0.2 + rng.random(n_classes)).astype(dtype)
    if axis is not None:
        kwargs["axis"] = axis
    if z_loss:
        kwargs["z_loss"] = z_loss
    if softcap is not None:
        kwargs["softcap"] = softcap
    if normalizer is not None:
        kwargs["normalizer"] = normalizer
    return Case(x=x, target=target, kwargs=kwargs)


def grad_output_for(case: Case, rng: np.random.Generator) -> Any:
    """A non-trivial upstream gradient: random per element for 'none', 0.7 otherwise."""
    if case.kwargs["reduction"] == "none":
        class_axis = (0 if case.x.ndim == 1 else 1) if "axis" not in case.kwargs else case.kwargs["axis"] % case.x.ndim
        batch = case.x.shape[:class_axis] + case.x.shape[class_axis + 1 :]
        return rng.standard_normal(batch).astype(case.x.dtype)
    return np.asarray(0.7, dtype=case.x.dtype)
