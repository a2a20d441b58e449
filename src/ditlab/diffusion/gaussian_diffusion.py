"""Gaussian diffusion: the forward process, the hybrid training objective and the DDPM/DDIM steps (the
loops over them are the sampler registry's, `ditlab.diffusion.sampling`).

The diffusion knows nothing of the model: a model is any callable `model_fn(x_t, t, **model_kwargs)`
returning (N, 2C, H, W) when the variance is learned (first C channels the prediction, last C channels
v ∈ [-1, 1] interpolating the log-variance, "learned range") or (N, C, H, W) with the fixed "small"
posterior variance. All schedule tables are float64 buffers; values gathered from them are cast to the
dtype of the tensor they multiply.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ditlab.diffusion.schedules import space_timesteps

ModelFn = Callable[..., Tensor]
PREDICTIONS = ("epsilon", "x0", "v")
LOSSES = ("hybrid", "mse")
FIXED_VARIANCES = ("large", "small")


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats (broadcasting shapes)."""
    return 0.5 * (
        logvar2 - logvar1 - 1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Φ(x) by the tanh approximation the reference uses (exact telescoping over bins, cheap)."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-probability of data x ∈ [-1, 1] quantised to 256 bins under N(means, e^(2·log_scales)).

    Elementwise, same shape as x. The edge bins take the whole tail; logs are clamped at 1e-12 so
    float32 never yields -inf.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_cdf_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over every dimension but the batch: (N, ...) -> (N,); with `mask`, `masked_mean`."""
    return x.mean(dim=tuple(range(1, x.ndim))) if mask is None else masked_mean(x, mask)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """The mean of x (N, C, ...) over the pixels where `mask` (N, 1, ...) is 1 and every channel, (N,):
    Σ mask·x / Σ mask, the mask broadcast over the channels (masked training's loss on the visible
    patches, `ditlab.training.masking`)."""
    mask = mask.to(x.dtype).expand_as(x).flatten(1)
    return (x.flatten(1) * mask).sum(1) / mask.sum(1)


class GaussianDiffusion(nn.Module):
    """A discrete-time Gaussian diffusion with T = len(betas) steps.

    Args:
        betas: β_1..β_T, shape (T,), in (0, 1]; kept in float64.
        learn_sigma: the model also outputs v for the "learned range" variance; else the variance is
            fixed, by `fixed_variance`.
        fixed_variance: without learn_sigma, "large" (the reference's default, its `sigma_small=False`):
            β_t, with β_1 replaced by β̃_2 at the first step (so that log-variance is finite there, as ADM's
            FIXED_LARGE); or "small": the posterior variance β̃_t (clipped at t = 1 the same way).
        predict: what the first C output channels predict: "epsilon" (the paper), "x0" or "v".
        loss: "hybrid" (L_simple + L_vlb, needs learn_sigma) or "mse" (L_simple, fixed variance);
            None picks the one that matches learn_sigma.
        timestep_map: for a respaced process, the original timestep of each of the T steps, shape (T,);
            the model is always called with these original values.
        original_num_steps: for a respaced process, the number of steps of the original one.

    The tables are non-persistent float64 buffers: they follow `.to(device)` but never a dtype cast
    (see `_apply`), so `model.to(torch.bfloat16)` on a parent module keeps the schedule exact.
    """

    def __init__(
        self,
        betas: Tensor,
        *,
        learn_sigma: bool = True,
        predict: str = "epsilon",
        loss: str | None = None,
        fixed_variance: str = "large",
        timestep_map: Tensor | None = None,
        original_num_steps: int | None = None,
    ) -> None:
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        in_range = betas.device.type == "meta" or bool(((betas > 0) & (betas <= 1)).all())  # meta: no values
        if betas.ndim != 1 or len(betas) < 2 or not in_range:
            raise ValueError(f"betas must be a 1-D tensor of at least 2 values in (0, 1], got {betas}")
        if predict not in PREDICTIONS:
            raise ValueError(f"unknown prediction target {predict!r}; choose one of {PREDICTIONS}")
        loss = loss or ("hybrid" if learn_sigma else "mse")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        if (loss == "hybrid") != learn_sigma:
            # The VLB term (mean detached) only trains the variance; without it a learned variance is
            # never trained, and with a fixed variance it has no gradient at all.
            raise ValueError(
                f"loss={loss!r} does not fit learn_sigma={learn_sigma}: use loss='hybrid' with a learned "
                "variance and loss='mse' with a fixed one"
            )
        if fixed_variance not in FIXED_VARIANCES:
            raise ValueError(f"fixed_variance={fixed_variance!r}; choose one of {FIXED_VARIANCES}")
        self.learn_sigma, self.predict, self.loss = learn_sigma, predict, loss
        self.fixed_variance = fixed_variance

        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([betas.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        tables = {
            "betas": betas,
            "log_betas": betas.log(),
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": posterior_variance,
            # β̃_0 = 0: its log is replaced by log β̃_1, the lower end of the learned range at t = 0.
            "posterior_log_variance_clipped": torch.cat(
                [posterior_variance[1:2], posterior_variance[1:]]
            ).log(),
            # ADM's FIXED_LARGE: β_t, its first value replaced by β̃ of the second step.
            "large_variance": torch.cat([posterior_variance[1:2], betas[1:]]),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)
        if timestep_map is None:
            timestep_map = torch.arange(len(betas), device=betas.device)
        if timestep_map.shape != betas.shape:
            raise ValueError(
                f"timestep_map has shape {tuple(timestep_map.shape)}, betas {tuple(betas.shape)}"
            )
        self.register_buffer("timestep_map", timestep_map.to(betas.device, torch.long), persistent=False)
        self.original_num_steps = len(betas) if original_num_steps is None else original_num_steps

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "GaussianDiffusion":
        # Let device moves through, undo dtype casts: re-copy each table from its float64 original.
        tables = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in tables.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device, old.dtype)
        return self

    default_sampler = "ddpm"  # the paper's evaluation (src/sample.py sampler=auto)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def data_fraction(self, t: Tensor) -> Tensor:
        """How far the model's time t (N,) is from the noise towards the data, in [0, 1] (the one time
        convention of guidance intervals): the model is called with the original timesteps 0 (the data) ..
        T−1 (the noise), so 1 − t/(T−1); with T = 1000, cfg_interval=[0.3, 0.7] guides timesteps 300..699."""
        return 1 - t.to(torch.float64) / (self.original_num_steps - 1)

    def sample_t(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Training timesteps (N,), uniform over the T steps (the paper's)."""
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    def extra_repr(self) -> str:
        variance = "learned range" if self.learn_sigma else f"fixed {self.fixed_variance}"
        return f"num_timesteps={self.num_timesteps}, variance={variance}, predict={self.predict!r}"

    @staticmethod
    def _extract(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """table[t] as x's dtype, shaped (N, 1, ..., 1) to broadcast against x. Gathers on device."""
        return table[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    # Forward process ---------------------------------------------------------------------------------

    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean √ᾱ_t·x0, variance 1−ᾱ_t and log-variance of q(x_t | x0); x0 (N, ...), t (N,)."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = self._extract(1 - self.alphas_cumprod, t, x0)
        log_variance = self._extract((1 - self.alphas_cumprod).log(), t, x0)
        return mean, variance.expand_as(x0), log_variance.expand_as(x0)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x0) = √ᾱ_t·x0 + √(1−ᾱ_t)·noise; x0 and noise (N, ...), t (N,)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance β̃_t and clipped log-variance of q(x_{t-1} | x_t, x0); all (N, ...)."""
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x0
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # Reverse process ---------------------------------------------------------------------------------

    def _xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def _eps_from_xstart(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def _target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the model's first C channels should output for (x0, t, noise)."""
        if self.predict == "epsilon":
            return noise
        if self.predict == "x0":
            return x0
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * noise
            - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def p_mean_variance(
        self,
        model_out: Tensor,
        x_t: Tensor,
        t: Tensor,
        clip_denoised: bool,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from a model output (N, 2C or C, ...) for x_t (N, C, ...) at steps t (N,).

        Returns `mean`, `variance`, `log_variance` and `pred_xstart`, each (N, C, ...). `denoised_fn`
        then `clip_denoised` (clamp to [-1, 1], for pixel data only) are applied to the predicted x0
        before it is turned into the posterior mean.
        """
        self._check_output(model_out, x_t)
        channels = x_t.shape[1]
        if self.learn_sigma:
            model_out, v = model_out.split(channels, dim=1)
            min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._extract(self.log_betas, t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = log_variance.exp()
        elif self.fixed_variance == "large":
            variance = self._extract(self.large_variance, t, x_t).expand_as(x_t)
            log_variance = variance.log()
        else:
            variance = self._extract(self.posterior_variance, t, x_t).expand_as(x_t)
            log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)

        if self.predict == "epsilon":
            pred_xstart = self._xstart_from_eps(x_t, t, model_out)
        elif self.predict == "x0":
            pred_xstart = model_out
        else:
            pred_xstart = (
                self._extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * model_out
            )
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _check_output(self, model_out: Tensor, x: Tensor) -> None:
        expected = (x.shape[0], 2 * x.shape[1] if self.learn_sigma else x.shape[1], *x.shape[2:])
        if model_out.shape != expected:
            raise ValueError(
                f"model output has shape {tuple(model_out.shape)}; expected {expected} for data of shape "
                f"{tuple(x.shape)} with learn_sigma={self.learn_sigma}"
            )

    # Training objective ------------------------------------------------------------------------------

    def vb_terms_bpd(
        self, model_out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, loss_mask: Tensor | None = None
    ) -> Tensor:
        """One term of the variational bound in bits/dim, shape (N,).

        KL(q(x_{t-1} | x_t, x0) ‖ p(x_{t-1} | x_t)) for t > 0; the discretized-Gaussian decoder NLL
        −log p(x0 | x_1) at t = 0 (data in [-1, 1], 256 bins). Per dimension: the mean over C·H·W, or over
        the pixels where `loss_mask` (N, 1, H, W) is 1 (`masked_mean`).
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(model_out, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        return torch.where(t == 0, _mean_flat(nll, loss_mask), _mean_flat(kl, loss_mask)) / math.log(2)

    def training_losses(
        self,
        model_fn: ModelFn,
        x0: Tensor,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
        loss_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-example losses for clean data x0 (N, C, ...): `loss`, `mse` and (hybrid) `vb`, each (N,).

        t (N,) defaults to uniform steps and noise to N(0, I), both drawn on x0's device from
        `generator`. `mse` is L_simple, the mean over C·H·W of the squared error of the prediction;
        `vb` is L_vlb with the model mean detached so that it trains only the variance, scaled by
        T/1000 as in ADM so that a respaced process weighs it like the 1000-step one (×1 in the paper).
        `loss_mask` (N, 1, H, W), 1 on the pixels that count (masked training's visible patches): both
        means are taken over those pixels only (`masked_mean`); None: every pixel.
        """
        n = x0.shape[0]
        if t is None:
            t = self.sample_t(n, generator, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        model_out = model_fn(x_t, self.timestep_map[t], **(model_kwargs or {}))
        self._check_output(model_out, x0)
        channels = x0.shape[1]
        terms = {"mse": _mean_flat((self._target(x0, t, noise) - model_out[:, :channels]) ** 2, loss_mask)}
        if self.loss == "hybrid":
            frozen = torch.cat([model_out[:, :channels].detach(), model_out[:, channels:]], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x0, x_t, t, loss_mask) * (self.num_timesteps / 1000)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # Samplers ----------------------------------------------------------------------------------------

    def p_sample(
        self,
        model_fn: ModelFn,
        x: Tensor,
        t: Tensor,
        *,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One ancestral step x_t -> x_{t-1}; returns `sample` and `pred_xstart`, (N, C, ...).

        `noise` (like x) is drawn from `generator` when not given (given: e.g. from per-image generators).
        """
        out = model_fn(x, self.timestep_map[t], **(model_kwargs or {}))
        p = self.p_mean_variance(out, x, t, clip_denoised, denoised_fn)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # No noise at t = 0: the last step returns the mean. A mask, not a branch, to stay sync-free.
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = p["mean"] + nonzero * (0.5 * p["log_variance"]).exp() * noise
        return {"sample": sample, "pred_xstart": p["pred_xstart"]}

    def ddim_sample(
        self,
        model_fn: ModelFn,
        x: Tensor,
        t: Tensor,
        *,
        eta: float = 0.0,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12); η = 0 is deterministic. With η > 0,
        `noise` (like x) is drawn from `generator` when not given."""
        out = model_fn(x, self.timestep_map[t], **(model_kwargs or {}))
        pred_xstart = self.p_mean_variance(out, x, t, clip_denoised, denoised_fn)["pred_xstart"]
        # ε recomputed from the (possibly clipped) x0 so that the step stays consistent with it.
        eps = self._eps_from_xstart(x, t, pred_xstart)
        alpha_bar = self._extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        sample = alpha_bar_prev.sqrt() * pred_xstart + (1 - alpha_bar_prev - sigma**2).sqrt() * eps
        if eta > 0:  # σ is 0 at t = 0 (ᾱ_prev = 1), so the last step adds no noise
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            sample = sample + sigma * noise
        return {"sample": sample, "pred_xstart": pred_xstart}

    def _check_device(self, device: torch.device | str | None) -> torch.device:
        """The tables' device, after checking that a requested device is the same one."""
        table_device = self.betas.device
        if device is not None:
            device = torch.device(device)
            same_index = (
                device.index is None or table_device.index is None or device.index == table_device.index
            )
            if device.type != table_device.type or not same_index:
                raise ValueError(
                    f"sampling on {device} but the diffusion tables are on {table_device}; "
                    f"move the diffusion first with diffusion.to({str(device)!r})"
                )
        return table_device

    # Respacing ---------------------------------------------------------------------------------------

    def respace(self, section_counts: str | int) -> "GaussianDiffusion":
        """The process that keeps only the steps `space_timesteps(T, section_counts)`, e.g. "250".

        Its betas are recomputed from the kept ᾱ (β_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i-1}}) so that its marginals
        equal the original's at the kept steps; its model calls get the original timesteps.
        """
        kept = torch.tensor(space_timesteps(self.num_timesteps, section_counts), device=self.betas.device)
        alphas_cumprod = self.alphas_cumprod[kept]
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        return GaussianDiffusion(
            1 - alphas_cumprod / alphas_cumprod_prev,
            learn_sigma=self.learn_sigma,
            predict=self.predict,
            loss=self.loss,
            fixed_variance=self.fixed_variance,
            timestep_map=self.timestep_map[kept],
            original_num_steps=self.original_num_steps,
        )
