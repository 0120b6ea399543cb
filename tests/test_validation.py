"""Bad input raises a clear exception naming the bad value, before anything is computed."""

from __future__ import annotations

import numpy as np
import pytest

import crossent

X = np.zeros((4, 3), dtype=np.float32)
Y = np.array([0, 1, 2, 1])


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda: crossent.cross_entropy(X, np.array([0, 1, 3, 1])), IndexError, r"target value 3 .* 3 classes"),
        (lambda: crossent.cross_entropy(X, np.array([0, -2, 1, 1])), IndexError, r"target value -2"),
        (lambda: crossent.nll_loss(X, np.array([0, 1, 7, 1])), IndexError, r"target value 7"),
        (
            lambda: crossent.cross_entropy(X, np.array([0, 1, 2])),
            ValueError,
            r"target shape \(3,\) .* expected target shape \(4,\)",
        ),
        (
            lambda: crossent.cross_entropy(np.zeros((2, 3, 5)), np.zeros((2, 3), int)),
            ValueError,
            r"expected target shape \(2, 5\)",
        ),
        (lambda: crossent.cross_entropy(X, Y, weight=np.ones(4)), ValueError, r"weight .* \(3,\), got shape \(4,\)"),
        (lambda: crossent.cross_entropy(X, Y, weight=np.ones((3, 1))), ValueError, r"got shape \(3, 1\)"),
        (lambda: crossent.cross_entropy(X, Y, reduction="avg"), ValueError, r"reduction must be one of .* got 'avg'"),
        (
            lambda: crossent.cross_entropy(X, Y, label_smoothing=-0.1),
            ValueError,
            r"label_smoothing must be in \[0.0, 1.0\], got -0.1",
        ),
        (lambda: crossent.cross_entropy(X, Y, label_smoothing=1.5), ValueError, r"got 1.5"),
        (lambda: crossent.cross_entropy(X, Y, label_smoothing=float("nan")), ValueError, r"label_smoothing"),
        (
            lambda: crossent.cross_entropy(X, np.zeros((4, 2), np.float32)),
            ValueError,
            r"input's shape \(4, 3\), got \(4, 2\)",
        ),
        (
            lambda: crossent.cross_entropy(X.astype(np.int32), Y),
            TypeError,
            r"input must have a real floating dtype.*int32",
        ),
        (
            lambda: crossent.cross_entropy(X, Y.astype(bool)),
            TypeError,
            r"target must have an integer dtype .* got bool",
        ),
        (lambda: crossent.cross_entropy(X, Y.astype(np.complex64)), TypeError, r"got complex64"),
        (lambda: crossent.cross_entropy(X, Y, axis=2), ValueError, r"axis 2 is out of range .* 2 dimensions"),
        (lambda: crossent.cross_entropy(X, Y, axis=1.0), TypeError, r"axis must be an int, got 1.0"),
        (lambda: crossent.cross_entropy(np.float32(1.0), np.int64(0)), ValueError, r"at least one dimension"),
        (lambda: crossent.cross_entropy(X, Y, ignore_index=1.5), TypeError, r"ignore_index must be an int, got 1.5"),
        (lambda: crossent.cross_entropy(X, Y, z_loss=-1.0), ValueError, r"z_loss must be in .* got -1.0"),
        (lambda: crossent.cross_entropy(X, Y, softcap=0.0), ValueError, r"softcap must be in \(0.0, inf\], got 0.0"),
        (lambda: crossent.cross_entropy(X, Y, softcap=float("inf")), ValueError, r"softcap must be finite"),
        (
            lambda: crossent.cross_entropy(X, Y, normalizer=-1),
            ValueError,
            r"normalizer must be a finite number >= 0 \(what mean divides by\), got -1",
        ),
        (
            lambda: crossent.cross_entropy(X, Y, reduction="sum", normalizer=4),
            ValueError,
            r"normalizer only applies to reduction='mean'",
        ),
        (
            lambda: crossent.cross_entropy(X, Y, normalizer="4"),
            TypeError,
            r"normalizer must be a number >= 0 or a 0-d array",
        ),
        (
            lambda: crossent.cross_entropy(X, Y, weight=np.ones(3, np.int64)),
            TypeError,
            r"weight must have a real floating dtype",
        ),
        (
            lambda: crossent.cross_entropy_and_grad(X, Y, reduction="none"),
            ValueError,
            r"grad_output is required .* shape \(4,\)",
        ),
        (
            lambda: crossent.cross_entropy_and_grad(X, Y, reduction="none", grad_output=np.ones(3)),
            ValueError,
            r"loss shape \(4,\), got \(3,\)",
        ),
        (
            lambda: crossent.cross_entropy_and_grad(X, Y, grad_output=np.ones(4)),
            ValueError,
            r"scalar with reduction='mean'",
        ),
        (
            lambda: crossent.nll_loss(X, np.zeros((4, 3), np.float32)),
            TypeError,
            r"class indices \(an integer dtype\), got float32",
        ),
        (lambda: crossent.log_softmax(np.arange(3)), TypeError, r"x must have a real floating dtype"),
        (lambda: crossent.softmax(X, axis=-3), ValueError, r"axis -3 is out of range"),
        (lambda: crossent.logsumexp(X, keepdims=1), TypeError, r"keepdims must be a bool"),
        (lambda: crossent.CrossEntropyLoss(reduction="mena"), ValueError, r"got 'mena'"),
        (lambda: crossent.LogSoftmax(dim="1"), TypeError, r"dim must be an int"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_checked_options_are_remembered_per_type_not_just_per_value():
    # 1 and True, 0 and False hash alike: a cached check of the first must not let the second through.
    crossent.cross_entropy(X, Y, ignore_index=1, zero_if_all_ignored=False)
    with pytest.raises(TypeError, match="ignore_index must be an int, got True"):
        crossent.cross_entropy(X, Y, ignore_index=True)
    crossent.cross_entropy(X, Y, label_smoothing=0)
    with pytest.raises(TypeError, match="zero_if_all_ignored must be a bool, got 0"):
        crossent.cross_entropy(X, Y, zero_if_all_ignored=0)


def test_arrays_from_two_libraries_are_refused():
    torch = pytest.importorskip("torch")
    strict = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="one library"):
        crossent.cross_entropy(torch.zeros(4, 3), strict.asarray(np.zeros(4, dtype=np.int64)))


def test_nan_logits_propagate_without_an_exception():
    x = X.copy()
    x[1, 2] = np.nan
    loss = crossent.cross_entropy(x, Y, reduction="none")
    assert np.isnan(loss[1]) and np.all(np.isfinite(loss[[0, 2, 3]]))
    assert np.isnan(crossent.cross_entropy(x, Y))


def test_the_class_index_check_runs_before_any_output(monkeypatch):
    import crossent._reference as reference

    def must_not_run(*args, **kwargs):
        raise AssertionError("computation started before validation")

    monkeypatch.setattr(reference, "cross_entropy", must_not_run)
    with pytest.raises(IndexError):
        crossent.cross_entropy(X, np.array([0, 1, 9, 1]))


def test_out_receives_the_gradient_and_is_checked(rng):
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=6)
    buffer = np.full_like(x, np.nan)
    loss, grad = crossent.cross_entropy_and_grad(x, y, label_smoothing=0.1, out=buffer)
    assert grad is buffer
    expected_loss, expected_grad = crossent.cross_entropy_and_grad(x, y, label_smoothing=0.1)
    np.testing.assert_array_equal(grad, expected_grad)
    np.testing.assert_array_equal(loss, expected_loss)
    with pytest.raises(ValueError, match=r"shape \(6, 5\) and dtype float32, got shape \(5, 6\)"):
        crossent.cross_entropy_and_grad(x, y, out=np.empty((5, 6), np.float32))
    with pytest.raises(ValueError, match="dtype float32, got shape \\(6, 5\\) and dtype float64"):
        crossent.cross_entropy_and_grad(x, y, out=np.empty((6, 5)))
    overlapping = np.empty((7, 5), np.float32)
    overlapping[:6] = x
    with pytest.raises(ValueError, match="must be the input itself or share no memory"):
        crossent.cross_entropy_and_grad(overlapping[:6], y, out=overlapping[1:])
    with pytest.raises(ValueError, match="C-contiguous"):
        crossent.cross_entropy_and_grad(x, y, out=np.empty((5, 6), np.float32).T)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="out must be a NumPy array"):
        crossent.cross_entropy_and_grad(torch.from_numpy(x), torch.from_numpy(y), out=torch.empty(6, 5))


@pytest.mark.parametrize("library", ["torch", "jax", "array_api_strict"])
def test_numpy_and_python_data_beside_another_library_are_converted_to_it(library):
    # Issue 16 item 12: optax's tests call a loss with JAX logits and NumPy labels.
    import oracle
    from conftest import Backend

    b = Backend(library)
    expected = oracle.cross_entropy(X, Y, reduction="none", want_grad=False).loss
    for x, y in [(b.asarray(X), Y), (X, b.asarray(Y)), (b.asarray(X), Y.tolist())]:
        got = crossent.cross_entropy(x, y, reduction="none")
        assert b.same_library(got), type(got)
        np.testing.assert_allclose(b.to_numpy(got), expected, rtol=1e-6)
    got = crossent.cross_entropy(X, Y, b.asarray(np.ones(X.shape[1], dtype=X.dtype)))
    assert b.same_library(got)


def test_integers_a_library_would_narrow_raise_instead_of_wrapping():
    # JAX without x64 holds int64 as int32 and would wrap 2**40 to class 0.
    import subprocess
    import sys

    pytest.importorskip("jax")
    code = (
        "import numpy as np, jax.numpy as jnp, crossent\n"
        "x = jnp.zeros((2, 3))\n"
        "try:\n"
        "    crossent.cross_entropy(x, np.array([0, 2**40]))\n"
        "except OverflowError as e:\n"
        "    print('OverflowError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "OverflowError value 1099511627776 does not fit int32" in out.stdout, out.stdout + out.stderr
