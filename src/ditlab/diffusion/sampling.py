"""Sampling, in one place: (sampler, steps, cfg scale, guidance channels, per-image seeds) → latents.

Training's sample grids, its FID and `src/sample.py` all call `sample`. Image i of a job with seed s draws
from its own generator, seeded s·SEED_STRIDE + i: its label (when drawn), its starting noise and every
step's noise come from it, so image i is the same whatever the batch size or the number of processes.

A sampler is a registered class (`@register_sampler("name")`, from any module) with
- `process(diffusion, steps)`: the respaced process it walks (the model is still called with the
  original timesteps), and
- `step(process, model_fn, x, t, noise, model_kwargs, clip_denoised)`: x_t → x_{t-1}, with `noise` the
  step's noise (None when `stochastic` is False).
"""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ditlab.diffusion.gaussian_diffusion import GaussianDiffusion
from ditlab.diffusion.guidance import cfg_model_fn

SEED_STRIDE = 1_000_003  # image i of seed s draws from seed s·SEED_STRIDE + i: streams of seeds stay apart
ModelFn = Callable[..., Tensor]


def seeded_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of item `index` of a job (or a training step) with seed `seed`: the one seed rule."""
    return torch.Generator(device).manual_seed(seed * SEED_STRIDE + index)


def image_generators(seed: int, indices: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per image, seeded by the job's seed and the image's global index."""
    return [seeded_generator(seed, i, device) for i in indices]


def _randn(generators: list[torch.Generator], shape: tuple[int, ...]) -> Tensor:
    """(N, *shape) standard normal noise, row i from generators[i]."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators])


class Sampler:
    """A solver of the reverse process; see the module docstring."""

    stochastic = True

    def process(self, diffusion: GaussianDiffusion, steps: int) -> GaussianDiffusion:
        raise NotImplementedError

    def step(
        self,
        process: GaussianDiffusion,
        model_fn: ModelFn,
        x: Tensor,
        t: Tensor,
        noise: Tensor | None,
        model_kwargs: dict[str, Any],
        clip_denoised: bool,
    ) -> Tensor:
        raise NotImplementedError


SAMPLERS: dict[str, type[Sampler]] = {}


def register_sampler(name: str) -> Callable[[type[Sampler]], type[Sampler]]:
    """Class decorator: make a `Sampler` available as `sampler=name` (grids, FID, `src/sample.py`)."""

    def add(cls: type[Sampler]) -> type[Sampler]:
        if name in SAMPLERS and SAMPLERS[name] is not cls:
            raise ValueError(f"sampler {name!r} is already registered by {SAMPLERS[name].__qualname__}")
        SAMPLERS[name] = cls
        return cls

    return add


def get_sampler(name: str, **options: Any) -> Sampler:
    """The registered sampler `name`, built with `options` (e.g. eta for ddim)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    try:
        return SAMPLERS[name](**options)
    except TypeError:
        raise ValueError(f"sampler {name!r} takes no option(s) {', '.join(options)}") from None


@register_sampler("ddpm")
class DDPM(Sampler):
    """Ancestral sampling (no noise at the last step) on `steps` respaced steps (the paper's: 250)."""

    def process(self, diffusion: GaussianDiffusion, steps: int) -> GaussianDiffusion:
        return diffusion.respace(str(steps))

    def step(self, process, model_fn, x, t, noise, model_kwargs, clip_denoised):
        out = process.p_sample(
            model_fn, x, t, model_kwargs=model_kwargs, clip_denoised=clip_denoised, noise=noise
        )
        return out["sample"]


@register_sampler("ddim")
class DDIM(Sampler):
    """DDIM on `steps` evenly strided steps; `eta` = 0 is deterministic."""

    def __init__(self, eta: float = 0.0) -> None:
        if eta < 0:
            raise ValueError(f"eta={eta}: DDIM's noise level must be ≥ 0")
        self.eta = eta
        self.stochastic = eta > 0

    def process(self, diffusion: GaussianDiffusion, steps: int) -> GaussianDiffusion:
        return diffusion.respace(f"ddim{steps}")

    def step(self, process, model_fn, x, t, noise, model_kwargs, clip_denoised):
        out = process.ddim_sample(
            model_fn, x, t, model_kwargs=model_kwargs, clip_denoised=clip_denoised, eta=self.eta, noise=noise
        )
        return out["sample"]


@torch.no_grad()
def sample(
    model: ModelFn,
    diffusion: GaussianDiffusion,
    generators: list[torch.Generator],
    shape: tuple[int, int, int],
    *,
    sampler: str | Sampler = "ddpm",
    steps: int = 250,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    cfg_scale: float = 1.0,
    guidance_channels: int | None = None,
    clip_denoised: bool = False,
) -> tuple[Tensor, Tensor]:
    """Latents (N, C, H, W) of `shape` (C, H, W) and their labels (N,), one image per generator.

    `model(x, t, y)` is the class-conditional network (its null label is `num_classes`); classifier-free
    guidance with `cfg_scale` acts on the first `guidance_channels` ε channels (None: all). Labels are
    `labels`, or drawn uniformly from [0, num_classes) with each image's generator (before its noise).
    The result is on the generators' device.
    """
    if num_classes is None:
        num_classes = getattr(model, "num_classes", None)
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale={cfg_scale} must be ≥ 0 (1: no guidance)")
    if steps < 1:
        raise ValueError(f"steps={steps} must be ≥ 1")
    solver = get_sampler(sampler) if isinstance(sampler, str) else sampler
    process = solver.process(diffusion, steps)
    device = generators[0].device
    if labels is None:
        labels = torch.cat([torch.randint(num_classes, (1,), generator=g, device=device) for g in generators])
    model_fn = cfg_model_fn(model, cfg_scale, null_class=num_classes, guidance_channels=guidance_channels)
    x = _randn(generators, shape)
    for i in range(process.num_timesteps - 1, -1, -1):
        t = torch.full((len(generators),), i, device=device, dtype=torch.long)
        noise = _randn(generators, shape) if solver.stochastic else None  # per image: independent of batching
        x = solver.step(process, model_fn, x, t, noise, {"y": labels}, clip_denoised)
    return x, labels
