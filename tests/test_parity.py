"""crossent against torch's own cross_entropy (float64 oracle), forward and gradient, over every option."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import crossent
import oracle
from cases import SHAPES, grad_output_for, make_case

DTYPES = [np.float32, np.float64]
OPTIONS = list(
    itertools.product(
        ["mean", "sum", "none"],  # reduction
        [False, True],  # weighted
        [0.0, 0.3],  # label_smoothing
        [False, True],  # probability targets
    )
)


def check_case(case, rng, *, scale: float = 1.0):
    go = grad_output_for(case, rng)
    loss, grad = crossent.cross_entropy_and_grad(case.x, case.target, grad_output=go, **case.kwargs)
    expected = oracle.cross_entropy(case.x, case.target, grad_output=go, **case.kwargs)
    assert loss.dtype == case.x.dtype and grad.dtype == case.x.dtype
    assert isinstance(loss, np.ndarray), "reductions return 0-d arrays, like torch's 0-d tensors"
    oracle.assert_close(loss, expected.loss, case.x.dtype, what=f"loss {case.kwargs}", scale=scale)
    oracle.assert_close(grad, expected.grad, case.x.dtype, what=f"grad {case.kwargs}", scale=scale)
    forward_only = crossent.cross_entropy(case.x, case.target, **case.kwargs)
    np.testing.assert_array_equal(forward_only, loss)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("reduction", "weighted", "label_smoothing", "probability"), OPTIONS)
def test_options_grid(rng, shape, dtype, reduction, weighted, label_smoothing, probability):
    case = make_case(
        rng,
        shape,
        dtype,
        probability=probability,
        weighted=weighted,
        ignore_some=not probability,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    check_case(case, rng)


EXTRAS = [
    {"z_loss": 1e-3},
    {"softcap": 5.0},
    {"normalizer": 17.0},
    {"z_loss": 0.01, "softcap": 2.0, "label_smoothing": 0.1},
    {"axis": -1},
    {"axis": 0},
    {"axis": -1, "z_loss": 0.1, "softcap": 3.0, "normalizer": 5.0},
]
# normalizer applies to reduction='mean' only (other reductions refuse it; see test_validation).
EXTRAS_GRID = [
    (extras, reduction)
    for extras in EXTRAS
    for reduction in ["mean", "sum", "none"]
    if reduction == "mean" or "normalizer" not in extras
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("extras", "reduction"), EXTRAS_GRID, ids=str)
@pytest.mark.parametrize("probability", [False, True])
def test_crossent_extras_against_torch_primitives(rng, dtype, extras, probability, reduction):
    extras = dict(extras)
    label_smoothing = extras.pop("label_smoothing", 0.0)
    case = make_case(
        rng,
        (6, 9, 4),
        dtype,
        probability=probability,
        weighted=True,
        ignore_some=not probability,
        reduction=reduction,
        label_smoothing=label_smoothing,
        **extras,
    )
    check_case(case, rng)


@pytest.mark.parametrize("ignore_index", [1, 0, -1, 255])
def test_ignore_index_may_be_a_real_class_or_any_value(rng, ignore_index):
    case = make_case(
        rng, (40, 6), np.float64, ignore_some=True, ignore_index=ignore_index, weighted=True, label_smoothing=0.2
    )
    check_case(case, rng)


@pytest.mark.parametrize("target_dtype", [np.int64, np.int32, np.int16, np.uint8])
def test_integer_target_dtypes(rng, target_dtype):
    case = make_case(rng, (9, 5, 3), np.float64, ignore_some=True, ignore_index=255)
    case.target = case.target.astype(target_dtype)
    check_case(case, rng)


def test_large_odd_vocabulary_channels_last(rng):
    # (3, 423, 2053) with classes last: a sequence batch as language models lay it out.
    case = make_case(
        rng,
        (3, 423, 2053),
        np.float32,
        axis=-1,
        ignore_some=True,
        weighted=True,
        label_smoothing=0.1,
        z_loss=1e-4,
        scale=4.0,
    )
    check_case(case, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_nll_loss_against_torch(rng, dtype):
    for shape, reduction, weighted in itertools.product(SHAPES, ["mean", "sum", "none"], [False, True]):
        case = make_case(rng, shape, dtype, ignore_some=True, weighted=weighted)
        log_probs = crossent.log_softmax(case.x, axis=0 if len(shape) == 1 else 1)
        w = case.kwargs.get("weight")
        got = crossent.nll_loss(log_probs, case.target, w, reduction=reduction)
        expected = oracle.nll_loss(log_probs, case.target, w, reduction=reduction)
        oracle.assert_close(got, expected, dtype, what=f"nll {shape} {reduction} {weighted}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(7,), (13, 5), (3, 11, 7), (2, 5, 3, 4)], ids=str)
def test_softmax_family_against_torch(rng, shape, dtype):
    torch = pytest.importorskip("torch")
    x = (10 * rng.standard_normal(shape)).astype(dtype)
    for axis in range(-len(shape), len(shape)):
        xt = torch.from_numpy(x.astype(np.float64))
        oracle.assert_close(crossent.log_softmax(x, axis=axis), torch.log_softmax(xt, axis).numpy(), dtype)
        oracle.assert_close(crossent.softmax(x, axis=axis), torch.softmax(xt, axis).numpy(), dtype)
        oracle.assert_close(crossent.logsumexp(x, axis=axis), torch.logsumexp(xt, axis).numpy(), dtype)
        keep = crossent.logsumexp(x, axis=axis, keepdims=True)
        oracle.assert_close(keep, torch.logsumexp(xt, axis, keepdim=True).numpy(), dtype)


@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    probability = draw(st.booleans())
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    axis = draw(st.one_of(st.none(), st.integers(-ndim, ndim - 1)))
    return {
        "shape": shape,
        "dtype": draw(st.sampled_from(DTYPES)),
        "probability": probability,
        "weighted": draw(st.booleans()),
        "ignore_some": not probability and draw(st.booleans()),
        "reduction": reduction,
        "label_smoothing": draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])),
        "axis": axis,
        "z_loss": draw(st.sampled_from([0.0, 1e-4, 0.1])),
        "softcap": draw(st.sampled_from([None, 1.0, 30.0])),
        "normalizer": draw(st.sampled_from([None, 3.0])) if reduction == "mean" else None,
        "scale": draw(st.sampled_from([0.1, 3.0, 50.0])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@given(problems())
def test_random_problems_against_torch(problem):
    rng = np.random.default_rng(problem.pop("seed"))
    shape, dtype = problem.pop("shape"), problem.pop("dtype")
    case = make_case(rng, shape, dtype, **problem)
    check_case(case, rng, scale=max(1.0, problem["scale"] / 3))
