"""How an evaluation chooses its images' class labels: the label protocol recorded with every FID.

- `uniform` (the default; the paper's FID-50K): image i draws its label uniformly from its own generator
  (`ditlab.diffusion.sampling.sample`), so class counts vary by chance.
- `balanced` (equal images per class, as REPA-E reports FID-50K: 50 per class): image i gets class
  i mod K. N images give every class ⌊N/K⌋ images and the first N mod K classes one more, and image i's
  label depends on its index alone, not on N, the batch size or the number of processes, as its seed does.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

LABEL_SAMPLING = ("uniform", "balanced")


def check_label_sampling(value: str, key: str) -> str:
    """`value` if it is a label protocol, else a ValueError in one line naming `key`."""
    if value not in LABEL_SAMPLING:
        raise ValueError(
            f"{key}={value}: unknown label protocol; valid: uniform (drawn per image), balanced (equal images "
            "per class)"
        )
    return value


def balanced_labels(indices: Sequence[int], num_classes: int, device: torch.device | str = "cpu") -> Tensor:
    """Labels (N,) of the images `indices` under the balanced protocol: image i gets class i mod num_classes."""
    if num_classes < 1:
        raise ValueError(f"balanced labels need at least one class, got num_classes={num_classes}")
    return torch.as_tensor(list(indices), dtype=torch.long, device=device) % num_classes


def labels_for(
    protocol: str, indices: Sequence[int], num_classes: int, device: torch.device | str = "cpu"
) -> Tensor | None:
    """The labels of `indices` under `protocol`: None for uniform (each image draws its own as it is
    sampled), `balanced_labels` for balanced."""
    return None if protocol == "uniform" else balanced_labels(indices, num_classes, device)
