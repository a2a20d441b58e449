"""REPA (Yu et al. 2024, "Representation Alignment for Generation"): an auxiliary loss aligning the DiT's
image tokens after block k, through a trained MLP projector, with a frozen pretrained encoder's patch
tokens (DINOv2 ViT-B/14 by default) of the clean image.

    total loss = denoising loss + weight · repa.loss(tokens_k, images).mean()

Cost per training image: the projector's `projector_flops(T)` (forward; ×3 with backward), plus one
forward of the frozen encoder at T patch tokens, without backward: about 2·params·(T + prefix tokens)
plus attention, ≈ 46 GFLOPs per image for ViT-B/14 at 16×16 tokens (measure it with
`torch.utils.flop_counter.FlopCounterMode` around `encoder_features`).
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn

from ditlab.encoders import load_encoder


class REPA(nn.Module):
    """Projector MLP d -> projector_dim -> projector_dim -> z_dim (SiLU between) and the alignment loss.

    `depth` is k, 1-based: the tokens after block k are aligned (None: the paper's 8 of 28, scaled to
    `model_depth`). The encoder is timm's `encoder` with weights from timm's hub source (the Hugging Face
    cache, else downloaded), or from the local `encoder_path` (a .safetensors/.pth/.bin file, or a folder
    holding one; pickles are never executed: safetensors, or torch.load with weights_only), loaded by
    `ditlab.encoders.load_encoder` (FD-DINOv2's loader too); `pretrained=False` leaves it random (tests).

    The encoder is frozen, in eval mode, and not a submodule: it is in neither `parameters()` nor
    `state_dict()` (checkpoints carry only the projector), and neither `.train()` nor `.to()` reach it:
    move it with `encoder_to(device)` (as `DiTModule.on_fit_start` does).
    """

    def __init__(
        self,
        hidden_size: int,
        encoder: str = "vit_base_patch14_dinov2.lvd142m",
        *,
        model_depth: int,
        encoder_path: str | None = None,
        pretrained: bool = True,
        weight: float = 0.5,
        depth: int | None = None,
        projector_dim: int = 2048,
        encoder_kwargs: dict | None = None,
    ):
        super().__init__()
        self.depth = max(1, round(model_depth * 8 / 28)) if depth is None else depth
        if not 1 <= self.depth <= model_depth:
            raise ValueError(
                f"repa.depth must be in [1, {model_depth}] (the model's depth), got {self.depth}"
            )
        enc = load_encoder(
            encoder,
            path=encoder_path,
            pretrained=pretrained,
            key="repa.",
            dynamic_img_size=True,
            **(encoder_kwargs or {}),
        )
        object.__setattr__(self, "encoder", enc)
        self.encoder_name = encoder
        self.weight = weight
        self.z_dim = enc.embed_dim
        self.patch_size: tuple[int, int] = tuple(enc.patch_embed.patch_size)
        data_config = resolve_model_data_config(enc)
        self.register_buffer("mean", torch.tensor(data_config["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_config["std"]).view(1, 3, 1, 1), persistent=False)
        self.projector = nn.Sequential(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, self.z_dim),
        )

    def encoder_to(self, *args: Any, **kwargs: Any) -> "REPA":
        """Move/cast the encoder like `nn.Module.to` (which does not reach it); returns self."""
        self.encoder.to(*args, **kwargs)
        return self

    def check_encodes(self, channels: int, image_size: int, grid: int) -> None:
        """ValueError in one line, before training, unless the encoder takes this data's images
        (`channels` × `image_size`²) at the DiT's `grid` × `grid` tokens: one forward of one blank image."""
        try:
            self.encoder_features(torch.zeros(1, channels, image_size, image_size), grid)
        except (RuntimeError, ValueError, AssertionError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"repa.encoder={self.encoder_name} cannot encode this data's {channels}-channel "
                f"{image_size}px images at the DiT's {grid}×{grid} tokens ({first}); pick an encoder that "
                "takes them (REPA's: vit_base_patch14_dinov2.lvd142m) or repa=none"
            ) from None

    @torch.no_grad()
    def encoder_features(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1], C = 1 (grey) or 3 -> the encoder's normed patch tokens
        (N, grid², z_dim), the input resized (bicubic) so that the encoder's patch grid is grid × grid."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"REPA needs pixel images (N, 1 or 3, H, W) in [-1, 1], got shape {tuple(images.shape)}"
            )
        x = images.expand(-1, 3, -1, -1).to(self.mean.dtype)  # grey -> RGB
        x = ((x + 1) / 2 - self.mean) / self.std  # [-1, 1] -> [0, 1] -> the encoder's normalisation
        x = F.interpolate(x, size=(grid * self.patch_size[0], grid * self.patch_size[1]), mode="bicubic")
        tokens = self.encoder.forward_features(x)  # (N, prefix + grid², z_dim), after the final norm
        return tokens[:, self.encoder.num_prefix_tokens :]

    def loss(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Per-example loss (N,): −mean over tokens of cos(projector(tokens), encoder features), in [−1, 1].

        tokens (N, T, d): the DiT's image tokens (no in-context tokens) after block `depth`, T = grid².
        images (N, C, H, W) in [-1, 1]: the clean images the DiT's input was made from.
        """
        grid = math.isqrt(tokens.shape[1])
        if grid * grid != tokens.shape[1]:
            raise ValueError(f"REPA needs a square token grid, got {tokens.shape[1]} tokens")
        feats = self.encoder_features(images, grid)  # (N, T, z_dim)
        dtype = torch.promote_types(tokens.dtype, torch.float32)  # at least float32 under autocast
        z = F.normalize(self.projector(tokens).to(dtype), dim=-1)  # (N, T, z_dim)
        return -(z * F.normalize(feats.to(dtype), dim=-1)).sum(-1).mean(-1)

    def projector_flops(self, num_tokens: int) -> int:
        """Forward FLOPs of the projector on one image of `num_tokens` tokens, multiply-adds counted as 2."""
        return 2 * num_tokens * sum(m.weight.numel() for m in self.projector if isinstance(m, nn.Linear))
