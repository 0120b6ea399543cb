"""crossent for JAX: the cross-entropy loss and its parts with PyTorch's semantics and crossent's options,
under ``jit``, ``grad``, ``vmap`` and ``shard_map`` (imported on purpose; ``import crossent`` never
imports JAX).

See docs/jax.md. On the CPU a jitted call runs crossent's native kernel inside XLA where its FFI target
is available (:func:`ffi_available`); elsewhere a jnp implementation of the same semantics that XLA
fuses. :func:`use_backend` forces either.
"""

from ._backend import current_backend, ffi_available, use_backend
from ._functional import check_class_indices, cross_entropy, log_softmax, logsumexp, nll_loss, softmax
from ._linear import linear_cross_entropy
from ._optax import softmax_cross_entropy, softmax_cross_entropy_with_integer_labels
from ._parallel import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

__all__ = [
    "check_class_indices",
    "cross_entropy",
    "current_backend",
    "ffi_available",
    "linear_cross_entropy",
    "log_softmax",
    "logsumexp",
    "nll_loss",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "use_backend",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]
