"""Guidance: classifier-free guidance (Ho & Salimans 2022) in one doubled batch, and autoguidance (Karras
et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself") by a weaker model of the same
objective, alone or beside it."""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


def check_cfg_interval(interval: Any, key: str = "cfg_interval") -> tuple[float, float] | None:
    """`interval` as (low, high), or None; ValueError naming `key` unless it is None or [low, high] with
    0 ≤ low ≤ high ≤ 1, in fractions of the way from the noise (0) to the data (1) for every objective
    (`data_fraction` of the paper's diffusion and of the interpolant)."""
    if interval is None:
        return None
    values = (
        list(interval) if isinstance(interval, Sequence) and not isinstance(interval, str) else [interval]
    )
    if not (
        len(values) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        and 0 <= values[0] <= values[1] <= 1
    ):
        shown = ", ".join(f"{v:g}" if isinstance(v, int | float) else repr(v) for v in values)
        raise ValueError(
            f"{key}=[{shown}] must be [low, high] with 0 ≤ low ≤ high ≤ 1: guidance only between these "
            "fractions of the way from the noise (0) to the data (1), or null to guide at every step"
        )
    return float(values[0]), float(values[1])


def cfg_model_fn(
    model: Callable[..., Tensor],
    cfg_scale: float,
    null_class: int,
    guidance_channels: int | None = None,
    interval: tuple[float, float] | None = None,
    data_fraction: Callable[[Tensor], Tensor] | None = None,
    guide: Callable[..., Tensor] | None = None,
    guide_scale: float = 1.0,
) -> Callable[..., Tensor]:
    """Wrap a class-conditional `model(x, t, y)` into a guided one with the same signature. Keyword tensors
    beyond (x, t, y), one row per image (MeanFlow's second time `r`), go to the model and the guide with
    their rows: doubled with the batch for classifier-free guidance.

    Classifier-free guidance: the returned `(x, t, y) -> out` runs the model once on [x, x], [t, t],
    [y, null_class] and returns, for x (N, C, ...), an output of the model's shape (N, C or 2C, ...) whose
    first `guidance_channels` channels are ε_u + s·(ε_c − ε_u) and whose other channels (the remaining ε
    channels and the learned variance) are the conditional half's. `guidance_channels=None` guides all C ε
    channels; 3 is the released DiT checkpoints' evaluation quirk (channels 0..2 of a 4-channel latent).
    `null_class` is the model's null label, i.e. its number of classes. With cfg_scale = 1 the guided
    output is the conditional one, so the model is called once on the plain batch.

    Autoguidance: `guide(x, t, y)` is a weaker model of the same objective (an earlier checkpoint, a
    smaller model), called on the same x, t and class y, and `guide_scale` w its weight. The guided
    channels are then

        ε_c + (s − 1)·(ε_c − ε_u) + (w − 1)·(ε_c − ε_g)

    (ε: the model's output, whatever it predicts: ε, x0, v, the velocity), computed as ε_u + s·(ε_c − ε_u)
    plus (w − 1)·(ε_c − ε_g) with CFG, and as the paper's ε_g + w·(ε_c − ε_g) without (s = 1). Without a
    guide, or with w = 1, it is classifier-free guidance alone, bit for bit. A step with both runs the
    model on the doubled batch and the guide on the plain one.

    `interval` = (low, high) guides only where low ≤ f ≤ high and returns the conditional output
    elsewhere (guidance in a limited interval, Kynkäänniemi et al. 2024; both terms), f the fraction of
    the way from the noise (0) to the data (1): `data_fraction(t)` of the objective (e.g. 1 − t/999 for
    DDPM timesteps), or t itself when None (the interpolant's convention).
    """
    interval = check_cfg_interval(interval)
    autoguided = guide is not None and guide_scale != 1

    def guided(x: Tensor, t: Tensor, y: Tensor, **kwargs: Tensor) -> Tensor:
        f = t if data_fraction is None else data_fraction(t)
        inside = None if interval is None else (f >= interval[0]) & (f <= interval[1])  # (N,)
        if (cfg_scale == 1 and not autoguided) or (inside is not None and not bool(inside.any())):
            return model(x, t, y, **kwargs)
        channels = x.shape[1] if guidance_channels is None else guidance_channels
        if not 1 <= channels <= x.shape[1]:
            raise ValueError(
                f"guidance_channels={guidance_channels} must be in [1, {x.shape[1]}] for this data"
            )
        if cfg_scale != 1:
            doubled = {key: torch.cat([value, value]) for key, value in kwargs.items()}
            null = torch.full_like(y, null_class)
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **doubled)
            cond, uncond = out.chunk(2)
            eps = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
        else:
            cond = model(x, t, y, **kwargs)
        if autoguided:
            weak = guide(x, t, y, **kwargs)[:, :channels].to(cond.dtype)
            if cfg_scale != 1:
                eps = eps + (guide_scale - 1) * (cond[:, :channels] - weak)
            else:
                eps = weak + guide_scale * (cond[:, :channels] - weak)
        out = torch.cat([eps, cond[:, channels:]], dim=1)
        if inside is not None:
            out = torch.where(inside.reshape(-1, *([1] * (out.ndim - 1))), out, cond)
        return out

    return guided
