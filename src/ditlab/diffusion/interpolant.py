"""The stochastic-interpolant objective of SiT (Ma et al. 2024), beside the paper's DDPM.

Time convention (SiT's code): t ∈ [0, 1] with **t = 0 the noise and t = 1 the data**,

    x_t = α_t·x1 + σ_t·ε,   ε ~ N(0, I),   α_0 = σ_1 = 0,  α_1 = σ_0 = 1,

and the model is called with t itself (a float in [0, 1], no ×1000). Paths (`@register_path`):
linear α_t = t, σ_t = 1 − t; GVP α_t = sin(πt/2), σ_t = cos(πt/2). The model predicts (`predict`)
- velocity: v = α'_t·x1 + σ'_t·ε (SiT's default; the probability-flow ODE dx/dt = v runs noise → data),
- noise: ε, or
- score: ∇ log p_t(x) = −ε/σ_t (trained as σ_t·s + ε → 0), or
- data: the clean image x1 itself (JiT, Li & He 2025), trained by default in velocity space as JiT:
  v̂ = ((α'σ − ασ')·x̂ + σ'·x_t) / max(σ_t, clip_sigma), against the same conversion of x1, i.e. the
  x-error weighted by ((α'σ − ασ')/max(σ_t, clip_sigma))²; on the linear path that is JiT's
  (x̂ − x_t)/max(1 − t, 0.05) (JiT's t_eps = 0.05). The division is by σ_t, which vanishes at the
  *data* end t = 1 (JiT uses this convention too: z_t = t·x + (1 − t)·ε), so the clip acts only there,
  for σ_t < clip_sigma (t > 0.95 on the linear path).
`loss` picks the space of the error for any prediction: None (the prediction's own; JiT's velocity
loss for data), "velocity" (v̂ − v) or "x" (x̂ − x1, plain MSE on the clean image).
Every prediction converts to the velocity, the score and the clean image given x_t, which is all the
samplers need (`ditlab.diffusion.sampling`: Euler, Heun, dopri5, Euler–Maruyama). With a `learn_sigma` DiT
the second half of the output channels is unused, as in SiT (the final layer keeps the paper's width).

Time shift (SD3, Esser et al. 2024, eq. 23; RAE, Zheng et al. 2025): SD3 writes t_n for the noise fraction
(t_n = 1 the noise) and shifts it as t_n' = s·t_n / (1 + (s − 1)·t_n); with t = 1 − t_n, the fraction of the way
to the data used here, t' = 1 − t_n' = t / (t + s·(1 − t)) (`shift_time`). s > 1 moves times towards the
noise (t' < t), s = 1 is the identity; RAE picks s = sqrt(m / 4096) for data of m dimensions.
`time_shift` shifts the training times; the samplers' `time_shift` option shifts their time grid.
"""

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ditlab.diffusion.gaussian_diffusion import masked_mean
from ditlab.registry import Registry

PREDICTIONS = ("velocity", "noise", "score", "data")
LOSSES = ("velocity", "x")  # the space of the error besides the prediction's own (`loss=None`)
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


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's time shift in this convention (t = 0 the noise, 1 the data): t / (t + s·(1 − t)), monotone
    in t, fixing 0 and 1, towards the noise for s > 1; s = 1 returns t itself (no arithmetic)."""
    if shift == 1:
        return t
    return t / (t + shift * (1 - t))


def check_time_shift(shift: Any, key: str) -> None:
    if isinstance(shift, bool) or not isinstance(shift, int | float) or not 0 < shift < math.inf:
        raise ValueError(f"{key}={shift} is out of range: a time shift must be > 0 (1: none)")


def _expand(value: Tensor, x: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) to broadcast against x (N, C, H, W)."""
    return value.reshape(-1, *([1] * (x.ndim - 1)))


class Interpolant(nn.Module):
    """SiT's objective: `training_losses` like `GaussianDiffusion`'s, plus what the samplers read.

    Args:
        path: a registered path ("linear", "gvp").
        path_module: the module that registers `path` (`@register_path`), imported first: yours, for your own.
        predict: "velocity", "noise", "score" or "data" (what the first C output channels are).
        time_sampling: training t "uniform" on [t0, t1], or "logit_normal" (t = sigmoid(n),
            n ~ N(logit_mean, logit_std²), mapped onto [t0, t1]; LightningDiT's, SD3's).
        time_shift: s of SD3's shift applied to the training times before they are mapped onto
            [t0, t1]: t0 + (t1 − t0)·shift_time(u, s); 1: none (today's times, bit for bit).
        loss: the error's space: None (the prediction's own; velocity for data, JiT's), "velocity", "x".
        clip_sigma: the data prediction's division by σ_t is by max(σ_t, clip_sigma) (JiT's t_eps 0.05).
        train_eps, sample_eps: the ends kept away from t = 0 and 1 where a prediction is singular;
            None: SiT's choice (0 for velocity and data, which are finite everywhere; 1e-3 for noise
            and score).
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
        time_shift: float = 1.0,
        loss: str | None = None,
        clip_sigma: float = 0.05,
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
        check_time_shift(time_shift, "diffusion.time_shift")
        if loss is not None and loss not in LOSSES:
            raise ValueError(
                f"diffusion.loss={loss!r} is unknown; valid: null (the prediction's own), {', '.join(LOSSES)}"
            )
        if not 0 < clip_sigma <= 1:
            raise ValueError(
                f"diffusion.clip_sigma={clip_sigma} is out of range: it must be in (0, 1] (JiT: 0.05)"
            )
        default_eps = 0.0 if predict in ("velocity", "data") else 1e-3
        train_eps = default_eps if train_eps is None else train_eps
        sample_eps = default_eps if sample_eps is None else sample_eps
        for key, eps in (("train_eps", train_eps), ("sample_eps", sample_eps)):
            if not 0 <= eps < 0.5:
                raise ValueError(f"diffusion.{key}={eps} is out of range: it must be in [0, 0.5)")
        if predict in ("noise", "score") and min(train_eps, sample_eps) == 0:
            raise ValueError(
                f"diffusion.predict={predict} is singular at t = 0 or 1: set diffusion.train_eps and "
                "diffusion.sample_eps > 0 (SiT: 1e-3)"
            )
        self.path = PATHS[path]()
        self.predict, self.time_sampling = predict, time_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.time_shift, self.loss, self.clip_sigma = time_shift, loss, clip_sigma
        self.train_eps, self.sample_eps = train_eps, sample_eps
        self.learn_sigma = learn_sigma

    def extra_repr(self) -> str:
        return f"path={self.path.name!r}, predict={self.predict!r}, time_sampling={self.time_sampling!r}"

    # ---- training -------------------------------------------------------------------------------
    def sample_t(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Training times (N,) float32 in [train_eps, 1 − train_eps]: u drawn on [0, 1], shifted
        (`shift_time`), then mapped onto the interval."""
        if self.time_sampling == "uniform":
            u = torch.rand(n, generator=generator, device=device)
        else:
            normal = torch.randn(n, generator=generator, device=device)
            u = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        return self.train_eps + (1 - 2 * self.train_eps) * shift_time(u, self.time_shift)

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
        loss_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-example `loss` = `mse` (N,): the mean over C·H·W of the squared error of the prediction
        (velocity: out − v; noise: out − ε; score: σ_t·out + ε; data: v̂ − v, both by the clipped
        conversion), for data x1 (N, C, ...). `loss="velocity"`: v̂ − v; `loss="x"`: x̂ − x1.
        `loss_mask` (N, 1, H, W), 1 on the pixels that count (masked training's visible patches): the mean
        over those pixels only (`masked_mean`); None: every pixel."""
        n = x1.shape[0]
        if t is None:
            t = self.sample_t(n, generator, x1.device)
        if noise is None:
            noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        x_t, velocity = self.interpolate(x1, t, noise)
        out = self._prediction(model_fn(x_t, t, **(model_kwargs or {})), x1)
        if self.loss == "x":
            error = self._data(out, x_t, t) - x1
        elif self.predict == "data":  # JiT: v̂ − v, both converted from a clean image by the clipped division
            alpha, sigma, d_alpha, d_sigma = self._coefficients_like(x1, t)
            error = (d_alpha * sigma - alpha * d_sigma) / sigma.clamp_min(self.clip_sigma) * (out - x1)
        elif self.loss == "velocity" and self.predict != "velocity":
            error = self._velocity(out, x_t, t) - velocity
        elif self.predict == "velocity":
            error = out - velocity
        elif self.predict == "noise":
            error = out - noise
        else:
            error = _expand(self.path.coefficients(t)[1], x1) * out + noise
        mse = error.pow(2).flatten(1).mean(1) if loss_mask is None else masked_mean(error.pow(2), loss_mask)
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
        score prediction s (ε = −σ·s): v = (α'/α)·x + (α'/α·σ² − σ·σ')·s, singular where α = 0. From a
        clean image x̂ (ε̂ = (x − α·x̂)/σ): v = ((α'σ − ασ')·x̂ + σ'·x) / max(σ, clip_sigma) (JiT's clip)."""
        return self._velocity(self._prediction(out, x), x, t)

    def _velocity(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        if self.predict == "velocity":
            return out
        alpha, sigma, d_alpha, d_sigma = self._coefficients_like(x, t)
        if self.predict == "data":
            return ((d_alpha * sigma - alpha * d_sigma) * out + d_sigma * x) / sigma.clamp_min(
                self.clip_sigma
            )
        score = -out / sigma if self.predict == "noise" else out
        return d_alpha / alpha * x + (d_alpha / alpha * sigma**2 - sigma * d_sigma) * score

    def data_prediction(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The clean image x̂ = E[x1 | x_t = x] from the model's output: from a velocity
        (σ·v − σ'·x) / (α'σ − ασ'); from a noise (x − σ·ε̂)/α; from a score (x + σ²·s)/α (singular where
        α = 0, the noise end); a data prediction as it is."""
        return self._data(self._prediction(out, x), x, t)

    def _data(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        if self.predict == "data":
            return out
        alpha, sigma, d_alpha, d_sigma = self._coefficients_like(x, t)
        if self.predict == "velocity":
            return (sigma * out - d_sigma * x) / (d_alpha * sigma - alpha * d_sigma)
        noise = out if self.predict == "noise" else -sigma * out
        return (x - sigma * noise) / alpha

    def score(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The score ∇ log p_t(x) from the model's output. From a velocity v (eliminating x1 from x and v):
        s = ((α/α')·v − x) / (σ² − (α/α')·σ'·σ), singular where σ = 0 (the data end). From a clean image
        x̂: (α·x̂ − x) / max(σ, clip_sigma)² (JiT's clip)."""
        out = self._prediction(out, x)
        alpha, sigma, d_alpha, d_sigma = self._coefficients_like(x, t)
        if self.predict == "data":
            return (alpha * out - x) / sigma.clamp_min(self.clip_sigma) ** 2
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
