"""The published DiT recipe (Peebles & Xie 2022), re-created as the baseline of `experiments/bench.py`.

Built from the reference's definitions alone (its models.py and ADM's diffusion functions, re-derived here):
it imports nothing of ditlab, so the baseline never runs the code it is compared with.

The reference code (facebookresearch/DiT: models.py, train.py, sample.py and the ADM diffusion package)
is not importable here, so this module re-creates what decides its speed, operation for operation:

- the adaLN-Zero DiT with timm's `PatchEmbed` and `Mlp`, and self-attention written out as timm's
  `Attention` of 2022 did: softmax(q·kᵀ·scale)·v as separate kernels, no fused attention;
- the timestep frequencies built on the host and copied to the device in every forward pass; the
  position embedding held as a frozen `nn.Parameter`;
- ADM's Gaussian diffusion as DiT creates it (linear β, ε-prediction, learned-range variance,
  L_simple + L_vlb, the VLB not rescaled): float64 numpy tables, every gather a host-to-device copy of
  the whole table (a copy from pageable memory, which synchronises the stream) broadcast by adding a
  fresh zeros tensor, and the respacing wrapper copying the timestep map to the device on every model
  call, also for the 1000-step training process;
- train.py's step: t drawn per step, noise drawn inside the loss, `torch.optim.AdamW` with default
  arguments, the EMA as a Python loop over named parameters, `loss.item()` every step (its running loss);
- sample.py's classifier-free guidance: the sampler runs on the doubled batch and `forward_with_cfg`
  guides the first three channels.

Not re-created: DDP (one process), data loading and the VAE (the benchmark feeds latents), and the
reference's weight init (weights are loaded from a ditlab DiT, whose adaLN-Zero key names are the
reference's).
"""

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from timm.layers import Mlp, PatchEmbed
from torch import Tensor, nn

# The reference's sizes (its DiT_models table; DiT-Ti is ditlab's CPU size, for small benchmarks):
# name -> (depth, hidden size, heads).
SIZES = {
    "DiT-S": (12, 384, 6),
    "DiT-B": (12, 768, 12),
    "DiT-L": (24, 1024, 16),
    "DiT-XL": (28, 1152, 16),
    "DiT-Ti": (4, 192, 3),
}


def space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """ADM's `space_timesteps`: "ddimN" strides evenly; "a,b,c" keeps a, b, c steps from equal sections,
    each section's steps spread with a fractional stride and rounded."""
    if section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
    counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):  # accumulated, as ADM does (not stride·j: the rounding can differ)
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """ADM's KL divergence between two Gaussians, elementwise (nats)."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """ADM's log-likelihood of x in [-1, 1] under a Gaussian discretised to 8-bit bins."""
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (N, T, d) modulated by shift, scale (N, d)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """timm's `Attention` of 2022 with qkv bias: the attention matrix (N, heads, T, T) is materialised."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(n, t, d)))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_embedding_size // 2
        # Built on the host and copied to t's device on every call, as the reference does.
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: Tensor, train: bool) -> Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        approx_gelu = lambda: nn.GELU(approximate="tanh")  # noqa: E731
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=approx_gelu, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class ReferenceDiT(nn.Module):
    """The reference adaLN-Zero DiT with learned sigma: model(x (N, C, H, W), t (N,), y (N,)) ->
    (N, 2C, H, W). Its state-dict keys are those of `ditlab.models.DiT` with block="adaln_zero"."""

    def __init__(
        self,
        *,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        num_classes: int,
        class_dropout_prob: float = 0.1,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, 2 * in_channels
        self.patch_size, self.num_classes = patch_size, num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def unpatchify(self, x: Tensor) -> Tensor:
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float) -> Tensor:
        """Guided output for a doubled batch x = [z, z], y = [labels, null]: the first three channels of
        both halves are ε_u + s·(ε_c − ε_u), the rest the model's own output."""
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def reference_dit(
    name: str = "DiT-XL/2",
    *,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    depth: int | None = None,
) -> ReferenceDiT:
    """The reference model of a size of its table, e.g. `reference_dit("DiT-S/4")`."""
    size, patch = name.split("/")
    size_depth, hidden_size, num_heads = SIZES[size]
    return ReferenceDiT(
        input_size=input_size,
        patch_size=int(patch),
        in_channels=in_channels,
        hidden_size=hidden_size,
        depth=size_depth if depth is None else depth,
        num_heads=num_heads,
        num_classes=num_classes,
    )


def _mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


class ReferenceDiffusion:
    """ADM's SpacedDiffusion as DiT's `create_diffusion(timestep_respacing)` builds it; "" keeps all
    `diffusion_steps` (the training process), "250" the evaluation sampler's steps."""

    def __init__(self, timestep_respacing: str = "", diffusion_steps: int = 1000):
        scale = 1000 / diffusion_steps
        base_betas = np.linspace(scale * 1e-4, scale * 0.02, diffusion_steps, dtype=np.float64)
        kept = set(space_timesteps(diffusion_steps, timestep_respacing or str(diffusion_steps)))
        last_alpha_bar, betas, self.timestep_map = 1.0, [], []
        for i, alpha_bar in enumerate(np.cumprod(1.0 - base_betas)):
            if i in kept:
                betas.append(1 - alpha_bar / last_alpha_bar)
                last_alpha_bar = alpha_bar
                self.timestep_map.append(i)
        self.betas = betas = np.array(betas)
        self.num_timesteps = len(betas)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
        )

    @staticmethod
    def _extract(table: np.ndarray, t: Tensor, shape: tuple[int, ...]) -> Tensor:
        """table[t] as float32 broadcast to `shape`: the whole table is copied to the device first."""
        out = torch.from_numpy(table).to(device=t.device)[t].float()
        while out.ndim < len(shape):
            out = out[..., None]
        return out + torch.zeros(shape, device=t.device)

    def _wrap(self, model: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """The respacing wrapper: maps step indices to original timesteps, map built on every call."""

        def wrapped(x: Tensor, t: Tensor, **kwargs) -> Tensor:
            return model(x, torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t], **kwargs)

        return wrapped

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
        )

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t.shape) * x0
            + self._extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t.shape)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def p_mean_variance(
        self, model: Callable[..., Tensor], x: Tensor, t: Tensor, model_kwargs: dict
    ) -> dict[str, Tensor]:
        eps, var_values = torch.split(self._wrap(model)(x, t, **model_kwargs), x.shape[1], dim=1)
        min_log = self._extract(self.posterior_log_variance_clipped, t, x.shape)
        max_log = self._extract(np.log(self.betas), t, x.shape)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x.shape) * x
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x.shape) * eps
        )
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance}

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        t: Tensor,
        model_kwargs: dict,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-example `loss` = `mse` + `vb` (N,) for latents x0 (N, C, H, W) at step indices t (N,)."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        eps, var_values = torch.split(self._wrap(model)(x_t, t, **model_kwargs), x0.shape[1], dim=1)
        frozen = torch.cat([eps.detach(), var_values], dim=1)  # the VLB trains only the variance
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(lambda *args, r=frozen: r, x_t, t, {})
        kl = _mean_flat(normal_kl(true_mean, true_log_variance, p["mean"], p["log_variance"])) / np.log(2.0)
        nll = _mean_flat(-discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]))
        vb = torch.where(t == 0, nll / np.log(2.0), kl)
        mse = _mean_flat((noise - eps) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def p_sample_loop_progressive(
        self, model: Callable[..., Tensor], noise: Tensor, model_kwargs: dict
    ) -> Iterator[Tensor]:
        """Ancestral sampling from x_T = noise, yielding every step's sample (no noise at the last)."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.tensor([i] * noise.shape[0], device=noise.device)
            with torch.no_grad():
                p = self.p_mean_variance(model, x, t, model_kwargs)
                nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
                x = p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * torch.randn_like(x)
            yield x  # outside no_grad: the caller's grad mode is left alone between steps


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """train.py's EMA: one mul_ and one add_ per named parameter, in a Python loop."""
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def train_step(
    model: ReferenceDiT,
    ema: ReferenceDiT,
    optimizer: torch.optim.Optimizer,
    diffusion: ReferenceDiffusion,
    x: Tensor,
    y: Tensor,
) -> float:
    """One step of train.py on latents x (N, C, H, W) with labels y (N,); returns the loss."""
    t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
    loss = diffusion.training_losses(model, x, t, {"y": y})["loss"].mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    update_ema(ema, model)
    return loss.item()
