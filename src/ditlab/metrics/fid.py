"""FID and sFID through torchmetrics' `FrechetInceptionDistance`, with reference statistics kept as N(mu, sigma).

torchmetrics accumulates feature sums and outer products in float64 and computes
    FID = |mu_r - mu_f|² + tr(sigma_r + sigma_f - 2 (sigma_r sigma_f)^½).
sFID is the same distance on the spatial features (see `features.py`). Reference statistics (ADM's `mu`,
`sigma`, `mu_s`, `sigma_s`, or our cached ones) are written into the metric's "real" states, which
`reset_real_features=False` keeps across `reset()`.
"""

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance


class PrecomputedFeatures(nn.Module):
    """Pass-through "feature network" for features computed once and shared by FID, sFID and the others.

    forward: (N, num_features) → the same in float64 (so `compute()` also returns float64).
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"Expected features of shape (N, {self.num_features}), got {tuple(features.shape)}: "
                "the samples' feature network does not match the reference statistics."
            )
        return features.double()


def frechet_metric(
    feature: nn.Module,
    mu: np.ndarray | Tensor | None = None,
    sigma: np.ndarray | Tensor | None = None,
    num_images: int | None = None,
) -> FrechetInceptionDistance:
    """A torchmetrics FID whose real side is N(mu, sigma) when given; `update(x, real=False)` adds samples.

    Args:
        feature: maps what `update` receives to (N, d) features: `InceptionFeatures` for images,
            `PrecomputedFeatures(d)` for features.
        mu, sigma: (d,), (d, d) reference mean and covariance.
        num_images: images behind mu and sigma, if known. It only scales the stored sums: `compute()`
            recovers mu and sigma from them whatever it is (≥ 2).
    """
    metric = FrechetInceptionDistance(feature=feature, reset_real_features=False)
    if mu is None or sigma is None:
        return metric
    mu, sigma = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
    d = metric.real_features_sum.shape[0]
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ValueError(
            f"Reference statistics have shapes {tuple(mu.shape)}, {tuple(sigma.shape)}; expected ({d},) and ({d}, {d})."
        )
    n = max(num_images or 2, 2)
    # Inverse of torchmetrics' compute(): mean = sum / n, cov = (outer_sum - n·mean·meanᵀ) / (n - 1).
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n)
    return metric


def real_gaussian(metric: FrechetInceptionDistance) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d), float64, of the features a metric received with real=True."""
    n = int(metric.real_features_num_samples)
    if n < 2:
        raise ValueError(f"Reference statistics need at least 2 images, got {n}.")
    mu = metric.real_features_sum / n
    sigma = (metric.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()
