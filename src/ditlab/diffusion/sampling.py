"""Sampling, in one place: (sampler, steps, cfg scale, guidance channels, per-image seeds) → latents.

Training's sample grids, its FID and `src/sample.py` all call `sample`. Image i of a job with seed s draws
from its own generator, seeded s·SEED_STRIDE + i: its label (when drawn), its starting noise and every
step's noise come from it, so image i is the same whatever the batch size or the number of processes
(except for dopri5, whose adaptive steps follow the error of the whole batch, as in SiT).

A sampler is a registered class (`@register_sampler("name")`, from any module) that solves one kind of
objective (`objective`): the paper's `GaussianDiffusion` (ddpm, ddim; dpmsolver++ and unipc, diffusers'
multistep solvers), SiT's `Interpolant` (euler, heun, dopri5, euler_maruyama) or `MeanFlow` (meanflow).
`run(objective, model_fn, x, steps, noise, model_kwargs, clip_denoised)` takes the starting noise x to a
sample; `noise()` draws the next per-image noise. For a Gaussian diffusion the
default `run` walks the respaced process of
- `process(diffusion, steps)` (the model is still called with the original timesteps) with
- `step(process, model_fn, x, t, noise, model_kwargs, clip_denoised)`: x_t → x_{t-1}, with `noise` the
  step's noise (None when `stochastic` is False),
so that a new diffusion sampler defines only those two. `Evaluations` counts the network evaluations
(NFE) of any sampler, as the network runs (`sample(..., evaluations=...)`).
"""

import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torchdiffeq
from torch import Tensor

from ditlab.diffusion.gaussian_diffusion import GaussianDiffusion
from ditlab.diffusion.guidance import cfg_model_fn, check_cfg_interval
from ditlab.diffusion.interpolant import Interpolant, check_time_shift, shift_time
from ditlab.diffusion.meanflow import MeanFlow
from ditlab.registry import Registry, unknown_options

Objective = GaussianDiffusion | Interpolant | MeanFlow

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

    name = ""  # set by @register_sampler
    objective: type = GaussianDiffusion
    stochastic = True
    uses_steps = True  # False: `steps` does not change what it does (an adaptive solver)

    def run(
        self,
        objective: Objective,
        model_fn: ModelFn,
        x: Tensor,
        steps: int,
        noise: Callable[[], Tensor],
        model_kwargs: dict[str, Any],
        clip_denoised: bool = False,
    ) -> Tensor:
        """x (N, C, H, W), the starting noise, → the sample; `steps` as the sampler counts them."""
        objective._check_device(x.device)  # one clear line, not an indexing error inside a step
        process = self.process(objective, steps)
        n = x.shape[0]
        for i in range(process.num_timesteps - 1, -1, -1):
            t = torch.full((n,), i, device=x.device, dtype=torch.long)
            step_noise = noise() if self.stochastic else None  # per image: independent of batching
            x = self.step(process, model_fn, x, t, step_noise, model_kwargs, clip_denoised)
        return x

    def process(self, diffusion: GaussianDiffusion, steps: int) -> GaussianDiffusion:
        raise NotImplementedError

    def check(self, objective: Objective) -> None:
        """ValueError when this sampler, as configured, cannot sample `objective`: called by `check_fits`,
        so before training rather than at the first grid or FID."""

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


SAMPLERS: Registry[type[Sampler]] = Registry("sampler")
# @register_sampler("name") on a Sampler: `sampler=name` (grids, FID, sample.py)
register_sampler = SAMPLERS.register


def get_sampler(name: str, **options: Any) -> Sampler:
    """The registered sampler `name`, built with `options` (e.g. eta for ddim)."""
    cls = SAMPLERS[name]
    unknown, valid = unknown_options(cls, options)
    if unknown:
        raise ValueError(
            f"sampler.options.{unknown[0]}: {', '.join(unknown)} is not an option of sampler {name} "
            f"(its options: {', '.join(valid) or 'none'}); remove it or correct its name"
        )
    return cls(**options)


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


# What ditlab's `GaussianDiffusion.predict` is called in diffusers' schedulers (`prediction_type`).
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}


def _choice(sampler: str, name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        shown = " | ".join(map(str, choices))
        raise ValueError(f"sampler.options.{name}={value}: {sampler} takes {shown}")


class DiffusersMultistep(Sampler):
    """A multistep solver of diffusers (`scheduler_class`) on the paper's diffusion, driven as diffusers'
    `DiTPipeline` drives it (`set_timesteps(steps)`; per timestep: the model, then `step`), with ditlab's
    sampling around it:

    - the scheduler is built from the diffusion's own betas (`trained_betas`) and steps, and its prediction
      (`predict` ε | x0 | v → diffusers' epsilon | sample | v_prediction); for a respaced diffusion its
      timesteps are mapped to the original ones (`timestep_map`);
    - the model is called with the original timesteps 0..T−1 (so that guidance intervals and
      `data_fraction` mean what they mean for DDPM and DDIM); of the learned-range output (2C channels) the
      solver gets the first C, as `DiTPipeline` does. The scheduler's own `variance_type="learned_range"`
      is not used: it keeps the first 3 channels (RGB) whatever C is, and only for ε-prediction;
    - stochastic variants (`sde-dpmsolver++`) take each step's noise from `noise()` (`variance_noise`), so
      image i is the same whatever its batch;
    - `clip_denoised` (pixel space: x0 clipped to [-1, 1] at every step, ADM's) is diffusers'
      `thresholding` at `sample_max_value=1`: its per-image threshold s is clamped to [1, 1], which is
      clipping to [-1, 1] (diffusers applies it to the data-prediction forms: unipc's `predict_x0=false`
      does not clip).

    The solvers run in float32 (diffusers casts the state and ᾱ to float32); one model evaluation per step.
    """

    scheduler_class = ""  # the diffusers class's name (imported when sampling: diffusers is slow to import)
    stochastic = False  # a stochastic variant sets it: its step takes `variance_noise`

    def __init__(self, **scheduler_options: Any) -> None:
        self.options = scheduler_options

    def check(self, objective: GaussianDiffusion) -> None:
        if objective.predict not in DIFFUSERS_PREDICTION:
            raise ValueError(
                f"sampler={self.name} cannot sample a diffusion that predicts {objective.predict}"
            )

    def scheduler(self, diffusion: GaussianDiffusion, clip_denoised: bool = False) -> Any:
        """The diffusers scheduler on `diffusion`'s schedule and prediction, with this sampler's options."""
        import diffusers

        self.check(diffusion)
        options = dict(self.options)
        if clip_denoised:
            options |= {"thresholding": True, "sample_max_value": 1.0}
        return getattr(diffusers, self.scheduler_class)(
            num_train_timesteps=diffusion.num_timesteps,
            trained_betas=diffusion.betas.cpu().numpy(),
            prediction_type=DIFFUSERS_PREDICTION[diffusion.predict],
            **options,
        )

    def run(self, objective, model_fn, x, steps, noise, model_kwargs, clip_denoised=False):
        objective._check_device(x.device)
        if steps > objective.num_timesteps:
            raise ValueError(
                f"steps={steps}: {self.name} takes at most the diffusion's {objective.num_timesteps} steps"
            )
        scheduler = self.scheduler(objective, clip_denoised)
        scheduler.set_timesteps(steps)  # on the CPU: read there without a device sync
        scheduler.set_begin_index(0)  # from the first timestep (no search for it, which repeats would fool)
        original = objective.timestep_map[scheduler.timesteps.to(objective.timestep_map.device)]
        n, channels = x.shape[0], x.shape[1]
        x = x * scheduler.init_noise_sigma
        for i, timestep in enumerate(scheduler.timesteps):
            out = model_fn(scheduler.scale_model_input(x, timestep), original[i].expand(n), **model_kwargs)
            objective._check_output(out, x)
            step_noise = {"variance_noise": noise()} if self.stochastic else {}
            x = scheduler.step(out[:, :channels].to(x.dtype), timestep, x, **step_noise).prev_sample
        return x


@register_sampler("dpmsolver++")
class DPMSolverPP(DiffusersMultistep):
    """DPM-Solver++ (Lu et al. 2022), diffusers' `DPMSolverMultistepScheduler`: multistep, order
    `solver_order` (2 for guided sampling, 3 unguided) in the data-prediction (x0) form;
    `algorithm_type="sde-dpmsolver++"` is its stochastic variant (noise per image). The other options are
    diffusers' (their defaults): `solver_type` midpoint | heun (2nd order), `lower_order_final` (first/
    second order on the last steps below 15 steps), `euler_at_final`, `final_sigmas_type` zero |
    sigma_min, `timestep_spacing` linspace | leading | trailing, `use_karras_sigmas`, `use_lu_lambdas`
    (uniform log-SNR steps), `lambda_min_clipped` (null: none; e.g. -5.1 for the cosine schedule)."""

    scheduler_class = "DPMSolverMultistepScheduler"

    def __init__(
        self,
        solver_order: int = 2,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
        timestep_spacing: str = "linspace",
        use_karras_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        lambda_min_clipped: float | None = None,
    ) -> None:
        name = "dpmsolver++"
        _choice(name, "solver_order", solver_order, (1, 2, 3))
        _choice(name, "algorithm_type", algorithm_type, ("dpmsolver++", "sde-dpmsolver++"))
        _choice(name, "solver_type", solver_type, ("midpoint", "heun"))
        _choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        _choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        if use_karras_sigmas and use_lu_lambdas:
            raise ValueError(f"{name}: use_karras_sigmas and use_lu_lambdas are two step schedules; pick one")
        super().__init__(
            solver_order=solver_order,
            algorithm_type=algorithm_type,
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            euler_at_final=euler_at_final,
            final_sigmas_type=final_sigmas_type,
            timestep_spacing=timestep_spacing,
            use_karras_sigmas=use_karras_sigmas,
            use_lu_lambdas=use_lu_lambdas,
            lambda_min_clipped=-math.inf if lambda_min_clipped is None else lambda_min_clipped,
        )
        self.stochastic = algorithm_type.startswith("sde-")


@register_sampler("unipc")
class UniPC(DiffusersMultistep):
    """UniPC (Zhao et al. 2023), diffusers' `UniPCMultistepScheduler`: a multistep predictor of order
    `solver_order` with the UniC corrector (order + 1), deterministic, one model evaluation per step (the
    corrector reuses the next step's). Options are diffusers' (their defaults): `predict_x0` (data- or
    noise-prediction form), `solver_type` bh1 | bh2 (bh1 for unguided sampling below 10 steps),
    `lower_order_final`, `disable_corrector` (step indices without the corrector, e.g. [0] at large
    guidance), `final_sigmas_type`, `timestep_spacing`, `use_karras_sigmas`."""

    scheduler_class = "UniPCMultistepScheduler"

    def __init__(
        self,
        solver_order: int = 2,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: Sequence[int] = (),
        final_sigmas_type: str = "zero",
        timestep_spacing: str = "linspace",
        use_karras_sigmas: bool = False,
    ) -> None:
        name = "unipc"
        if not isinstance(solver_order, int) or isinstance(solver_order, bool) or solver_order < 1:
            raise ValueError(f"sampler.options.solver_order={solver_order}: unipc takes an integer ≥ 1")
        _choice(name, "solver_type", solver_type, ("bh1", "bh2"))
        _choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        _choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        if (
            isinstance(disable_corrector, str)
            or not isinstance(disable_corrector, Sequence)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in disable_corrector)
        ):
            raise ValueError(
                f"sampler.options.disable_corrector={disable_corrector!r}: unipc takes a list of step indices "
                "≥ 0, e.g. [0]"
            )
        if not predict_x0 and final_sigmas_type == "zero":  # diffusers' last step divides by σ = 0: NaN
            raise ValueError(
                "sampler.options.predict_x0=false: unipc's noise-prediction form cannot step to σ = 0; set "
                "sampler.options.final_sigmas_type=sigma_min, or predict_x0=true"
            )
        super().__init__(
            solver_order=solver_order,
            predict_x0=predict_x0,
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            disable_corrector=list(disable_corrector),
            final_sigmas_type=final_sigmas_type,
            timestep_spacing=timestep_spacing,
            use_karras_sigmas=use_karras_sigmas,
        )


class FlowSampler(Sampler):
    """A sampler of SiT's interpolant: integrates from the noise (t0 ≈ 0) to the data (t1 ≈ 1)."""

    objective = Interpolant
    stochastic = False

    def velocity_field(
        self, objective: Interpolant, model_fn: ModelFn, model_kwargs: dict[str, Any]
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """f(t, x) = v(x, t) for a scalar time t."""

        def f(t: Tensor, x: Tensor) -> Tensor:
            t_batch = t.to(x.dtype).expand(x.shape[0])
            return objective.velocity(model_fn(x, t_batch, **model_kwargs), x, t_batch)

        return f


def time_grid(
    t0: float, t1: float, steps: int, time_shift: float = 1.0, device: torch.device | str | None = None
) -> Tensor:
    """`steps` + 1 float64 times from t0 to t1: equal steps, or with SD3's shift s (`shift_time`) of the
    fraction of the way, t0 + (t1 − t0)·shift_time(i/steps, s), so that the ends stay and s > 1 takes
    smaller steps near the noise (t0) and larger ones near the data. s = 1: torch.linspace, as before."""
    if time_shift == 1:
        return torch.linspace(t0, t1, steps + 1, device=device, dtype=torch.float64)
    fraction = torch.linspace(0, 1, steps + 1, device=device, dtype=torch.float64)
    return t0 + (t1 - t0) * shift_time(fraction, time_shift)


class FixedStepODE(FlowSampler):
    """The probability-flow ODE dx/dt = v(x, t) on `steps` steps of [t0, t1] (torchdiffeq): equal ones, or
    shifted towards the noise by `time_shift` (SD3's s; `time_grid`)."""

    method = ""

    def __init__(self, time_shift: float = 1.0) -> None:
        check_time_shift(time_shift, f"sampler.options.time_shift ({self.name})")
        self.time_shift = time_shift

    def run(self, objective, model_fn, x, steps, noise, model_kwargs, clip_denoised=False):
        t0, t1 = objective.sample_interval()
        grid = time_grid(t0, t1, steps, self.time_shift, x.device).to(x.dtype)
        f = self.velocity_field(objective, model_fn, model_kwargs)
        # Steps on `grid`, states kept only at its ends (not one per step).
        options = {"grid_constructor": lambda *_: grid}
        return torchdiffeq.odeint(f, x, grid[[0, -1]], method=self.method, options=options)[-1]


@register_sampler("euler")
class EulerODE(FixedStepODE):
    """Euler: x ← x + h·v(x, t); one model evaluation per step."""

    method = "euler"


@register_sampler("heun")
class HeunODE(FixedStepODE):
    """Heun (explicit trapezoid): two model evaluations per step, second-order accurate."""

    method = "heun2"


@register_sampler("dopri5")
class Dopri5ODE(FlowSampler):
    """The adaptive Dormand–Prince 5(4) solver on [t0, t1] (SiT's ODE default: atol 1e-6, rtol 1e-3);
    `steps` is ignored, the number of evaluations follows the tolerances."""

    uses_steps = False

    def __init__(self, atol: float = 1e-6, rtol: float = 1e-3) -> None:
        if atol <= 0 or rtol <= 0:
            raise ValueError(f"dopri5 tolerances atol={atol}, rtol={rtol} must be > 0")
        self.atol, self.rtol = atol, rtol

    def run(self, objective, model_fn, x, steps, noise, model_kwargs, clip_denoised=False):
        t0, t1 = objective.sample_interval()
        ends = torch.tensor([t0, t1], device=x.device, dtype=x.dtype)
        f = self.velocity_field(objective, model_fn, model_kwargs)
        return torchdiffeq.odeint(f, x, ends, method="dopri5", atol=self.atol, rtol=self.rtol)[-1]


@register_sampler("euler_maruyama")
class EulerMaruyamaSDE(FlowSampler):
    """The SDE dx = (v + w·s) dt + sqrt(2w) dW, which has the ODE's marginals, by Euler–Maruyama on
    `steps` equal steps of [t0, 1 − last_step_size] (shifted towards the noise by `time_shift`, SD3's s:
    `time_grid`), then SiT's "Mean" last step x + h·(v + w·s) without noise (h = last_step_size): steps + 1
    model evaluations. w(t) by `diffusion_form` and `diffusion_norm` (`Interpolant.diffusion_coefficient`;
    SiT's sampling defaults: sigma, 1, h = 0.04)."""

    stochastic = True

    def __init__(
        self,
        diffusion_form: str = "sigma",
        diffusion_norm: float = 1.0,
        last_step_size: float = 0.04,
        time_shift: float = 1.0,
    ) -> None:
        check_time_shift(time_shift, "sampler.options.time_shift (euler_maruyama)")
        self.time_shift = time_shift
        if not 0 <= last_step_size < 1 or diffusion_norm < 0:
            raise ValueError(
                f"euler_maruyama: last_step_size={last_step_size} must be in [0, 1) and "
                f"diffusion_norm={diffusion_norm} ≥ 0"
            )
        self.form, self.norm, self.last_step_size = diffusion_form, diffusion_norm, last_step_size

    def check(self, objective: Interpolant) -> None:
        t0, _ = objective.sample_interval(sde=True, last_step_size=self.last_step_size)
        w = objective.diffusion_coefficient(torch.tensor([t0], dtype=torch.float64), self.form, self.norm)
        if not bool(torch.isfinite(w).all()):
            raise ValueError(
                f"euler_maruyama's {self.form} diffusion coefficient is infinite at the first time "
                f"t={t0:.3g} (diffusion.sample_eps={objective.sample_eps}): set diffusion.sample_eps > 0 "
                "(e.g. 1e-3) or sampler.options.diffusion_form=sigma"
            )

    def drift(self, objective: Interpolant, out: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(v + w·s, w) at (x, t), t (N,)."""
        w = objective.diffusion_coefficient(t, self.form, self.norm)
        if not bool(torch.isfinite(w).all()):
            raise ValueError(
                f"the {self.form} diffusion coefficient is infinite at t={float(t[0]):.3g}: set "
                "diffusion.sample_eps > 0 (e.g. 1e-3) or use diffusion_form=sigma"
            )
        w = w.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return objective.velocity(out, x, t) + w * objective.score(out, x, t), w

    def run(self, objective, model_fn, x, steps, noise, model_kwargs, clip_denoised=False):
        t0, t1 = objective.sample_interval(sde=True, last_step_size=self.last_step_size)
        grid = time_grid(t0, t1, steps, self.time_shift)
        n = x.shape[0]
        for t, t_next in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
            dt = t_next - t
            t_batch = torch.full((n,), t, device=x.device, dtype=x.dtype)
            drift, w = self.drift(objective, model_fn(x, t_batch, **model_kwargs), x, t_batch)
            x = x + drift * dt + (2 * w * dt).sqrt() * noise()
        if self.last_step_size > 0:
            t_batch = torch.full((n,), t1, device=x.device, dtype=x.dtype)
            drift, _ = self.drift(objective, model_fn(x, t_batch, **model_kwargs), x, t_batch)
            x = x + drift * self.last_step_size
        return x


@register_sampler("meanflow")
class MeanFlowSampler(Sampler):
    """MeanFlow's sampler (`ditlab.diffusion.meanflow`): `steps` equal steps of [0, 1] from the noise to the
    data, each z_r = z_t + (r − t)·u(z_t, t, r) with one network evaluation (the model called with its
    second time, `r=`); steps=1 is the paper's one-step generation. Deterministic: the only noise is the
    starting one. Classifier-free guidance, where asked, is the plain one on u (`cfg_model_fn`), not the
    paper's guidance trained into the target."""

    objective = MeanFlow
    stochastic = False

    def run(self, objective, model_fn, x, steps, noise, model_kwargs, clip_denoised=False):
        grid = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
        n = x.shape[0]
        for t, r in itertools.pairwise(grid):
            t_batch = torch.full((n,), t, device=x.device, dtype=x.dtype)
            r_batch = torch.full((n,), r, device=x.device, dtype=x.dtype)
            u = model_fn(x, t_batch, r=r_batch, **model_kwargs)
            objective.check_output(u, x)
            x = x + (r - t) * u.to(x.dtype)
        return x


def check_fits(solver: Sampler, objective: Objective, key: str = "sampler") -> None:
    """ValueError, naming the config `key` that chose `solver`, unless it samples `objective`'s kind (a
    Gaussian diffusion, an interpolant or MeanFlow) and, as configured, can sample it (`Sampler.check`)."""
    if not isinstance(objective, solver.objective):
        fitting = [name for name, cls in SAMPLERS.items() if isinstance(objective, cls.objective)]
        raise ValueError(
            f"{key}={solver.name} samples a {solver.objective.__name__}, not this model's objective ("
            f"{type(objective).__name__}): use {key}={' | '.join(fitting)}"
        )
    solver.check(objective)


PRECISIONS = ("fp32", "tf32", "bf16")  # how sample.py runs the model (in training: the trainer's)


@dataclass(frozen=True)
class SamplingSpec:
    """How images are sampled, validated once: taken by the training grids and FID, `DiTModule.sample`,
    `ImageSampler` (sample.py's mass sampler) and `sample`.

    `sampler` (a registered name, or "auto": the objective's own, `resolve`d against it) with its
    `sampler_options`, `steps`, classifier-free guidance `cfg_scale` on the first `guidance_channels` ε
    channels (None: all) within `cfg_interval` (fractions of the way from the noise to the data; None:
    everywhere), the job's `seed` (image i draws from seed·SEED_STRIDE + i) and, for sample.py,
    `precision` (fp32 | tf32 | bf16). `key` is the config prefix its values came from (e.g.
    "callbacks.fid."), so that a bad value names the key the user wrote.

    Autoguidance (`ditlab.diffusion.guidance.cfg_model_fn`): `guide` names the guiding model (its
    checkpoint's path, as the config's `guide.ckpt` gives it; the model itself is `sample`'s `guide=`) and
    `guide_scale` its weight w ≥ 0, within `cfg_interval` too. A scale ≠ 1 without a guide, and a guide
    with scale 1 (which would do nothing), are refused in one line naming `<key>guide.scale` /
    `<key>guide.ckpt`, as the configs spell them.
    """

    sampler: str = "ddim"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] | None = None
    guidance_channels: int | None = None
    seed: int = 0
    precision: str = "fp32"
    guide: str | None = None
    guide_scale: float = 1.0
    key: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        k = self.key
        if self.sampler != "auto" and self.sampler not in SAMPLERS:
            raise ValueError(f"{k}sampler={self.sampler}: unknown; valid: auto, {', '.join(SAMPLERS)}")
        object.__setattr__(self, "sampler_options", dict(self.sampler_options or {}))
        if self.sampler != "auto":
            self.solver()  # a bad option fails here, before any image
        for name, value, low in (("steps", self.steps, 1), ("cfg_scale", self.cfg_scale, 0)):
            if not isinstance(value, int | float) or value < low:
                raise ValueError(f"{k}{name}={value} is out of range: it must be ≥ {low}")
        if self.guidance_channels is not None and self.guidance_channels < 1:
            raise ValueError(f"{k}guidance_channels={self.guidance_channels} must be ≥ 1, or null for all")
        if self.precision not in PRECISIONS:
            raise ValueError(f"{k}precision={self.precision}: unknown; valid: {', '.join(PRECISIONS)}")
        object.__setattr__(
            self, "cfg_interval", check_cfg_interval(self.cfg_interval, key=f"{k}cfg_interval")
        )
        scale = self.guide_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 <= scale < math.inf:
            raise ValueError(f"{k}guide.scale={scale} is out of range: autoguidance's weight must be ≥ 0")
        if self.guide is not None and not isinstance(self.guide, str | os.PathLike):
            raise ValueError(f"{k}guide.ckpt={self.guide!r} must be a checkpoint's path, or null")
        if self.guide is None and scale != 1:
            raise ValueError(
                f"{k}guide.scale={scale:g} needs a guide: set {k}guide.ckpt=<a weaker checkpoint of the same "
                f"objective> (an earlier one of the run, a smaller model's), or {k}guide.scale=1"
            )
        if self.guide is not None and scale == 1:
            raise ValueError(
                f"{k}guide.ckpt={self.guide} with {k}guide.scale=1 does nothing: set {k}guide.scale (e.g. 2), "
                f"or {k}guide.ckpt=null"
            )
        if self.guide is not None:
            object.__setattr__(self, "guide", str(self.guide))

    def solver(self) -> Sampler:
        """The configured sampler (a fresh one: the multistep solvers keep state within a run)."""
        return get_sampler(self.sampler, **self.sampler_options)

    def resolve(self, objective: Objective, in_channels: int | None = None) -> "SamplingSpec":
        """This spec for `objective`: "auto" replaced by the objective's sampler, the sampler checked
        against it (`check_fits`), the guidance channels against the model's `in_channels`."""
        spec = self if self.sampler != "auto" else replace(self, sampler=objective.default_sampler)
        check_fits(spec.solver(), objective, key=f"{self.key}sampler")
        if in_channels is not None and spec.guidance_channels not in (None, *range(1, in_channels + 1)):
            raise ValueError(
                f"{self.key}guidance_channels={spec.guidance_channels} must be in [1, {in_channels}] "
                "(this model's channels), or null for all"
            )
        return spec

    def summary(self) -> str:
        """E.g. "ddim 50 steps, cfg 1.0" (a record's `fid_sampler`), ", guide 2 step_0000500.ckpt" added with a
        guide (its file's name: the runs of several seeds, each guided by its own, compare)."""
        guided = "" if self.guide is None else f", guide {self.guide_scale:g} {os.path.basename(self.guide)}"
        return f"{self.sampler} {self.steps} steps, cfg {self.cfg_scale}{guided}"

    def as_record(self) -> dict[str, Any]:
        """The settings as JSON values (a job's manifest, a record). `guide` and `guide_scale` only with a
        guide: an unguided spec's record is what it was before autoguidance (a sample.py job started then
        resumes)."""
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "key"}
        if self.guide is None:
            del record["guide"], record["guide_scale"]
        return record | {"cfg_interval": None if self.cfg_interval is None else list(self.cfg_interval)}


def guide_options(node: Any, key: str = "guide") -> dict[str, Any]:
    """A config's `guide` node ({ckpt, scale}; None: no guide) as `SamplingSpec`'s `guide` and `guide_scale`;
    ValueError naming `key` for another key in it."""
    node = dict(node or {})
    stray = sorted(set(node) - {"ckpt", "scale"})
    if stray:
        raise ValueError(
            f"{key}.{stray[0]}: not an option of autoguidance's guide; it takes ckpt (the guide's checkpoint) "
            "and scale (its weight)"
        )
    return {"guide": node.get("ckpt"), "guide_scale": node.get("scale", 1.0)}


class Evaluations:
    """The network evaluations sampling cost (NFE), counted as the network runs, for every sampler alike:
    `sample(..., evaluations=e)` adds the rows of every batch the network is given to `rows` and the images
    it made to `images`. `per_image` is the NFE of an FID: a guided step runs the network on the doubled
    batch (conditional and unconditional halves) and counts 2, a step outside the guidance interval or
    without guidance 1; an adaptive solver (dopri5) counts what it took. An autoguided step adds the
    guide's evaluation (a step with the guide alone counts 2, with CFG and the guide 3): one evaluation,
    even where the guide is a smaller network than the model. One counter may serve many batches (an
    FID's), giving their mean."""

    def __init__(self) -> None:
        self.rows = 0  # batch rows the network evaluated
        self.images = 0  # images sampled

    def count(self, model: ModelFn) -> ModelFn:
        """`model`, counting the rows of its input."""

        def counted(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            self.rows += x.shape[0]
            return model(x, *args, **kwargs)

        return counted

    @property
    def per_image(self) -> float | None:
        """Network evaluations per image (None before any image)."""
        return self.rows / self.images if self.images else None


@torch.no_grad()
def sample(
    model: ModelFn,
    diffusion: Objective,
    generators: list[torch.Generator],
    shape: tuple[int, int, int],
    spec: SamplingSpec,
    *,
    labels: Tensor | None = None,
    num_classes: int | None = None,
    clip_denoised: bool = False,
    evaluations: Evaluations | None = None,
    guide: ModelFn | None = None,
) -> tuple[Tensor, Tensor]:
    """Latents (N, C, H, W) of `shape` (C, H, W) and their labels (N,), one image per generator, as `spec`
    says (its `seed` and `precision` are the caller's: they chose the generators and the model's dtype).

    `model(x, t, y)` is the class-conditional network (its null label is `num_classes`). Labels are
    `labels`, or drawn uniformly from [0, num_classes) with each image's generator (before its noise).
    The result is on the generators' device. `evaluations` (an `Evaluations`) counts the network's
    evaluations, the guide's among them. `guide(x, t, y)` is the loaded guide of autoguidance that
    `spec.guide` names (in the model's precision, on its device): needed exactly when `spec.guide` is set.
    """
    if num_classes is None:
        num_classes = getattr(model, "num_classes", None)
    spec = spec.resolve(diffusion)
    if guide is None and spec.guide is not None:
        raise ValueError(f"{spec.key}guide.ckpt={spec.guide}: the guide model was not given (guide=)")
    if guide is not None and spec.guide is None:
        raise ValueError(f"a guide model was given, but {spec.key}guide.ckpt is null: name it in the spec")
    solver = spec.solver()
    device = generators[0].device
    if labels is None:
        labels = torch.cat([torch.randint(num_classes, (1,), generator=g, device=device) for g in generators])
    count = (lambda net: net) if evaluations is None else evaluations.count
    model_fn = cfg_model_fn(
        count(model),
        spec.cfg_scale,
        null_class=num_classes,
        guidance_channels=spec.guidance_channels,
        interval=spec.cfg_interval,
        data_fraction=diffusion.data_fraction,
        guide=None if guide is None else count(guide),
        guide_scale=spec.guide_scale,
    )
    x = _randn(generators, shape)
    x = solver.run(
        diffusion, model_fn, x, spec.steps, lambda: _randn(generators, shape), {"y": labels}, clip_denoised
    )
    if evaluations is not None:
        evaluations.images += x.shape[0]
    return x, labels
