"""Improved precision and recall (Kynkäänniemi et al. 2019) with the semantics of the ADM evaluator.

Each set's manifold is the union of balls around its points, of radius the distance to the k-th nearest
other point of the same set (k = 3). Precision is the fraction of samples inside the reference manifold,
recall the fraction of reference points inside the sample manifold; a point on a ball's boundary is inside.
Distances are computed block by block (batch_size × batch_size), so memory stays bounded for 50k × 10k sets.
"""

import torch
from torch import Tensor


def _blocks(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def manifold_radii(features: Tensor, k: int = 3, batch_size: int = 4096) -> Tensor:
    """(N, d) features → (N,) distance of each point to its k-th nearest neighbour in the set (itself excluded)."""
    if features.shape[0] <= k:
        raise ValueError(
            f"A k={k} nearest-neighbour manifold needs more than {k} points, got {features.shape[0]}."
        )
    if batch_size <= k:
        raise ValueError(f"batch_size must exceed k={k}, got {batch_size}.")
    radii = []
    for rows in _blocks(features.shape[0], batch_size):
        nearest = (
            None  # (rows, k + 1) smallest distances so far; the point itself is among them at distance 0
        )
        for cols in _blocks(features.shape[0], batch_size):
            d = torch.cdist(features[rows], features[cols])
            d = d if nearest is None else torch.cat([nearest, d], dim=1)
            nearest = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, batch_size: int = 4096) -> tuple[float, float]:
    """Precision and recall of samples `fake` (M, d) against reference `real` (N, d) features."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"Expected (N, d) and (M, d) features, got {tuple(real.shape)} and {tuple(fake.shape)}."
        )
    real_radii, fake_radii = manifold_radii(real, k, batch_size), manifold_radii(fake, k, batch_size)
    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=real.device)
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=fake.device)
    for rows in _blocks(real.shape[0], batch_size):
        for cols in _blocks(fake.shape[0], batch_size):
            d = torch.cdist(real[rows], fake[cols])
            real_in[rows] |= (d <= fake_radii[cols]).any(dim=1)
            fake_in[cols] |= (d <= real_radii[rows, None]).any(dim=0)
    return fake_in.float().mean().item(), real_in.float().mean().item()
