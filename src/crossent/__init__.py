"""crossent: the cross-entropy loss and its parts (softmax, log_softmax, logsumexp, NLL).

Exact PyTorch semantics with analytic gradients on NumPy and any Array-API array; numerically stable
where the naive formulas overflow. ``import crossent`` imports NumPy and nothing heavier; the PyTorch
layer is ``crossent.torch``, imported on purpose.
"""

from ._config import config, get_num_threads, set_num_threads, show_config
from ._functional import cross_entropy, cross_entropy_and_grad, log_softmax, logsumexp, nll_loss, softmax
from ._memory import set_buffer_cache
from ._modules import CrossEntropyLoss, LogSoftmax, NLLLoss, Softmax
from ._token_stats import TokenStats, token_stats

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyLoss",
    "LogSoftmax",
    "NLLLoss",
    "Softmax",
    "TokenStats",
    "__version__",
    "config",
    "cross_entropy",
    "cross_entropy_and_grad",
    "get_num_threads",
    "log_softmax",
    "logsumexp",
    "nll_loss",
    "set_buffer_cache",
    "set_num_threads",
    "show_config",
    "softmax",
    "token_stats",
]
