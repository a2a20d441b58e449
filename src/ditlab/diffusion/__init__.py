"""The objectives and samplers: the paper's Gaussian diffusion (schedules, DDPM/DDIM) and SiT's interpolant
(ODE/SDE samplers), guidance, sampling."""

from typing import Any

from ditlab.diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from ditlab.diffusion.guidance import cfg_model_fn
from ditlab.diffusion.interpolant import PATHS, Interpolant, Path, register_path
from ditlab.diffusion.sampling import SAMPLERS, Objective, Sampler, get_sampler, register_sampler, sample
from ditlab.diffusion.schedules import make_betas, space_timesteps

__all__ = [
    "PATHS",
    "SAMPLERS",
    "GaussianDiffusion",
    "Interpolant",
    "Objective",
    "Path",
    "Sampler",
    "approx_standard_normal_cdf",
    "build_objective",
    "cfg_model_fn",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_sampler",
    "make_betas",
    "normal_kl",
    "register_path",
    "register_sampler",
    "sample",
    "space_timesteps",
]


def create_diffusion(
    timestep_respacing: str | int | None = None,
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
    fixed_variance: str = "large",
    predict: str = "epsilon",
    loss: str | None = None,
) -> GaussianDiffusion:
    """The paper's diffusion: `diffusion_steps` steps of `noise_schedule`, `predict`ing ε (or "x0", "v"), learned-range
    variance with the hybrid loss (with L_simple and the fixed `fixed_variance`, "large" as the reference
    or "small", when learn_sigma is False),
    respaced to `timestep_respacing` (e.g. "250" or "ddim50") when given: train with None, sample
    with "250"."""
    diffusion = GaussianDiffusion(
        make_betas(noise_schedule, diffusion_steps),
        learn_sigma=learn_sigma,
        fixed_variance=fixed_variance,
        predict=predict,
        loss=loss,
    )
    if timestep_respacing in (None, ""):
        return diffusion
    return diffusion.respace(timestep_respacing)


def build_objective(spec: dict[str, Any]) -> Objective:
    """The objective a checkpoint header describes (`ditlab.interop.formats.normalize_diffusion`): SiT's
    interpolant when its `_target_` names it, else the paper's diffusion."""
    spec = dict(spec)
    if spec.pop("_target_", "").endswith("Interpolant"):
        return Interpolant(**spec)
    return create_diffusion(**spec)
