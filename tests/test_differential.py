"""Differential test (issue 16): one hypothesis draw through every path that accepts it, each against the
float64 oracle (tests/oracle.py: torch float64 autograd, crossent's extras built from torch primitives).

A draw is a layout ((C,), (N, C), (N, C, d1, d2), (N, T, C) with ``axis=-1``), a dtype, every option
(weight, ignore_index with targets equal to it, reduction, label_smoothing, z_loss, softcap, normalizer
as a float, a 0-d NumPy array or a 0-d tensor, 0 included, zero_if_all_ignored, probability targets) and
special values (+-inf, NaN, rows and class slices of -inf, magnitudes up to 3e38, targets on -inf
classes). The paths: the NumPy kernel, the Array-API reference, the torch CPU op, the torch-ops path, the
vocabulary-parallel loss with its slices combined in process (threads standing in for ranks), and the
linear loss with vocabulary chunks (an identity hidden state, so that its logits are the drawn values).

Values and gradients must match the oracle rounded to the input's dtype: NaN where and only where the
oracle has NaN, infinities equal, finite values within the dtype's tolerance. Where torch has a hole the
issue names, the oracle follows the issue's decision:

- an ignored element contributes nothing, so its gradient is exactly 0 (torch gives NaN for an ignored
  row of -inf logits);
- ``normalizer=0`` divides by 0 (NaN or inf, as IEEE says), or gives 0 with ``zero_if_all_ignored``;
  a negative or NaN normalizer raises ValueError, whatever its type.

CI runs the "ci"/"dev" profiles of tests/conftest.py (a bounded number of draws per path). A longer run
is one command::

    PYTHONPATH=src python -m pytest tests/test_differential.py --hypothesis-profile=long

(``long`` draws 2,000 examples per path; ``--hypothesis-seed=N`` explores other draws.)
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import crossent
from crossent import _dispatch

torch = pytest.importorskip("torch")
oracle = pytest.importorskip("oracle")
import torch.distributed as dist  # noqa: E402

import crossent.torch as ct  # noqa: E402
from crossent.torch import distributed as cd  # noqa: E402

SPECIALS = [np.inf, -np.inf, np.nan, 1e30, -1e30, 3e38, -3e38, 0.0]
DTYPES = {"float64": (np.float64, torch.float64), "float32": (np.float32, torch.float32)}


@dataclass
class Draw:
    x: np.ndarray  # logits in the drawn dtype
    target: np.ndarray  # int64 class indices, or probabilities in the drawn dtype
    axis: int | None
    kwargs: dict[str, Any]  # weight (NumPy, drawn dtype) and the options, normalizer as a float or None
    normalizer_kind: str  # "float", "array" (0-d NumPy array / 0-d tensor)
    grad_output: np.ndarray | None  # float64, for reduction="none"

    @property
    def dtype(self) -> str:
        return self.x.dtype.name

    @property
    def class_axis(self) -> int:
        return (0 if self.x.ndim == 1 else 1) if self.axis is None else self.axis % self.x.ndim

    @property
    def probability(self) -> bool:
        return bool(np.issubdtype(self.target.dtype, np.floating))


@st.composite
def draws(draw: Any) -> Draw:
    dtype = draw(st.sampled_from(list(DTYPES)))
    layout = draw(st.sampled_from(["1d", "nc", "ncd", "ntc"]))
    c = draw(st.integers(1, 6))
    n = draw(st.integers(0, 4) if layout == "nc" else st.integers(1, 3))
    shape = {"1d": (c,), "nc": (n, c), "ncd": (n, c, draw(st.integers(1, 2)), draw(st.integers(1, 2))),
             "ntc": (n, draw(st.integers(1, 3)), c)}[layout]  # fmt: skip
    axis = -1 if layout == "ntc" else None
    x = draw(hnp.arrays(np.float64, shape, elements=st.floats(-20, 20, allow_subnormal=False)))
    moved = np.moveaxis(x, (0 if x.ndim == 1 else 1) if axis is None else axis % x.ndim, -1)  # a view: (..., C)
    rows = moved.reshape(-1, c)
    if rows.shape[0]:
        for position, value in draw(st.lists(st.tuples(st.integers(0, rows.size - 1), st.sampled_from(SPECIALS)),
                                             max_size=3)):  # fmt: skip
            rows.flat[position] = value
        if draw(st.booleans()):  # a class slice of -inf (a whole row when it covers every class)
            r = draw(st.integers(0, rows.shape[0] - 1))
            lo = draw(st.integers(0, c - 1))
            rows[r, lo : draw(st.integers(lo + 1, c))] = -np.inf
        if draw(st.booleans()):  # a class that is -inf in every row
            rows[:, draw(st.integers(0, c - 1))] = -np.inf
        if draw(st.booleans()):  # a huge magnitude shared by a row
            rows[draw(st.integers(0, rows.shape[0] - 1))] *= draw(st.sampled_from([1e28, -1e28, 1e36]))
    np.copyto(moved, rows.reshape(moved.shape))
    np_dtype = DTYPES[dtype][0]
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(np_dtype)
    batch = moved.shape[:-1]
    probability = draw(st.booleans())
    kwargs: dict[str, Any] = {}
    if probability:
        t = draw(hnp.arrays(np.float64, moved.shape, elements=st.sampled_from([0.0, 0.25, 0.5, 1.0, 0.1, 0.7])))
        target = np.moveaxis(t, -1, (0 if x.ndim == 1 else 1) if axis is None else axis % x.ndim).astype(np_dtype)
    else:
        ignore_index = draw(st.sampled_from([-100, 0, c - 1]))
        kwargs["ignore_index"] = ignore_index
        values = st.one_of(st.integers(0, c - 1), st.just(ignore_index))
        target = draw(hnp.arrays(np.int64, batch, elements=values))
    if draw(st.booleans()):
        kwargs["weight"] = draw(hnp.arrays(np.float64, (c,), elements=st.sampled_from([0.0, 0.5, 1.0, 2.5]))).astype(
            np_dtype
        )
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    kwargs["reduction"] = reduction
    kwargs["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]))
    kwargs["z_loss"] = draw(st.sampled_from([0.0, 0.0, 1e-4, 0.5]))
    kwargs["softcap"] = draw(st.sampled_from([None, None, 5.0, 30.0]))
    kwargs["zero_if_all_ignored"] = draw(st.booleans())
    kind = "float"
    if reduction == "mean" and draw(st.booleans()):
        kwargs["normalizer"] = draw(st.sampled_from([0.0, 0.0, 1.0, 3.0, 17.5, -1.0, math.nan]))
        kind = draw(st.sampled_from(["float", "array"]))
    grad_output = None
    if reduction == "none":
        grad_output = draw(hnp.arrays(np.float64, batch, elements=st.sampled_from([1.0, 0.5, -2.0, 0.0])))
    return Draw(x, target, axis, kwargs, kind, grad_output)


# ---------------------------------------------------------------------------------------------------
# The oracle, and how a result is compared with it.


def _expected(d: Draw) -> tuple[np.ndarray, np.ndarray]:
    kw = {**d.kwargs}
    if "weight" in kw:
        kw["weight"] = kw["weight"].astype(np.float64)
    with np.errstate(all="ignore"):
        o = oracle.cross_entropy(d.x.astype(np.float64), d.target, axis=d.axis, grad_output=d.grad_output, **kw)
    grad = np.array(o.grad)
    if not d.probability:  # an ignored element contributes nothing: its gradient is 0 (torch: NaN on -inf rows)
        ignored = np.expand_dims(d.target == d.kwargs["ignore_index"], d.class_axis)
        grad = np.where(ignored, 0.0, grad)
    return np.asarray(o.loss), grad


def _tolerance(d: Draw) -> tuple[float, float]:
    tol = oracle.tolerances(d.dtype)
    # Label smoothing and probability targets sum the logits over the classes: their cancellation is
    # worth a few units of the largest finite logit's last place, not of the result's.
    finite = np.abs(d.x[np.isfinite(d.x)].astype(np.float64))
    big = float(finite.max()) if finite.size else 0.0
    c = d.x.shape[d.class_axis]
    return tol["rtol"], tol["atol"] + 4 * c * big * float(np.finfo(d.x.dtype).eps)


def _check(what: str, actual: Any, expected: np.ndarray, d: Draw) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    with np.errstate(over="ignore"):
        expected = expected.astype(d.x.dtype).astype(np.float64)  # the oracle rounded to the input's dtype
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != oracle's {expected.shape}"
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    assert np.array_equal(nan_a, nan_e), f"{what}: NaN at {np.argwhere(nan_a).tolist()}, oracle at " \
        f"{np.argwhere(nan_e).tolist()}\n  got {actual}\n  oracle {expected}"  # fmt: skip
    inf_a, inf_e = np.isinf(actual), np.isinf(expected)
    assert np.array_equal(inf_a, inf_e) and np.array_equal(actual[inf_a], expected[inf_e]), \
        f"{what}: infinities differ\n  got {actual}\n  oracle {expected}"  # fmt: skip
    rtol, atol = _tolerance(d)
    finite = np.isfinite(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=rtol, atol=atol, err_msg=what)


def _bad_normalizer(d: Draw) -> bool:
    n = d.kwargs.get("normalizer")
    return n is not None and (math.isnan(n) or n < 0)


# ---------------------------------------------------------------------------------------------------
# The paths: each returns (loss, gradient of the logits) as float64 NumPy arrays in the draw's layout,
# or None when it does not take the draw.


def _numpy_kwargs(d: Draw) -> dict[str, Any]:
    kw = {**d.kwargs, "axis": d.axis}
    if kw.get("normalizer") is not None and d.normalizer_kind == "array":
        kw["normalizer"] = np.array(kw["normalizer"], dtype=np.float64)
    return kw


def _numpy_path(d: Draw) -> tuple[Any, Any]:
    kw = _numpy_kwargs(d)
    loss, grad = crossent.cross_entropy_and_grad(d.x, d.target, grad_output=d.grad_output, **kw)
    alone = crossent.cross_entropy(d.x, d.target, **kw)
    _check("cross_entropy (without the gradient)", alone, np.asarray(loss, dtype=np.float64), d)
    return loss, grad


def numpy_kernel(d: Draw) -> tuple[Any, Any]:
    previous = _dispatch.use_native(True)
    try:
        return _numpy_path(d)
    finally:
        _dispatch.use_native(previous)


def reference(d: Draw) -> tuple[Any, Any]:
    previous = _dispatch.use_native(False)
    try:
        return _numpy_path(d)
    finally:
        _dispatch.use_native(previous)


def _torch_kwargs(d: Draw) -> dict[str, Any]:
    kw = dict(d.kwargs)
    if "weight" in kw:
        kw["weight"] = torch.from_numpy(kw["weight"].copy())
    if kw.get("normalizer") is not None and d.normalizer_kind == "array":
        kw["normalizer"] = torch.tensor(kw["normalizer"], dtype=torch.float64)
    return kw


def _backward(loss: Any, d: Draw) -> None:
    upstream = None if d.grad_output is None else torch.from_numpy(d.grad_output).to(loss.dtype)
    loss.backward(upstream)


def torch_op(d: Draw) -> tuple[Any, Any]:
    x = torch.from_numpy(d.x.copy()).requires_grad_(True)
    loss = ct.cross_entropy(x, torch.from_numpy(d.target.copy()), axis=d.axis, **_torch_kwargs(d))
    _backward(loss, d)
    return loss.detach().numpy(), x.grad.numpy()


def _torch_ops_backend() -> Any:
    """The torch-ops implementation for CPU tensors."""
    return ct.use_backend("torch")


def torch_ops(d: Draw) -> tuple[Any, Any]:
    with _torch_ops_backend():
        return torch_op(d)


def _rows(d: Draw) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(R, C) logits and (R,) or (R, C) targets: the class axis last, the batch flattened."""
    moved = np.moveaxis(d.x, d.class_axis, -1)
    batch = moved.shape[:-1]
    t = np.moveaxis(d.target, d.class_axis, -1).reshape(-1, moved.shape[-1]) if d.probability else d.target.ravel()
    return moved.reshape(-1, moved.shape[-1]), t, batch


def _from_rows(grad_rows: np.ndarray, d: Draw, batch: tuple[int, ...]) -> np.ndarray:
    return np.moveaxis(grad_rows.reshape(*batch, d.x.shape[d.class_axis]), -1, d.class_axis)


def _rows_upstream(d: Draw, loss: Any) -> Any:
    return None if d.grad_output is None else torch.from_numpy(d.grad_output.ravel()).to(loss.dtype)


class _ThreadRanks:
    """``torch.distributed.all_reduce`` for ranks that are threads of this process: each rank's tensor
    is replaced by the max or sum over all ranks, as the collective would."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[Any] = [None] * world
        self.local = threading.local()

    def all_reduce(self, t: Any, op: Any = None, group: Any = None, **_: Any) -> None:
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        stacked = torch.stack(self.slots)
        result = stacked.amax(0) if op == dist.ReduceOp.MAX else stacked.sum(0)
        self.barrier.wait()  # every rank has read every slot before any slot is written again
        t.copy_(result)

    def run(self, work: Any) -> list[Any]:
        results: list[Any] = [None] * self.world

        def target(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = work(rank)
            except BaseException as err:
                results[rank] = err
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
            raise first
        return results


def vocab_parallel(d: Draw, cuts: list[int]) -> tuple[Any, Any] | None:
    x_rows, t_rows, batch = _rows(d)
    c = x_rows.shape[1]
    bounds = list(zip([0, *cuts], [*cuts, c], strict=True))
    kw = _torch_kwargs(d)
    ranks = _ThreadRanks(len(bounds))

    def work(rank: int) -> tuple[Any, Any]:
        v0, v1 = bounds[rank]
        local = torch.from_numpy(x_rows[:, v0:v1].copy()).requires_grad_(True)
        target = torch.from_numpy((t_rows[:, v0:v1] if d.probability else t_rows).copy())
        loss = cd.vocab_parallel_cross_entropy(local, target, vocab_start=v0, vocab_size=c, **kw)
        loss.backward(_rows_upstream(d, loss))
        return loss.detach(), local.grad

    with mock.patch.object(dist, "all_reduce", ranks.all_reduce):
        results = ranks.run(work)
    for rank, (loss, _) in enumerate(results[1:], 1):
        assert torch.equal(loss, results[0][0]) or torch.allclose(loss, results[0][0], equal_nan=True), \
            f"rank {rank}'s loss differs from rank 0's"  # fmt: skip
    grad_rows = torch.cat([g for _, g in results], dim=1).numpy()
    loss = results[0][0].numpy()
    return loss.reshape(batch) if d.kwargs["reduction"] == "none" else loss, _from_rows(grad_rows, d, batch)


def linear_chunks(d: Draw, vocab_chunk: int) -> tuple[Any, Any] | None:
    """The linear loss on hidden = identity (R, R) and W = the logits' transpose, so logits = x exactly:
    a column that is all one non-finite value goes into the bias instead (0 * inf would be NaN)."""
    x_rows, t_rows, batch = _rows(d)
    r = x_rows.shape[0]
    if r == 0:
        return None
    constant = np.array([np.isnan(col).all() or (not np.isfinite(col).any() and (col == col[0]).all())
                         for col in x_rows.T])  # fmt: skip
    if not np.isfinite(x_rows[:, ~constant]).all():
        return None  # a non-finite value the identity matmul cannot carry (it would meet a 0)
    W = np.where(constant[:, None], 0, x_rows.T).astype(d.x.dtype)
    bias = np.where(constant, x_rows[0], 0).astype(d.x.dtype)
    hidden = torch.eye(r, dtype=DTYPES[d.dtype][1]).requires_grad_(True)
    weight = torch.from_numpy(W.copy()).requires_grad_(True)
    kw = _torch_kwargs(d)
    if d.probability:
        kw.pop("ignore_index", None)
    loss = ct.linear_cross_entropy(
        hidden, weight, torch.from_numpy(t_rows.copy()), linear_bias=torch.from_numpy(bias), **kw,
        chunk_size=2, vocab_chunk_size=vocab_chunk,
    )  # fmt: skip
    loss.backward(_rows_upstream(d, loss))
    loss_np = loss.detach().numpy()
    # d(loss)/d(W) = d(loss)/d(logits)^T @ hidden = the logits' gradient, transposed.
    grad_rows = weight.grad.numpy().T
    return loss_np.reshape(batch) if d.kwargs["reduction"] == "none" else loss_np, _from_rows(grad_rows, d, batch)


# ---------------------------------------------------------------------------------------------------


def _run(d: Draw, path: Any, *args: Any) -> None:
    note(f"draw: x={d.x!r} target={d.target!r} axis={d.axis} kwargs={d.kwargs} normalizer as "
         f"{d.normalizer_kind} grad_output={d.grad_output!r}")  # fmt: skip
    if _bad_normalizer(d):
        with pytest.raises(ValueError, match="normalizer"):
            path(d, *args)
        return
    loss, grad = _expected(d)
    with np.errstate(all="ignore"):
        got = path(d, *args)
    if got is None:
        return
    _check(f"{path.__name__}: loss", got[0], loss, d)
    _check(f"{path.__name__}: gradient", got[1], grad, d)


@pytest.mark.parametrize("path", [numpy_kernel, reference, torch_op, torch_ops], ids=lambda p: p.__name__)
@given(d=draws())
def test_path_matches_the_oracle(path: Any, d: Draw) -> None:
    _run(d, path)


@given(d=draws(), data=st.data())
def test_vocab_parallel_slices_match_the_oracle(d: Draw, data: Any) -> None:
    c = d.x.shape[d.class_axis]
    cuts = sorted(data.draw(st.sets(st.integers(1, c - 1), max_size=2), label="cuts")) if c > 1 else []
    _run(d, vocab_parallel, cuts)


@given(d=draws(), data=st.data())
def test_linear_loss_with_vocabulary_chunks_matches_the_oracle(d: Draw, data: Any) -> None:
    c = d.x.shape[d.class_axis]
    _run(d, linear_chunks, data.draw(st.integers(1, c), label="vocab_chunk_size"))
