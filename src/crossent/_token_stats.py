"""Per-token statistics for reinforcement learning and monitoring: the target's log-probability, the
entropy and the logsumexp of tempered logits, in one sweep (crossent._reference.token_stats is the spec)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import _native
from . import _validate as validate
from ._dispatch import native_kernel
from ._functional import _as_result, _namespace
from ._reference.softmax import classes_last
from ._reference.token_stats import token_stats as reference_token_stats


class TokenStats(NamedTuple):
    """Per-position statistics, each of the target's shape.

    ``log_prob``: log-probability of the target under softmax(logits / T); ``entropy``: of that
    distribution; ``logsumexp``: of the tempered logits (``log_prob = logits[target] / T - logsumexp``).
    Ignored positions hold 0 in all three.
    """

    log_prob: Any
    entropy: Any
    logsumexp: Any


def check_temperature(temperature: Any) -> float:
    """The temperature as a float: a real number, or a 0-d array of an integer or floating dtype on
    the CPU (a NumPy array, a CPU tensor that does not require a gradient), finite and > 0; TypeError or
    ValueError naming the value and what was expected otherwise."""
    if hasattr(temperature, "shape") and hasattr(temperature, "dtype") and not isinstance(temperature, np.generic):
        # Read by names, so that NumPy arrays and torch tensors are checked alike without importing torch.
        shape, dtype = tuple(temperature.shape), str(temperature.dtype).removeprefix("torch.")
        if shape != () or not dtype.startswith(("int", "uint", "float", "bfloat")):
            raise TypeError(f"temperature must be a real number or a 0-d real array, got shape {shape} {dtype}")
        device = getattr(temperature, "device", "cpu")
        if str(getattr(device, "type", device)) != "cpu":
            raise TypeError(f"temperature must be a number or a 0-d CPU array (read on the host), got one on {device}")
        if getattr(temperature, "requires_grad", False):
            raise TypeError(
                "temperature is a tensor that requires a gradient, which the token statistics do not give: "
                "pass temperature.detach() or a float"
            )
    elif isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating, np.integer)):
        raise TypeError(f"temperature must be a real number, got {temperature!r}")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {t!r}")
    return t


def token_stats(
    logits: Any, target: Any, *, axis: int | None = None, temperature: float = 1.0, ignore_index: int = -100
) -> TokenStats:
    r"""The target's log-probability, the entropy and the logsumexp of ``logits / temperature``, per position.

    For policy-gradient training (PPO, GRPO: the sampled token's log-probability and the policy's
    entropy, usually at the sampling temperature) and monitoring (the logsumexp for a z-loss), in one
    sweep over the classes. With :math:`z = x / T`:

    .. math::

        \mathrm{lse} = \log\sum_c e^{z_c},\quad \log p_y = z_y - \mathrm{lse},\quad
        H = -\sum_c p_c \log p_c = \mathrm{lse} - \sum_c p_c z_c

    A class whose logit is ``-inf`` has probability 0 and adds 0 to the entropy. ``logsumexp`` is of
    the tempered logits, the normaliser of ``log_prob``; multiply by ``temperature`` for that of the
    raw logits. A row of all ``-inf`` logits gives NaN, as ``torch.log_softmax`` does.

    Parameters
    ----------
    logits : array, shape (N, C) or (N, C, d1, ...), or (C,)
        Unnormalised logits, classes on axis 1 (0 for a 1-D input) or on ``axis``; float16, bfloat16,
        float32 or float64. NumPy arrays run on the native kernel, other Array-API arrays on the
        reference implementation.
    target : array of integers
        Class indices, the logits' shape without the class axis; ``ignore_index`` marks positions to
        skip (0 in every statistic).
    axis : int, optional
        The class axis; ``axis=-1`` takes ``(N, T, C)`` without a transposed copy.
    temperature : float or 0-d array
        :math:`T > 0`, finite: a number or a 0-d NumPy array (a 0-d CPU tensor in crossent.torch).
    ignore_index : int

    Returns
    -------
    TokenStats
        ``(log_prob, entropy, logsumexp)``, each of the target's shape and the logits' dtype (computed
        in float32, float64 for float64 logits).

    Raises
    ------
    TypeError, ValueError, IndexError
        Non-floating logits, a non-integer target or one of the wrong shape, a temperature that is not
        finite and positive, a class index out of range.

    Examples
    --------
    >>> import numpy as np, crossent
    >>> x = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, -np.inf]])
    >>> s = crossent.token_stats(x, np.array([0, 1]))
    >>> np.round(s.log_prob, 4), np.round(s.entropy, 4)
    (array([-0.4076, -0.6931]), array([0.8324, 0.6931]))
    >>> bool(np.allclose(s.log_prob, x[[0, 1], [0, 1]] - s.logsumexp))
    True
    """
    xp, logits, (target,) = _namespace(logits, target)
    temperature = check_temperature(temperature)
    ignore_index = validate.check_int(ignore_index, "ignore_index")
    shape = validate.loss_shape(xp, logits, target, axis, allow_probabilities=False)
    if not _native.class_indices_valid(target, shape.n_classes, ignore_index):
        validate.check_class_indices(xp, target, shape.n_classes, ignore_index)
    if native_kernel(xp, logits) is None:
        values = reference_token_stats(xp, logits, target, shape.class_axis, ignore_index, temperature)
        return TokenStats(*(_as_result(xp, v) for v in values))
    rows = math.prod(shape.batch_shape)
    x = np.ascontiguousarray(classes_last(xp, logits, shape.class_axis)).reshape(rows, shape.n_classes)
    t = np.asarray(target).reshape(rows)
    if rows == 0:
        empty = np.zeros(shape.batch_shape, dtype=logits.dtype)
        return TokenStats(empty, empty.copy(), empty.copy())
    outs = _native.token_stats(x, np.ascontiguousarray(t), ignore_index, temperature)
    return TokenStats(*(v.reshape(shape.batch_shape).astype(logits.dtype, copy=False) for v in outs))


__all__ = ["TokenStats", "token_stats"]
