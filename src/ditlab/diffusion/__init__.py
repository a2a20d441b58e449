"""The objectives and samplers: the paper's Gaussian diffusion (schedules, DDPM/DDIM), SiT's interpolant
(ODE/SDE samplers) and MeanFlow (one-step sampling), guidance, sampling."""

from collections.abc import Callable
from typing import Any

from ditlab.diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from ditlab.diffusion.guidance import cfg_model_fn
from ditlab.diffusion.interpolant import PATHS, Interpolant, InterpolantPath, register_path
from ditlab.diffusion.meanflow import MeanFlow
from ditlab.diffusion.sampling import (
    SAMPLERS,
    Objective,
    Sampler,
    SamplingSpec,
    get_sampler,
    register_sampler,
    sample,
)
from ditlab.diffusion.schedules import make_betas, space_timesteps
from ditlab.registry import Registry, locate

__all__ = [
    "OBJECTIVES",
    "PAPER_DIFFUSION",
    "PATHS",
    "SAMPLERS",
    "GaussianDiffusion",
    "Interpolant",
    "InterpolantPath",
    "MeanFlow",
    "Objective",
    "Sampler",
    "SamplingSpec",
    "approx_standard_normal_cdf",
    "build_objective",
    "cfg_model_fn",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_sampler",
    "make_betas",
    "normal_kl",
    "objective_builder",
    "objective_name",
    "register_objective",
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


# The objectives, by the name a run's `objective` coordinate takes (conf/diffusion/*.yaml `_target_`s name
# their builders). A user's objective is one `register_objective("name")` in its own module: checkpoints,
# sample.py and export find it through its `_target_` (`objective_builder`). An objective declares its time
# convention by `data_fraction(t)` (0 the noise, 1 the data) and may name its coordinate (`coordinate`).
OBJECTIVES: Registry[Callable[..., Objective]] = Registry(
    "objective", {"ddpm": create_diffusion, "interpolant": Interpolant, "meanflow": MeanFlow}
)
register_objective = OBJECTIVES.register
PAPER_DIFFUSION = "ditlab.diffusion.create_diffusion"  # the `_target_` of the paper's objective


def objective_builder(target: str) -> Callable[..., Objective]:
    """The registered objective builder that the `_target_` `target` names (its module imported first)."""
    builder = locate(target)
    if builder not in OBJECTIVES.values():
        raise ValueError(
            f"diffusion._target_={target} is not a registered objective (registered: "
            f"{', '.join(sorted(OBJECTIVES))}); register it with ditlab.diffusion.register_objective"
        )
    return builder


def objective_name(spec: Any) -> str:
    """The `objective` coordinate of a diffusion config (its `_target_` and arguments): the builder's
    `coordinate(spec)` where it defines one (the interpolant: sit_<path>), else its registered name."""
    builder = objective_builder(spec.get("_target_", PAPER_DIFFUSION))
    if hasattr(builder, "coordinate"):
        return builder.coordinate(spec)
    return next(name for name, entry in OBJECTIVES.items() if entry is builder)


def build_objective(spec: dict[str, Any]) -> Objective:
    """The objective a checkpoint header or a config describes (`ditlab.interop.formats.normalize_diffusion`):
    the registered builder its `_target_` names (the paper's diffusion without one), with the rest as
    arguments."""
    spec = dict(spec)
    return objective_builder(spec.pop("_target_", PAPER_DIFFUSION))(**spec)
