"""Masked training (MaskDiT: Zheng, Nie, Vahdat & Anandkumar 2023, "Fast Training of Diffusion Models with
Masked Transformers"): each training image drops a random fraction of its patch tokens before the DiT's
blocks, and a small decoder restores the full sequence (`ditlab.models.DiT`, `keep=` and `decoder_depth`).

The training loss of a masked step (`DiTModule.training_step`):

    loss = the objective's loss on the visible patches + λ · the reconstruction loss on the masked patches

- The objective's loss on the visible patches: its own loss (DDPM's L_simple + L_vlb, the interpolant's
  error) with every mean over C·H·W taken over the pixels of the visible patches only (`visible_pixels`, the
  objective's `training_losses(loss_mask=...)`), as MaskDiT's per-patch weighting of its denoising loss.
- The reconstruction loss (`reconstruction_loss`, MaskDiT's MAE loss): at each masked patch, the model's
  prediction channels (its first C output channels: ε, v or x̂ at a visible patch) against that patch of
  the network's *noisy input* x_t, normalised to zero mean and unit variance over its p·p·C values (MAE's
  `norm_pix_loss`). The target is MaskDiT's (its code: `mae_loss(net, y + n, D_yn, mask)`): the masked part
  of what the model was given, so the auxiliary task is to inpaint the input from its visible part, the
  same task for every objective. The clean image x0 would need the objective's conversion from x_t, which
  for an ε-prediction divides by √ᾱ_t (×158 at DDPM's t = 999). MaskDiT predicts the target with its
  preconditioned denoiser output D = c_skip·x_t + c_out·F; ditlab's DiT has no preconditioning, so the raw
  output channels predict it.

Masks are drawn per image (a uniformly random subset of round((1 − r)·T) tokens, `draw_keep`) from the
training step's seed (`DiTModule.step_keep`), so runs reproduce and resume exactly. The last
`finetune_steps` steps train unmasked (`Masking.ratio_at`), MaskDiT's unmasked fine-tuning that closes the
gap to sampling, which is always unmasked.
"""

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Masking:
    """A run's masked training: `mask_ratio` r ∈ [0, 1) of each image's tokens dropped (0: off), the
    reconstruction loss's weight `recon_weight` λ (MaskDiT's 0.1) and the unmasked last `finetune_steps`."""

    mask_ratio: float = 0.0
    recon_weight: float = 0.1
    finetune_steps: int = 0

    def ratio_at(self, step: int, max_steps: int) -> float:
        """The mask ratio of training step `step` (0-based) of `max_steps`: r before the last `finetune_steps`
        steps, 0 in them."""
        return self.mask_ratio if step < max_steps - self.finetune_steps else 0.0

    def masked_steps(self, steps: int, max_steps: int) -> int:
        """How many of the first `steps` steps of `max_steps` are masked."""
        return min(steps, max(0, max_steps - self.finetune_steps)) if self.mask_ratio else 0

    def check(self, model: nn.Module, objective: Any, *, repa: bool, loss_terms: Sequence[str]) -> None:
        """ValueError, in one line naming the key, for what masked training cannot do: mask every token,
        train without a decoder to restore them, or train an objective, REPA or an extra loss term that
        reads every token or pixel of the network."""
        key = f"masking.mask_ratio={self.mask_ratio}"
        if num_kept(model.num_patches, self.mask_ratio) < 1:
            raise ValueError(f"{key} keeps none of the {model.num_patches} tokens: lower it")
        if not len(model.decoder_blocks):
            raise ValueError(
                f"{key} needs a decoder to restore the masked tokens: masking.decoder_depth ≥ 1 (null: 2)"
            )
        if "loss_mask" not in inspect.signature(objective.training_losses).parameters:
            raise ValueError(
                f"{key} cannot train {type(objective).__name__}: its loss has no mask of the visible patches "
                "(training_losses(loss_mask=...)); masked training takes diffusion=ddpm, cosine or sit_*"
            )
        if repa:
            raise ValueError(
                f"{key} cannot train with repa: REPA aligns every patch token and the blocks see only the "
                "visible ones; use repa=none"
            )
        if loss_terms:
            raise ValueError(
                f"{key} cannot train with loss_terms.{loss_terms[0]}: the terms read every token or pixel of "
                f"the network; set loss_terms.{loss_terms[0]}=0"
            )


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """The visible tokens of an image of `num_tokens` at `mask_ratio`: round((1 − r)·T) (Python's round)."""
    return round((1 - mask_ratio) * num_tokens)


def draw_keep(
    n: int, num_tokens: int, kept: int, generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """(n, kept) token indices, ascending, each row a uniformly random subset of its own: the first `kept`
    of a random permutation (the argsort of uniform scores, MAE's and MaskDiT's way)."""
    scores = torch.rand(n, num_tokens, generator=generator, device=device)
    return scores.argsort(dim=1)[:, :kept].sort(dim=1).values


def visible_pixels(keep: Tensor, grid: int, patch: int) -> Tensor:
    """(N, 1, H, W): 1 on the pixels of each image's visible patches (`keep` (N, K) of the grid × grid
    tokens, row-major as the patch embedding orders them), 0 on its masked ones."""
    tokens = torch.zeros(keep.shape[0], grid * grid, device=keep.device).scatter(1, keep, 1.0)
    return tokens.view(-1, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def patchify(x: Tensor, patch: int) -> Tensor:
    """(N, C, H, W) -> (N, T, p·p·C), tokens row-major."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def reconstruction_loss(prediction: Tensor, x_t: Tensor, keep: Tensor, patch: int) -> Tensor:
    """MaskDiT's reconstruction loss (N,): over each image's masked patches, the mean squared error of the
    prediction's patch (`prediction` (N, C, H, W), the model's first C output channels) against the same
    patch of the noisy input `x_t`, standardised over its p·p·C values with MaskDiT's unbiased variance
    and ε = 1e-6 (a patch of one value: its only value minus itself, 0)."""
    target = patchify(x_t, patch)
    values = target.shape[-1]
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True, correction=min(1, values - 1))
    error = (patchify(prediction, patch) - (target - mean) / (var + 1e-6).sqrt()).pow(2).mean(-1)  # (N, T)
    masked = torch.ones_like(error).scatter(1, keep, 0.0)
    return (error * masked).sum(1) / masked.sum(1).clamp_min(1)  # no masked patch (r·T < 0.5): 0
