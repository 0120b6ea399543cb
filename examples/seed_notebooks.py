"""The two seed notebooks, step by step, with crossent's stable functions.

Run: python examples/seed_notebooks.py
"""

from __future__ import annotations

import numpy as np

import crossent

# Seed 001: the 5 x 3 logits it printed, and its targets.
x = np.array(
    [
        [-0.9997, 0.9024, 1.5058],
        [1.2295, -1.2791, 0.6434],
        [-1.9006, 1.4064, 1.3669],
        [-0.8453, 0.9917, 0.6591],
        [0.3560, 0.9731, 0.3480],
    ],
    dtype=np.float32,
)
target = np.array([2, 0, 0, 0, 2])

print("loss(x, class) = -x[class] + log(sum_j exp(x[j]))\n")
lse = crossent.logsumexp(x, axis=1)
for n in range(len(x)):
    row_max = x[n].max()
    print(
        f"row {n}: max {row_max:+.4f}  logsumexp {lse[n]:.4f}  -x[{target[n]}] {-x[n, target[n]]:+.4f}"
        f"  loss {lse[n] - x[n, target[n]]:.4f}"
    )
ce = crossent.cross_entropy(x, target)
print(f"\nCrossEntropyLoss(x, target)             = {ce:.4f}")
print(f"NLLLoss(LogSoftmax(x), target)           = {crossent.nll_loss(crossent.log_softmax(x, axis=1), target):.4f}")
print(
    f"CrossEntropyLoss(LogSoftmax(x), target)  = {crossent.cross_entropy(crossent.log_softmax(x, axis=1), target):.4f}"
)

# Seed 000: a segmentation batch, 6 images x 3 classes x 5 x 5 pixels, one label per pixel.
rng = np.random.default_rng(0)
images = rng.standard_normal((6, 3, 5, 5)).astype(np.float32)
labels = rng.integers(0, 3, size=(6, 5, 5))
loop = np.mean(
    [
        -images[b, labels[b, r, c], r, c] + np.log(np.sum(np.exp(images[b, :, r, c])))
        for b in range(6)
        for r in range(5)
        for c in range(5)
    ]
)
print(f"\nsegmentation 6x3x5x5: notebook loops {loop:.4f}, crossent {crossent.cross_entropy(images, labels):.4f}")
try:
    import torch

    reference = torch.nn.functional.cross_entropy(torch.from_numpy(images), torch.from_numpy(labels))
    print(f"                      torch.nn.CrossEntropyLoss {float(reference):.4f}")
except ImportError:
    print("                      (install torch to compare with torch.nn.CrossEntropyLoss)")

# Where the notebooks' naive formula overflows, the max-shifted one does not.
big = np.array([[1e4, 0.0, -1e4]], dtype=np.float32)
with np.errstate(over="ignore", invalid="ignore"):
    naive = -big[0, 1] + np.log(np.exp(big[0]).sum())
stable = crossent.cross_entropy(big, np.array([1]))
print(f"\nlogits [1e4, 0, -1e4], class 1: naive formula {naive}, crossent {stable:.1f}")
