"""Callable classes in the style of ``torch.nn``, for code written like the seed notebooks.

Each holds its options and calls the function of the same name; nothing is computed here.
"""

from __future__ import annotations

from typing import Any

from . import _functional as F
from . import _validate as validate


class CrossEntropyLoss:
    """``crossent.cross_entropy`` with its options fixed, like ``torch.nn.CrossEntropyLoss``.

    Examples
    --------
    >>> import numpy as np, crossent
    >>> loss = crossent.CrossEntropyLoss(label_smoothing=0.1)
    >>> print(f"{loss(np.array([[2.0, 0.0]]), np.array([0])):.4f}")
    0.2269
    """

    def __init__(
        self,
        weight: Any = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        axis: int | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        normalizer: Any = None,
        zero_if_all_ignored: bool = False,
    ) -> None:
        # Validated now so that a bad option fails where the loss is built, not at the first batch.
        validate.loss_options(
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            normalizer=normalizer,
            zero_if_all_ignored=zero_if_all_ignored,
        )
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.axis = axis
        self.z_loss = z_loss
        self.softcap = softcap
        self.normalizer = normalizer
        self.zero_if_all_ignored = zero_if_all_ignored

    def __call__(self, input: Any, target: Any) -> Any:
        return F.cross_entropy(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            axis=self.axis,
            z_loss=self.z_loss,
            softcap=self.softcap,
            normalizer=self.normalizer,
            zero_if_all_ignored=self.zero_if_all_ignored,
        )

    def __repr__(self) -> str:
        return f"CrossEntropyLoss(reduction={self.reduction!r}, label_smoothing={self.label_smoothing})"


class NLLLoss:
    """``crossent.nll_loss`` with its options fixed, like ``torch.nn.NLLLoss``.

    Examples
    --------
    >>> import numpy as np, crossent
    >>> x = np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]])
    >>> y = np.array([2, 0])
    >>> ce = crossent.CrossEntropyLoss()(x, y)
    >>> nll = crossent.NLLLoss()(crossent.LogSoftmax(dim=1)(x), y)
    >>> bool(np.isclose(ce, nll))
    True
    """

    def __init__(
        self,
        weight: Any = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        *,
        axis: int | None = None,
        normalizer: Any = None,
        zero_if_all_ignored: bool = False,
    ) -> None:
        validate.loss_options(
            reduction=reduction,
            ignore_index=ignore_index,
            normalizer=normalizer,
            zero_if_all_ignored=zero_if_all_ignored,
        )
        self.weight = weight
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.axis = axis
        self.normalizer = normalizer
        self.zero_if_all_ignored = zero_if_all_ignored

    def __call__(self, input: Any, target: Any) -> Any:
        return F.nll_loss(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            axis=self.axis,
            normalizer=self.normalizer,
            zero_if_all_ignored=self.zero_if_all_ignored,
        )

    def __repr__(self) -> str:
        return f"NLLLoss(reduction={self.reduction!r})"


class LogSoftmax:
    """``crossent.log_softmax`` over ``dim`` (torch's name for the axis; default the last)."""

    def __init__(self, dim: int = -1) -> None:
        self.dim = validate.check_int(dim, "dim")

    def __call__(self, x: Any) -> Any:
        return F.log_softmax(x, axis=self.dim)

    def __repr__(self) -> str:
        return f"LogSoftmax(dim={self.dim})"


class Softmax:
    """``crossent.softmax`` over ``dim`` (torch's name for the axis; default the last)."""

    def __init__(self, dim: int = -1) -> None:
        self.dim = validate.check_int(dim, "dim")

    def __call__(self, x: Any) -> Any:
        return F.softmax(x, axis=self.dim)

    def __repr__(self) -> str:
        return f"Softmax(dim={self.dim})"
