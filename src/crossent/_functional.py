"""The public functions: validate once, then run the native kernel or the Array-API reference."""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import array_api_compat.numpy as _numpy_namespace
import numpy as np

from . import _native
from . import _reference as reference
from . import _validate as validate
from ._dispatch import native_enabled, native_kernel


def _is_foreign_array(a: Any) -> bool:
    """An array of a library other than NumPy (NumPy arrays and scalars adopt such an array's library)."""
    return array_api_compat.is_array_api_obj(a) and not isinstance(a, (np.ndarray, np.generic))


def _convert(xp: Any, a: Any, like: Any) -> Any:
    """``a`` (NumPy or plain Python data) as an array of ``like``'s library, on its device.

    A library may narrow integers on the way (JAX without x64 holds int64 as int32, and wraps 2**40 to
    0 silently): such a value raises instead of becoming a different, valid class index.
    """
    converted = xp.asarray(a, device=array_api_compat.device(like))
    check_integers_fit(xp, a, converted)
    return converted


def check_integers_fit(xp: Any, source: Any, converted: Any) -> None:
    """OverflowError if converting NumPy/Python integers ``source`` to ``converted`` changed a value."""
    source = np.asarray(source)
    if source.dtype.kind in "iu" and source.size:
        info = xp.iinfo(converted.dtype)
        low, high = source.min(), source.max()
        if low < info.min or high > info.max:
            value = int(high if high > info.max else low)
            raise OverflowError(
                f"value {value} does not fit {validate.dtype_name(converted.dtype)}, the integer dtype "
                f"{type(converted).__module__.split('.')[0]} gives {validate.dtype_name(source.dtype)}"
            )


def _namespace(input: Any, *others: Any) -> tuple[Any, Any, list[Any]]:
    """The arrays' Array-API namespace, with the input and the other arguments as its arrays.

    The library is that of the first array that is not NumPy's (the input, else the others); NumPy
    arrays and plain Python data (lists, numbers) are converted to it, onto its device, as optax's
    tests pass NumPy labels beside JAX logits. Only NumPy data: arrays of two other libraries raise.
    """
    if type(input) is np.ndarray and all(other is None or type(other) is np.ndarray for other in others):
        return _numpy_namespace, input, list(others)  # the common case, without the generic look-ups
    present = [a for a in (input, *others) if a is not None]
    foreign = [a for a in present if _is_foreign_array(a)]
    if foreign:
        like = foreign[0]
        try:
            xp = array_api_compat.array_namespace(*foreign)
        except TypeError as err:
            kinds = ", ".join(sorted({type(a).__module__ + "." + type(a).__name__ for a in foreign}))
            raise TypeError(f"all arrays must come from one library (or NumPy), got {kinds}") from err
        input = input if _is_foreign_array(input) else _convert(xp, input, like)
        converted = [o if o is None or _is_foreign_array(o) else _convert(xp, o, like) for o in others]
        return xp, input, converted
    if not array_api_compat.is_array_api_obj(input):
        input = np.asarray(input)
    converted = [o if o is None or array_api_compat.is_array_api_obj(o) else np.asarray(o) for o in others]
    return array_api_compat.array_namespace(input, *[o for o in converted if o is not None]), input, converted


def _as_result(xp: Any, value: Any) -> Any:
    # NumPy reductions return scalars; crossent returns 0-d arrays, like torch returns 0-d tensors.
    return np.asarray(value) if array_api_compat.is_numpy_namespace(xp) else value


def _prepare_loss(
    input: Any, target: Any, weight: Any, axis: Any, opts: validate.LossOptions, *, allow_probabilities: bool
) -> tuple[Any, Any, Any, Any, validate.LossShape]:
    xp, input, (target, weight) = _namespace(input, target, weight)
    shape = validate.loss_shape(xp, input, target, axis, allow_probabilities=allow_probabilities)
    if weight is not None:
        validate.check_weight(xp, weight, shape.n_classes)
    validate.check_target_options(shape.probability_target, opts)
    if not shape.probability_target and not _native.class_indices_valid(target, shape.n_classes, opts.ignore_index):
        validate.check_class_indices(xp, target, shape.n_classes, opts.ignore_index)
    return xp, input, target, weight, shape


def cross_entropy(
    input: Any,
    target: Any,
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
) -> Any:
    r"""Cross-entropy between logits and class indices or class probabilities, as PyTorch computes it.

    .. math::

        l_n = -w_{y_n} \log \frac{\exp(x_{n,y_n})}{\sum_j \exp(x_{n,j})}
            = w_{y_n}\left(-x_{n,y_n} + \operatorname{logsumexp}_j x_{n,j}\right)

    with label smoothing, probability targets and the reductions exactly as in
    ``torch.nn.functional.cross_entropy`` (see the README's formulas). The log-sum-exp is shifted by the
    row maximum, so logits of any size give a finite loss.

    Parameters
    ----------
    input : array, shape (C,), (N, C) or (N, C, d1, ..., dk)
        Unnormalised logits, classes on axis 1 (or 0 for a 1-D input), or on ``axis``.
    target : array
        Class indices (integer dtype) of the input's shape without the class axis, or class
        probabilities (floating dtype) of the input's shape.
    weight : array, shape (C,), optional
        A rescaling weight per class.
    ignore_index : int
        Class-index targets equal to this contribute nothing, neither to the loss nor to the mean's
        denominator. Not applied to probability targets.
    reduction : {"mean", "sum", "none"}
        ``mean`` divides the summed loss by the summed target weights (class indices) or by the number
        of rows (probabilities).
    label_smoothing : float in [0, 1]
        Mixes the target with the uniform distribution over the C classes.
    axis : int, optional, keyword-only
        The class axis; ``axis=-1`` takes ``(N, T, C)`` layouts without a transposed copy.
    z_loss : float, keyword-only
        Adds ``z_loss * logsumexp(x)**2`` to every non-ignored element (PaLM's auxiliary loss), reduced
        like the loss.
    softcap : float, optional, keyword-only
        Replaces the logits by ``softcap * tanh(x / softcap)`` before the softmax (Gemma 2).
    normalizer : float or 0-d array, optional, keyword-only
        What ``mean`` divides by instead of torch's denominator, e.g. the global number of target tokens
        over data-parallel ranks and gradient-accumulation steps; the same for a Python number, a 0-d
        NumPy array, a 0-d tensor or a JAX array. 0 is allowed and divided by (the sum over 0: NaN or
        +-inf, as IEEE gives it; 0, gradient included, with ``zero_if_all_ignored``), as a global count
        is 0 when every target of the global batch is ignored. Negative, NaN or infinite values raise
        ``ValueError`` where the value can be read without a device synchronisation (Python numbers,
        NumPy arrays, CPU tensors outside ``torch.compile``'s tracing); elsewhere (a CUDA tensor, a
        traced tensor, a JAX array or tracer) they make the loss and its gradient NaN.
    zero_if_all_ignored : bool, keyword-only
        With ``mean``, return 0 instead of NaN when the denominator is 0 (every target ignored, or an
        empty batch). The gradient is 0 either way.

    Returns
    -------
    array
        0-d for ``mean`` and ``sum``; the target's batch shape for ``none``. Same library and dtype as
        ``input``.

    Examples
    --------
    The 5 x 3 logits printed in the seed notebook, with targets [2, 0, 0, 0, 2]:

    >>> import numpy as np, crossent
    >>> x = np.array([[-0.9997, 0.9024, 1.5058], [1.2295, -1.2791, 0.6434],
    ...               [-1.9006, 1.4064, 1.3669], [-0.8453, 0.9917, 0.6591],
    ...               [0.3560, 0.9731, 0.3480]], dtype=np.float32)
    >>> y = np.array([2, 0, 0, 0, 2])
    >>> print(f"{crossent.cross_entropy(x, y):.4f}")
    1.7603
    >>> crossent.cross_entropy(x, y, reduction="none").shape
    (5,)

    References
    ----------
    PyTorch, ``torch.nn.CrossEntropyLoss``. Szegedy et al., "Rethinking the Inception Architecture"
    (2016) for label smoothing; Chowdhery et al., "PaLM" (2022) for the z-loss; Gemma Team, "Gemma 2"
    (2024) for logit soft-capping.
    """
    if (
        weight is None
        and axis is None
        and softcap is None
        and normalizer is None
        and zero_if_all_ignored is False
        and type(label_smoothing) is float
        and label_smoothing == 0.0
        and type(z_loss) is float
        and z_loss == 0.0
        and native_enabled()
    ):
        loss = _native.plain_cross_entropy(input, target, ignore_index, reduction)
        if loss is not None:
            return loss
    opts = validate.loss_options(
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        normalizer=normalizer,
        zero_if_all_ignored=zero_if_all_ignored,
    )
    xp, input, target, weight, shape = _prepare_loss(input, target, weight, axis, opts, allow_probabilities=True)
    kernel = native_kernel(xp, input)
    if kernel is not None:
        return kernel.cross_entropy(input, target, weight, shape, opts)
    with np.errstate(all="ignore"):  # NaN and inf results are the semantics, not accidents
        return _as_result(xp, reference.cross_entropy(xp, input, target, weight, shape, opts))


def cross_entropy_and_grad(
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    grad_output: Any = None,
    out: Any = None,
    axis: int | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: Any = None,
    zero_if_all_ignored: bool = False,
) -> tuple[Any, Any]:
    r"""The cross-entropy loss and its gradient with respect to ``input``, in one pass.

    For training without an autograd. The gradient is what torch's autograd gives for
    ``cross_entropy(input, target, ...).backward(grad_output)``; for class indices without smoothing it
    is, per non-ignored element,

    .. math::

        \frac{\partial l}{\partial x_{n,j}} = g_n\, w_{y_n}\,(\mathrm{softmax}(x_n)_j - [j = y_n])

    with :math:`g_n` the upstream gradient divided by the mean's denominator. Ignored elements get 0.

    Parameters
    ----------
    input, target, weight, ignore_index, reduction, label_smoothing
        As for :func:`cross_entropy`.
    grad_output : array or float, optional, keyword-only
        The upstream gradient d(objective)/d(loss): a scalar for ``mean`` and ``sum`` (default 1), and
        required, in the loss's shape, for ``none``.
    out : NumPy array, optional, keyword-only
        Where to write the gradient (the input's shape and dtype, C-contiguous), so that a training
        loop reuses one buffer instead of allocating one per step. It is returned as ``grad_input``.
        It may be the input itself (the gradient then overwrites the logits; with the classes on the
        last axis no other input-sized memory is used), but may not otherwise overlap the input or the
        target. NumPy inputs only.
    axis, z_loss, softcap, normalizer, zero_if_all_ignored
        As for :func:`cross_entropy`.

    Returns
    -------
    loss : array
        As returned by :func:`cross_entropy`.
    grad_input : array
        d(loss)/d(input), the input's shape, library and dtype.

    Examples
    --------
    One step of gradient descent on a linear classifier:

    >>> import numpy as np, crossent
    >>> rng = np.random.default_rng(0)
    >>> features, labels = rng.normal(size=(64, 4)), rng.integers(0, 3, size=64)
    >>> W = np.zeros((4, 3))
    >>> loss, dlogits = crossent.cross_entropy_and_grad(features @ W, labels)
    >>> print(f"{loss:.4f}")  # log(3) for uniform predictions
    1.0986
    >>> W -= 0.5 * features.T @ dlogits
    >>> bool(crossent.cross_entropy(features @ W, labels) < loss)
    True
    """
    opts = validate.loss_options(
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        normalizer=normalizer,
        zero_if_all_ignored=zero_if_all_ignored,
    )
    xp, input, target, weight, shape = _prepare_loss(input, target, weight, axis, opts, allow_probabilities=True)
    if grad_output is not None and not array_api_compat.is_array_api_obj(grad_output):
        grad_output = xp.asarray(grad_output, device=array_api_compat.device(input))
    validate.check_grad_output(grad_output, shape.batch_shape, opts.reduction)
    if out is not None:
        validate.check_out(out, input, target)
    kernel = native_kernel(xp, input)
    # The kernel overwrites the logits row by row only with the classes contiguous (the last axis).
    kernel_out = out
    if out is not None and np.shares_memory(out, input) and shape.class_axis != input.ndim - 1:
        kernel_out = None
    if kernel is not None:
        loss, grad = kernel.cross_entropy_and_grad(input, target, weight, shape, opts, grad_output, kernel_out)
        if out is not None and kernel_out is None:
            np.copyto(out, grad)
            grad = out
        return loss, grad
    with np.errstate(all="ignore"):
        loss, grad = reference.cross_entropy_and_grad(xp, input, target, weight, shape, opts, grad_output)
    if out is not None:
        np.copyto(out, grad)
        grad = out
    return _as_result(xp, loss), grad


def nll_loss(
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    axis: int | None = None,
    normalizer: Any = None,
    zero_if_all_ignored: bool = False,
) -> Any:
    r"""The negative log-likelihood of class indices under log-probabilities ``input``.

    .. math::

        l_n = -w_{y_n}\, x_{n, y_n}, \qquad
        \text{mean} = \frac{\sum_n l_n}{\sum_n w_{y_n}} \text{ over non-ignored } n

    ``cross_entropy(x, y) == nll_loss(log_softmax(x, axis=1), y)``: this picks ``x[range(N), y]`` the
    way the seed notebook does with advanced indexing.

    Parameters
    ----------
    input : array, shape (C,), (N, C) or (N, C, d1, ..., dk)
        Log-probabilities, classes on axis 1 (or 0 for a 1-D input), or on ``axis``.
    target : integer array
        Class indices, the input's shape without the class axis.
    weight, ignore_index, reduction, axis, normalizer, zero_if_all_ignored
        As for :func:`cross_entropy`.

    Returns
    -------
    array
        0-d for ``mean`` and ``sum``; the target's shape for ``none``.

    Examples
    --------
    >>> import numpy as np, crossent
    >>> logp = np.log(np.array([[0.25, 0.75], [0.5, 0.5]]))
    >>> print(f"{crossent.nll_loss(logp, np.array([1, 0])):.4f}")  # -(log .75 + log .5) / 2
    0.4904
    """
    opts = validate.loss_options(
        reduction=reduction,
        ignore_index=ignore_index,
        normalizer=normalizer,
        zero_if_all_ignored=zero_if_all_ignored,
    )
    xp, input, target, weight, shape = _prepare_loss(input, target, weight, axis, opts, allow_probabilities=False)
    kernel = native_kernel(xp, input)
    if kernel is not None:
        return kernel.nll_loss(input, target, weight, shape, opts)
    with np.errstate(all="ignore"):
        return _as_result(xp, reference.nll_loss(xp, input, target, weight, shape, opts))


def _softmax_input(x: Any, axis: Any) -> tuple[Any, Any, int, bool]:
    """(namespace, array, axis, whether the input was 0-d). A 0-d input is taken as a vector of one
    element (torch's rule, with axis 0 or -1); the caller gives its result back as 0-d."""
    xp, x, _ = _namespace(x)
    validate.require_floating(xp, x, "x")
    if x.ndim == 0:
        validate.resolve_axes(axis, 0)
        return xp, xp.reshape(x, (1,)), 0, True
    return xp, x, validate.resolve_axis(axis, x.ndim, torch_rule=False), False


def logsumexp(x: Any, axis: int | tuple[int, ...] | None = -1, keepdims: bool = False) -> Any:
    r"""``log(sum(exp(x), axis))``, computed without overflow.

    .. math::

        \operatorname{logsumexp}(x) = m + \log \sum_j \exp(x_j - m), \qquad m = \max_j x_j

    The naive form overflows float32 once an entry exceeds about 88.7; the shifted sum lies in [1, C].

    Parameters
    ----------
    x : array
        Any shape, 0-d included (the log-sum-exp of one element is that element, as in torch).
    axis : int, tuple of ints or None
        The axes summed over: one (default the last), several (``axis=(0, 1)``, as torch's ``dim``
        and SciPy's ``axis`` take), or every axis with ``None`` (SciPy's and NumPy's meaning of None;
        torch has no such default). An empty tuple sums over nothing and returns ``x``.
    keepdims : bool
        Keep the summed axes with length 1.

    Returns
    -------
    array
        ``x``'s shape without ``axis`` (kept with length 1 if ``keepdims``), ``x``'s library and dtype.

    Raises
    ------
    ValueError
        An axis out of range, or named twice.

    Examples
    --------
    >>> import numpy as np, crossent
    >>> print(crossent.logsumexp(np.array([1000.0, 1000.0])))  # 1000 + log 2; naive form: inf
    1000.6931471805599
    >>> print(crossent.logsumexp(np.zeros((2, 3)), axis=(0, 1)) - np.log(6.0))  # over all 6 entries
    0.0

    References
    ----------
    Blanchard, Higham & Higham, "Accurately computing the log-sum-exp and softmax functions",
    IMA J. Numer. Anal. 41 (2021).
    """
    if not isinstance(keepdims, bool):
        raise TypeError(f"keepdims must be a bool, got {keepdims!r}")
    if isinstance(axis, tuple) or axis is None:
        return _logsumexp_axes(x, axis, keepdims)
    if not isinstance(keepdims, bool):
        raise TypeError(f"keepdims must be a bool, got {keepdims!r}")
    if isinstance(axis, tuple) or axis is None:
        return _logsumexp_axes(x, axis, keepdims)
    xp, x, ax, scalar = _softmax_input(x, axis)
    keepdims = keepdims and not scalar  # a 0-d input gives a 0-d result, as in torch
    kernel = native_kernel(xp, x)
    if kernel is not None:
        return kernel.logsumexp(x, ax, keepdims)
    with np.errstate(all="ignore"):
        return _as_result(xp, reference.logsumexp(xp, x, ax, keepdims))


def _logsumexp_axes(x: Any, axis: tuple[int, ...] | None, keepdims: bool) -> Any:
    """logsumexp over several axes: they are moved last and flattened into one (a copy unless they
    are the trailing axes already), then reduced by the one-axis path."""
    xp, x, _ = _namespace(x)
    validate.require_floating(xp, x, "x")
    shape = tuple(int(n) for n in x.shape)
    axes = validate.resolve_axes(axis, x.ndim)
    kept = tuple(a for a in range(x.ndim) if a not in axes)
    if kept + axes != tuple(range(x.ndim)):
        x = xp.permute_dims(x, kept + axes)
    flat = xp.reshape(x, (*(shape[a] for a in kept), math.prod(shape[a] for a in axes)))
    out = logsumexp(flat, axis=-1)
    if keepdims:
        out = xp.reshape(out, tuple(1 if a in axes else n for a, n in enumerate(shape)))
    return out


def log_softmax(x: Any, axis: int = -1) -> Any:
    r"""``x - logsumexp(x, axis)``: log-probabilities, computed without overflow.

    .. math::

        \log\mathrm{softmax}(x)_j = (x_j - m) - \log \sum_k \exp(x_k - m)

    It is idempotent: ``log_softmax(log_softmax(x)) == log_softmax(x)`` up to rounding, which is why the
    seed notebook finds ``CrossEntropyLoss(LogSoftmax(x)) == CrossEntropyLoss(x)``. A 0-d input is one
    element over axis 0 (or -1): its result is 0-d, 0 for a finite ``x``, as in torch.

    Examples
    --------
    >>> import numpy as np, crossent
    >>> print(np.round(crossent.log_softmax(np.array([0.0, np.log(3.0)])), 4))
    [-1.3863 -0.2877]
    """
    xp, x, ax, scalar = _softmax_input(x, axis)
    kernel = native_kernel(xp, x)
    if kernel is not None:
        out = kernel.log_softmax(x, ax)
    else:
        with np.errstate(all="ignore"):
            out = reference.log_softmax(xp, x, ax)
    return xp.reshape(out, ()) if scalar else out


def softmax(x: Any, axis: int = -1) -> Any:
    r"""``exp(x) / sum(exp(x), axis)``, computed without overflow.

    .. math::

        \mathrm{softmax}(x)_j = \frac{\exp(x_j - m)}{\sum_k \exp(x_k - m)}, \qquad m = \max_k x_k

    A 0-d input is one element over axis 0 (or -1): its result is 0-d, 1 for a finite ``x``, as in torch.

    Examples
    --------
    >>> import numpy as np, crossent
    >>> print(crossent.softmax(np.array([1000.0, 1000.0])))  # naive form: nan
    [0.5 0.5]
    """
    xp, x, ax, scalar = _softmax_input(x, axis)
    kernel = native_kernel(xp, x)
    if kernel is not None:
        out = kernel.softmax(x, ax)
    else:
        with np.errstate(all="ignore"):
            out = reference.softmax(xp, x, ax)
    return xp.reshape(out, ()) if scalar else out
