"""Classifier-free guidance (Ho & Salimans 2022) in one doubled batch."""

from collections.abc import Callable

import torch
from torch import Tensor


def cfg_model_fn(
    model: Callable[[Tensor, Tensor, Tensor], Tensor],
    cfg_scale: float,
    null_class: int,
    guidance_channels: int | None = None,
    interval: tuple[float, float] | None = None,
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Wrap a class-conditional `model(x, t, y)` into a guided one with the same signature.

    The returned `(x, t, y) -> out` runs the model once on [x, x], [t, t], [y, null_class] and returns,
    for x (N, C, ...), an output of the model's shape (N, C or 2C, ...) whose first `guidance_channels`
    channels are ε_u + s·(ε_c − ε_u) and whose other channels (the remaining ε channels and the learned
    variance) are the conditional half's. `guidance_channels=None` guides all C ε channels; 3 is the
    released DiT checkpoints' evaluation quirk (channels 0..2 of a 4-channel latent). `null_class` is
    the model's null label, i.e. its number of classes. With cfg_scale = 1 the guided output is the
    conditional one, so the model is called once on the plain batch.

    `interval` = (low, high) guides only where low ≤ t ≤ high and returns the conditional output
    elsewhere (guidance in a limited interval, Kynkäänniemi et al. 2024), t in the units the model is
    called with: DDPM timesteps 0..999 (0 = data), interpolant times in [0, 1] (1 = data).
    """
    if interval is not None and not interval[0] <= interval[1]:
        raise ValueError(f"cfg_interval={list(interval)} must be [low, high] with low ≤ high")

    def guided(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        inside = None if interval is None else (t >= interval[0]) & (t <= interval[1])  # (N,)
        if cfg_scale == 1 or (inside is not None and not bool(inside.any())):
            return model(x, t, y)
        channels = x.shape[1] if guidance_channels is None else guidance_channels
        if not 1 <= channels <= x.shape[1]:
            raise ValueError(
                f"guidance_channels={guidance_channels} must be in [1, {x.shape[1]}] for this data"
            )
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out.chunk(2)
        eps = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
        out = torch.cat([eps, cond[:, channels:]], dim=1)
        if inside is not None:
            out = torch.where(inside.reshape(-1, *([1] * (out.ndim - 1))), out, cond)
        return out

    return guided
