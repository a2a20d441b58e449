"""The stochastic-interpolant objective of SiT (Ma et al. 2024), beside the paper's DDPM.

Time convention (SiT's code): t ∈ [0, 1] with **t = 0 the noise and t = 1 the data**,

    x_t = α_t·x1 + σ_t·ε,   ε ~ N(0, I),   α_0 = σ_1 = 0,  α_1 = σ_0 = 1,

and the model is called with t itself (a float in [0, 1], no ×1000). Paths (`@register_path`):
linear α_t = t, σ_t = 1 − t; GVP α_t = sin(πt/2), σ_t = cos(πt/2). The model predicts (`predict`)
- velocity: v = α'_t·x1 + σ'_t·ε (SiT's default; the probability-flow ODE dx/dt = v runs noise → data),
- noise: ε, or
- score: ∇ log p_t(x) = −ε/σ_t (trained as σ_t·s + ε → 0).
Every prediction converts to the velocity and the score given x_t, which is all the samplers need
(`ditlab.diffusion.sampling`: Euler, Heun, dopri5, Euler–Maruyama). With a `learn_sigma` DiT the second
half of the output channels is unused, as in SiT (the final layer keeps the paper's width).
"""

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ditlab.registry import Registry

PREDICTIONS = ("velocity", "noise", "score")
TIME_SAMPLINGS = ("uniform", "logit_normal")
ModelFn = Callable[..., Tensor]


class InterpolantPath:
    """α_t, σ_t and their derivatives in t, as tensors of t's shape and dtype."""

    name = ""

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(α_t, σ_t, dα/dt, dσ/dt)."""
        raise NotImplementedError


PATHS: Registry[type[InterpolantPath]] = Registry("path")
register_path = PATHS.register  # @register_path("name") on an InterpolantPath: `diffusion.path=name`


@register_path("linear")
class LinearPath(InterpolantPath):
    """x_t = t·x1 + (1 − t)·ε: the straight line; its velocity is x1 − ε."""

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)


@register_path("gvp")
class GVPPath(InterpolantPath):
    """Generalised variance-preserving: α_t = sin(πt/2), σ_t = cos(πt/2), so α² + σ² = 1."""

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        half_pi = math.pi / 2
        return (
            torch.sin(half_pi * t),
            torch.cos(half_pi * t),
            half_pi * torch.cos(half_pi * t),
            -half_pi * torch.sin(half_pi * t),
        )


def _expand(value: Tensor, x: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) to broadcast against x (N, C, H, W)."""
    return value.reshape(-1, *([1] * (x.ndim - 1)))


class Interpolant(nn.Module):
    """SiT's objective: `training_losses` like `GaussianDiffusion`'s, plus what the samplers read.

    Args:
        path: a registered path ("linear", "gvp").
        path_module: the module that registers `path` (`@register_path`), imported first: yours, for your own.
        predict: "velocity", "noise" or "score" (what the first C output channels are).
        time_sampling: training t "uniform" on [t0, t1], or "logit_normal" (t = sigmoid(n),
            n ~ N(logit_mean, logit_std²), mapped onto [t0, t1]; LightningDiT's, SD3's).
        train_eps, sample_eps: the ends kept away from t = 0 and 1 where a prediction is singular;
            None: SiT's choice (0 for velocity, which is finite everywhere; 1e-3 for noise and score).
        learn_sigma: the DiT outputs 2C channels; the second half is ignored.
    """

    default_sampler = "euler"  # src/sample.py sampler=auto

    def __init__(
        self,
        path: str = "linear",
        predict: str = "velocity",
        time_sampling: str = "uniform",
        *,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        train_eps: float | None = None,
        sample_eps: float | None = None,
        learn_sigma: bool = True,
        path_module: str | None = None,
    ) -> None:
        super().__init__()
        if path_module:
            try:
                importlib.import_module(path_module)
            except ImportError as err:
                raise ValueError(
                    f"diffusion.path_module={path_module} cannot be imported ({err}); put its package on the "
                    "Python path"
                ) from None
        if path not in PATHS:
            raise ValueError(f"diffusion.path={path!r} is unknown; valid: {', '.join(PATHS)}")
        if predict not in PREDICTIONS:
            raise ValueError(f"diffusion.predict={predict!r} is unknown; valid: {', '.join(PREDICTIONS)}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(
                f"diffusion.time_sampling={time_sampling!r} is unknown; valid: {', '.join(TIME_SAMPLINGS)}"
            )
        if logit_std <= 0:
            raise ValueError(f"diffusion.logit_std={logit_std} is out of range: it must be > 0")
        default_eps = 0.0 if predict == "velocity" else 1e-3
        train_eps = default_eps if train_eps is None else train_eps
        sample_eps = default_eps if sample_eps is None else sample_eps
        for key, eps in (("train_eps", train_eps), ("sample_eps", sample_eps)):
            if not 0 <= eps < 0.5:
                raise ValueError(f"diffusion.{key}={eps} is out of range: it must be in [0, 0.5)")
        if predict != "velocity" and min(train_eps, sample_eps) == 0:
            raise ValueError(
                f"diffusion.predict={predict} is singular at t = 0 or 1: set diffusion.train_eps and "
                "diffusion.sample_eps > 0 (SiT: 1e-3)"
            )
        self.path = PATHS[path]()
        self.predict, self.time_sampling = predict, time_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.train_eps, self.sample_eps = train_eps, sample_eps
        self.learn_sigma = learn_sigma

    def extra_repr(self) -> str:
        return f"path={self.path.name!r}, predict={self.predict!r}, time_sampling={self.time_sampling!r}"

    # ---- training -------------------------------------------------------------------------------
    def sample_t(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Training times (N,) float32 in [train_eps, 1 − train_eps]."""
        if self.time_sampling == "uniform":
            u = torch.rand(n, generator=generator, device=device)
        else:
            normal = torch.randn(n, generator=generator, device=device)
            u = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        return self.train_eps + (1 - 2 * self.train_eps) * u

    def interpolate(self, x1: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, the velocity target α'_t·x1 + σ'_t·ε), both like x1."""
        alpha, sigma, d_alpha, d_sigma = (_expand(c, x1) for c in self.path.coefficients(t))
        return alpha * x1 + sigma * noise, d_alpha * x1 + d_sigma * noise

    def training_losses(
        self,
        model_fn: ModelFn,
        x1: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-example `loss` = `mse` (N,): the mean over C·H·W of the squared error of the prediction
        (velocity: out − v; noise: out − ε; score: σ_t·out + ε), for data x1 (N, C, ...)."""
        n = x1.shape[0]
        if t is None:
            t = self.sample_t(n, generator, x1.device)
        if noise is None:
            noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        x_t, velocity = self.interpolate(x1, t, noise)
        out = self._prediction(model_fn(x_t, t, **(model_kwargs or {})), x1)
        if self.predict == "velocity":
            error = out - velocity
        elif self.predict == "noise":
            error = out - noise
        else:
            error = _expand(self.path.coefficients(t)[1], x1) * out + noise
        mse = error.pow(2).flatten(1).mean(1)
        return {"loss": mse, "mse": mse}

    def _prediction(self, out: Tensor, x: Tensor) -> Tensor:
        """The first C channels of the model's output (N, C or 2C, ...)."""
        channels = x.shape[1]
        if out.shape[1] != (2 * channels if self.learn_sigma else channels) or out.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}; with "
                f"learn_sigma={self.learn_sigma} it must return {2 if self.learn_sigma else 1}×{channels} channels"
            )
        return out[:, :channels]

    # ---- sampling -------------------------------------------------------------------------------
    @staticmethod
    def coordinate(spec: Any) -> str:
        """The run's `objective` coordinate for this config: sit_linear, sit_gvp, sit_<your path>."""
        return f"sit_{spec.get('path', 'linear')}"

    def data_fraction(self, t: Tensor) -> Tensor:
        """How far the model's time t (N,) is from the noise towards the data, in [0, 1] (the one time
        convention of guidance intervals): t itself, SiT's t = 0 being the noise and t = 1 the data."""
        return t.to(torch.float64)

    def sample_interval(self, *, sde: bool = False, last_step_size: float = 0.0) -> tuple[float, float]:
        """[t0, t1] a sampler integrates over (SiT's rule): t1 stops short of the data by the SDE's last
        step, t0 by sample_eps where the prediction is singular at the noise end."""
        t0 = self.sample_eps
        t1 = 1 - (last_step_size if sde and last_step_size > 0 else self.sample_eps)
        return t0, t1

    def _coefficients_like(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return tuple(_expand(c, x) for c in self.path.coefficients(t.to(x.dtype)))

    def velocity(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The velocity at (x, t) (t (N,)) from the model's output `out` (N, C or 2C, ...). From a noise or
        score prediction s (ε = −σ·s): v = (α'/α)·x + (α'/α·σ² − σ·σ')·s, singular where α = 0."""
        out = self._prediction(out, x)
        if self.predict == "velocity":
            return out
        alpha, sigma, d_alpha, d_sigma = self._coefficients_like(x, t)
        score = -out / sigma if self.predict == "noise" else out
        return d_alpha / alpha * x + (d_alpha / alpha * sigma**2 - sigma * d_sigma) * score

    def score(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The score ∇ log p_t(x) from the model's output. From a velocity v (eliminating x1 from x and v):
        s = ((α/α')·v − x) / (σ² − (α/α')·σ'·σ), singular where σ = 0 (the data end)."""
        out = self._prediction(out, x)
        alpha, sigma, d_alpha, d_sigma = self._coefficients_like(x, t)
        if self.predict == "velocity":
            ratio = alpha / d_alpha
            return (ratio * out - x) / (sigma**2 - ratio * d_sigma * sigma)
        return -out / sigma if self.predict == "noise" else out

    def diffusion_coefficient(self, t: Tensor, form: str = "sigma", norm: float = 1.0) -> Tensor:
        """w(t) of the SDE dx = (v + w·s) dt + sqrt(2w) dW, which has the ODE's marginals for any w ≥ 0.

        Forms (SiT's): "sigma" w = norm·σ_t (SiT's sampling default), "constant" w = norm,
        "SBDM" w = norm·(α'/α·σ² − σ·σ') (the score-based diffusion model's), "linear" w = norm·(1 − t).
        """
        alpha, sigma, d_alpha, d_sigma = self.path.coefficients(t)
        forms = {
            "sigma": lambda: norm * sigma,
            "constant": lambda: torch.full_like(t, norm),
            "SBDM": lambda: norm * (d_alpha / alpha * sigma**2 - sigma * d_sigma),
            "linear": lambda: norm * (1 - t),
        }
        if form not in forms:
            raise ValueError(f"diffusion form {form!r} is unknown; valid: {', '.join(forms)}")
        return forms[form]()
