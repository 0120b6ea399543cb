"""``nn.Module`` losses over crossent's functions, built like torch's (a ``weight`` buffer, extra_repr)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._functional import _legacy_reduction, cross_entropy, nll_loss
from ._linear import linear_cross_entropy
from ._ops import loss_options


class _WeightedLoss(nn.Module):
    weight: torch.Tensor | None

    def __init__(self, weight: torch.Tensor | None, reduction: str, extras: dict[str, Any]) -> None:
        super().__init__()
        loss_options(reduction=reduction, ignore_index=extras.get("ignore_index", -100))
        self.register_buffer("weight", weight)  # moves with .to() and lives in the state_dict
        self.reduction = reduction


class CrossEntropyLoss(_WeightedLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`crossent.torch.cross_entropy`."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        axis: int | None = None,
        z_loss: float = 0.0,
        softcap: float | None = None,
        normalizer: float | None = None,
        zero_if_all_ignored: bool = False,
        inplace_backward: bool = False,
    ) -> None:
        reduction = _legacy_reduction(size_average, reduce, reduction)
        loss_options(
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, normalizer=normalizer, zero_if_all_ignored=zero_if_all_ignored,
        )  # fmt: skip
        super().__init__(weight, reduction, {"ignore_index": ignore_index})
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.axis, self.z_loss, self.softcap = axis, z_loss, softcap
        self.normalizer, self.zero_if_all_ignored = normalizer, zero_if_all_ignored
        self.inplace_backward = inplace_backward  # see crossent.torch.cross_entropy

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, axis=self.axis, z_loss=self.z_loss, softcap=self.softcap,
            normalizer=self.normalizer, zero_if_all_ignored=self.zero_if_all_ignored,
            inplace_backward=self.inplace_backward,
        )  # fmt: skip

    def extra_repr(self) -> str:
        parts = [f"reduction={self.reduction!r}"]
        if self.ignore_index != -100:
            parts.append(f"ignore_index={self.ignore_index}")
        for name in ("label_smoothing", "z_loss", "inplace_backward"):
            if getattr(self, name):
                parts.append(f"{name}={getattr(self, name)}")
        for name in ("axis", "softcap", "normalizer"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)}")
        return ", ".join(parts)


class NLLLoss(_WeightedLoss):
    """``torch.nn.NLLLoss`` computed by :func:`crossent.torch.nll_loss`."""

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        *,
        axis: int | None = None,
        normalizer: float | None = None,
        zero_if_all_ignored: bool = False,
    ) -> None:
        reduction = _legacy_reduction(size_average, reduce, reduction)
        super().__init__(weight, reduction, {"ignore_index": ignore_index})
        self.ignore_index = ignore_index
        self.axis, self.normalizer, self.zero_if_all_ignored = axis, normalizer, zero_if_all_ignored

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nll_loss(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction, axis=self.axis,
            normalizer=self.normalizer, zero_if_all_ignored=self.zero_if_all_ignored,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}" + (
            f", ignore_index={self.ignore_index}" if self.ignore_index != -100 else ""
        )


class LinearCrossEntropyLoss(nn.Module):
    """An output layer fused with its loss, like ``torch.nn.LinearCrossEntropyLoss``: the N x C logits are
    never materialised (see :func:`crossent.torch.linear_cross_entropy`)."""

    weight: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: torch.Tensor | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        vocab_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        loss_options(
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap,
        )  # fmt: skip
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.reduction, self.ignore_index, self.label_smoothing = reduction, ignore_index, label_smoothing
        self.z_loss, self.softcap = z_loss, softcap
        self.chunk_size, self.vocab_chunk_size = chunk_size, vocab_chunk_size

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size,
            vocab_chunk_size=self.vocab_chunk_size,
        )  # fmt: skip
