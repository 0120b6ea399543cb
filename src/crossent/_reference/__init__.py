"""The specification: every crossent function written once in the Array API, with its gradient.

Imports nothing of crossent's but ``_validate``; the public layer and every fast path are checked
against these functions.
"""

from .losses import cross_entropy, cross_entropy_and_grad, mean_denominator, nll_loss, reduce_losses
from .softmax import log_softmax, logsumexp, softmax

__all__ = [
    "cross_entropy",
    "cross_entropy_and_grad",
    "log_softmax",
    "logsumexp",
    "mean_denominator",
    "nll_loss",
    "reduce_losses",
    "softmax",
]
