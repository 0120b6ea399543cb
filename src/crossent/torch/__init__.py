"""crossent for PyTorch: a drop-in ``cross_entropy`` with autograd and ``torch.compile`` support, and
the fused linear + cross-entropy loss for large vocabularies. Import it on purpose:
``import crossent.torch`` (``import crossent`` never imports torch).
"""

from ._backend import use_backend
from ._functional import cross_entropy, nll_loss
from ._linear import linear_cross_entropy
from ._modules import CrossEntropyLoss, LinearCrossEntropyLoss, NLLLoss
from ._token_stats import linear_token_stats, token_stats

__all__ = [
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "NLLLoss",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_token_stats",
    "nll_loss",
    "token_stats",
    "use_backend",
]
