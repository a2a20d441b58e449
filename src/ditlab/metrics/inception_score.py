"""Inception Score with the semantics of the ADM evaluator (and of the original improved-GAN code).

IS = exp(E_x KL(p(y|x) ‖ p(y))), computed on consecutive splits of `split_size` samples (10 splits of 5000
for 50k samples) and averaged. The splits are taken in order, not after a random shuffle as torchmetrics'
`InceptionScore` does, so the score is deterministic and matches the published numbers' protocol.
"""

import torch
from torch import Tensor


def inception_score(logits: Tensor, split_size: int = 5000) -> float:
    """(N, classes) Inception logits (ADM: pool features @ softmax/logits weights, no bias) → Inception Score."""
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"Expected logits of shape (N, classes) with N > 0, got {tuple(logits.shape)}.")
    scores = []
    for part in logits.double().split(split_size):
        log_p = part.log_softmax(dim=1)  # log p(y|x), finite even where p underflows
        log_py = log_p.exp().mean(dim=0).log()  # log p(y) over the split
        kl = (log_p.exp() * (log_p - log_py)).sum(dim=1).mean()
        scores.append(kl.exp())
    return torch.stack(scores).mean().item()
