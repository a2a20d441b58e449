"""MeanFlow (Geng, Deng, Bai, Kolter & He 2025, "Mean Flows for One-step Generative Modeling"): the network
learns the average velocity over an interval of time, so that one step (or a few) goes from the noise to
the data.

Time convention: ditlab's interpolant's (`ditlab.diffusion.interpolant`), t ∈ [0, 1] with **t = 0 the noise
and t = 1 the data**, on the linear path z_t = t·x1 + (1 − t)·ε, whose velocity is v = dz_t/dt = x1 − ε.
A step goes from the current time t to a later time r ≥ t (towards the data), and the average velocity
over [t, r] of the probability-flow trajectory through z_t is

    u(z_t, t, r) = 1/(r − t) ∫_t^r v(z_τ, τ) dτ,   so that   z_r = z_t + (r − t)·u(z_t, t, r),

with u(z, t, t) = v(z, t). Differentiating (r − t)·u = ∫_t^r v dτ in t, r held fixed, gives the MeanFlow
identity in this convention:

    u(z_t, t, r) = v(z_t, t) + (r − t)·d/dt u(z_t, t, r),   d/dt u = v·∂_z u + ∂_t u.

The paper writes z_τ = (1 − τ)·x + τ·ε (τ = 1 the noise) and steps from its t down to its r ≤ t. With
τ = 1 − (ditlab's time), the paper's (t, r) are ditlab's (1 − t, 1 − r); its velocity and average velocity
are the negatives of these (ε − x = −v, u_paper = −u); its identity u = v − (t − r)·du/dt is the one above;
and its interval t − r is ditlab's r − t. For data that is a point mass c, u = (c − z_t)/(1 − t) here, the
paper's (z_t − c)/t.

Training (the paper's Algorithm 1): (t, r) drawn as two times of `time_sampling`, the smaller one t (nearer
the noise) and the larger r, and r set to t (an interval of 0: flow matching's target, v) except for a
fraction `fraction_r_neq_t` of the examples; the regression target u_tgt = v + (r − t)·(v·∂_z u_θ + ∂_t u_θ)
under stop-gradient, its total derivative one forward-mode pass of the network (`torch.func.jvp`, tangents
(v, 1, 0) for (z, t, r)); the loss sg(w)·‖u_θ − u_tgt‖² with the paper's adaptive weight
w = 1/(‖Δ‖² + c)^p (‖Δ‖²: the squared L2 norm over C·H·W, as the paper's). The model is given both times:
a DiT built with `second_time=True` (`ditlab.design.DesignPoint.model_arguments` sets it from `second_time`
below) adds an embedding of the interval r − t to its time embedding. Sampling: `sampler=meanflow`
(`ditlab.diffusion.sampling.MeanFlowSampler`).
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ditlab.diffusion.interpolant import TIME_SAMPLINGS, ModelFn, _expand


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def average_velocity_and_derivative(
    u: Callable[[Tensor, Tensor, Tensor], Tensor], z: Tensor, t: Tensor, r: Tensor, v: Tensor
) -> tuple[Tensor, Tensor]:
    """(u(z, t, r), d/dt u(z, t, r) = v·∂_z u + ∂_t u with r held fixed), the second by one forward-mode pass
    of `u` (torch.func.jvp, tangents (v, 1, 0) for (z, t, r)); the first keeps its autograd graph.

    Scaled-dot-product attention runs on its math path here, made of matrix products and a softmax, which
    have forward-mode derivatives: torch 2.14's fused CPU kernel has none (NotImplementedError for
    _scaled_dot_product_flash_attention_for_cpu), nor, as far as PyTorch's derivative table goes, do the
    CUDA flash and memory-efficient kernels (not run on a GPU here), so the math path serves every device."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(u, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))


class MeanFlow(nn.Module):
    """MeanFlow's objective (see the module docstring): `training_losses` like the other objectives',
    `sample_t` drawing (t, r) pairs, and what its sampler reads.

    Args:
        fraction_r_neq_t: the fraction of training examples with an interval r > t (each example's own
            draw); the rest have r = t. The paper's 0.25; 0 is flow matching.
        time_sampling: the distribution of the two times: "logit_normal" (the paper's: sigmoid(n),
            n ~ N(logit_mean, logit_std²)) or "uniform" on [0, 1].
        logit_mean, logit_std: of ditlab's time t (the data fraction); the paper's lognorm(−0.4, 1.0) is of
            its noise fraction 1 − t, i.e. logit_mean = +0.4 here (1 − sigmoid(n) = sigmoid(−n)).
        adaptive_p, adaptive_c: the adaptive weight w = 1/(‖Δ‖² + c)^p (the paper's p = 1, c = 1e-3);
            p = 0 is the plain squared L2 loss.
    """

    default_sampler = "meanflow"  # sampler=auto
    # The model is given the interval's end r too: `DesignPoint.model_arguments` builds the DiT with
    # second_time=True for an objective that says so, as it sets learn_sigma from the objective.
    second_time = True

    def __init__(
        self,
        fraction_r_neq_t: float = 0.25,
        time_sampling: str = "logit_normal",
        *,
        logit_mean: float = 0.4,
        logit_std: float = 1.0,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-3,
    ) -> None:
        super().__init__()
        if not _number(fraction_r_neq_t) or not 0 <= fraction_r_neq_t <= 1:
            raise ValueError(
                f"diffusion.fraction_r_neq_t={fraction_r_neq_t} is out of range: it must be in [0, 1] (the "
                "fraction of examples with r ≠ t; the paper's 0.25, 0 is flow matching)"
            )
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(
                f"diffusion.time_sampling={time_sampling!r} is unknown; valid: {', '.join(TIME_SAMPLINGS)}"
            )
        if not _number(logit_mean):
            raise ValueError(f"diffusion.logit_mean={logit_mean} must be a finite number (the paper's: 0.4)")
        if not _number(logit_std) or logit_std <= 0:
            raise ValueError(f"diffusion.logit_std={logit_std} is out of range: it must be > 0")
        if not _number(adaptive_p) or adaptive_p < 0:
            raise ValueError(
                f"diffusion.adaptive_p={adaptive_p} is out of range: it must be ≥ 0 (the paper's 1; 0: "
                "plain L2)"
            )
        if not _number(adaptive_c) or adaptive_c <= 0:
            raise ValueError(
                f"diffusion.adaptive_c={adaptive_c} is out of range: it must be > 0 (the paper's 1e-3)"
            )
        self.fraction_r_neq_t, self.time_sampling = fraction_r_neq_t, time_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.adaptive_p, self.adaptive_c = adaptive_p, adaptive_c

    def extra_repr(self) -> str:
        return f"fraction_r_neq_t={self.fraction_r_neq_t}, time_sampling={self.time_sampling!r}"

    # ---- training -------------------------------------------------------------------------------
    def sample_t(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Training times (N, 2) float32: column 0 the time t of z_t, column 1 the interval's end r ≥ t.
        One tensor, so that `DiTModule.step_noise` draws and slices both as it does the other objectives'
        times. Each example's r ≠ t with probability `fraction_r_neq_t` (a draw per example rather than the
        first examples of a batch: under DDP every rank's share gets its fraction)."""
        if self.time_sampling == "uniform":
            pair = torch.rand(n, 2, generator=generator, device=device)
        else:
            normal = torch.randn(n, 2, generator=generator, device=device)
            pair = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        t, r = pair.min(dim=1).values, pair.max(dim=1).values
        interval = torch.rand(n, generator=generator, device=device) < self.fraction_r_neq_t
        return torch.stack([t, torch.where(interval, r, t)], dim=1)

    def training_losses(
        self,
        model_fn: ModelFn,
        x1: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-example `loss` sg(w)·‖Δ‖² and `mse` (the mean of Δ² over C·H·W), Δ = u_θ − sg(u_tgt), for
        data x1 (N, C, ...) at times `t` (N, 2: (t, r), as `sample_t` draws them). `model_fn(z, t, r=r,
        **model_kwargs)` returns u_θ (N, C, ...)."""
        if t is None:
            t = self.sample_t(x1.shape[0], generator, x1.device)
        if noise is None:
            noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        times, ends = t[:, 0].to(x1.dtype), t[:, 1].to(x1.dtype)
        z = _expand(times, x1) * x1 + (1 - _expand(times, x1)) * noise
        velocity = x1 - noise
        kwargs = model_kwargs or {}

        def average_velocity(z_t: Tensor, t_: Tensor, r_: Tensor) -> Tensor:
            return model_fn(z_t, t_, r=r_, **kwargs)

        out, derivative = average_velocity_and_derivative(average_velocity, z, times, ends, velocity)
        self.check_output(out, x1)
        target = (velocity + _expand(ends - times, x1) * derivative).detach()
        squared = (out - target).pow(2).flatten(1)
        norm = squared.sum(1)  # ‖Δ‖², the paper's
        weight = (norm.detach() + self.adaptive_c).pow(-self.adaptive_p)
        return {"loss": weight * norm, "mse": squared.mean(1)}

    def check_output(self, out: Tensor, x: Tensor) -> None:
        if out.shape != x.shape:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}: MeanFlow's u has "
                "the input's channels (a DiT with learn_sigma=False and second_time=True, as "
                "diffusion=meanflow builds it)"
            )

    def check_training(self, model: nn.Module, *, repa: bool, loss_terms: Sequence[str]) -> None:
        """ValueError, in one line naming the key, for what cannot train through the JVP (`DiTModule` calls
        it): activation checkpointing (torch.utils.checkpoint has no forward-mode derivative), and REPA and
        the extra loss terms, which read the network's tokens or output by hooks and wrappers that would see
        them inside torch.func.jvp, cut from their gradient."""
        if getattr(model, "gradient_checkpointing", False):
            raise ValueError(
                "model.gradient_checkpointing=true cannot train diffusion=meanflow: torch.utils.checkpoint "
                "has no forward-mode derivative (torch.func.jvp) for its target; set "
                "model.gradient_checkpointing=false"
            )
        if repa:
            raise ValueError(
                "repa cannot train with diffusion=meanflow: its tokens would be caught inside "
                "torch.func.jvp, without their gradient; use repa=none"
            )
        if loss_terms:
            raise ValueError(
                f"loss_terms.{loss_terms[0]} cannot train with diffusion=meanflow: the terms would read the "
                f"network inside torch.func.jvp, without its gradient; set loss_terms.{loss_terms[0]}=0"
            )

    # ---- sampling -------------------------------------------------------------------------------
    def data_fraction(self, t: Tensor) -> Tensor:
        """How far the model's time t (N,) is from the noise towards the data: t itself, as the
        interpolant's (the one time convention of guidance intervals)."""
        return t.to(torch.float64)
