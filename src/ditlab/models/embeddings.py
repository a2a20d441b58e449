"""Input embeddings of DiT: patches, 2-D positions (fixed sin-cos, rotary), timesteps and class labels."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ditlab.registry import Registry


class PatchEmbed(nn.Module):
    """Patchify (N, C, H, W) into (N, T, d) tokens, T = (H/p)·(W/p), with a conv of kernel = stride = p."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> torch.Tensor:
    """Fixed MAE-style 2-D sine-cosine position embedding, computed in float64.

    Returns (grid_size², hidden_size) float32, token index = row·grid_size + col. The first half of the
    channels encodes the column index and the second half the row index (as in the reference), each
    half laid out as [sin, cos] over hidden_size/4 frequencies.
    """
    if hidden_size % 4 != 0:
        raise ValueError(f"hidden_size must be divisible by 4 for 2-D sin-cos embeddings, got {hidden_size}")
    omega = 1.0 / 10000 ** (torch.arange(hidden_size // 4, dtype=torch.float64) / (hidden_size / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]  # (T, d/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([embed_1d(col), embed_1d(row)], dim=1).float()


def rope_angles_2d(head_dim: int, grid_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Angles of LightningDiT's 2-D rotary position embedding (EVA-02's VisionRotaryEmbeddingFast), float64.

    Returns (grid_size², head_dim/2), token index = row·grid_size + col: one angle per adjacent channel
    pair (x_2j, x_2j+1) of a head. The pairs of the first half of head_dim turn by row·ω_i, those of the
    second half by col·ω_i, i < head_dim/4, ω_i = 10000^(−2i/(head_dim/2)). A logit q_a·k_b of rotated q
    and k then depends on the positions only through (row_a − row_b, col_a − col_b).
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2-D RoPE needs a head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    omega = 10000.0 ** (-torch.arange(0, half, 2, dtype=torch.float64, device=device) / half)
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    row, col = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([row.reshape(-1, 1) * omega, col.reshape(-1, 1) * omega], dim=1)


@dataclass(frozen=True)
class PositionEmbedding:
    """How token positions enter a DiT; either part may be None.

    `absolute(hidden_size, grid_size) -> (T, d)`: a fixed table added to the patch tokens (the `pos_embed`
    buffer). `rotary(head_dim, grid_size, device) -> (T, head_dim/2)`: angles by which every
    self-attention rotates q and k (see `ditlab.models.blocks.apply_rope`); computed on each forward, in
    float64, rather than kept in a buffer that a bf16 cast would round or a meta-device build leave empty.
    """

    absolute: Callable[[int, int], torch.Tensor] | None = None
    rotary: Callable[[int, int, torch.device | None], torch.Tensor] | None = None


POS_EMBEDS: Registry[PositionEmbedding] = Registry(
    "pos_embed",
    {
        "sincos": PositionEmbedding(absolute=sincos_pos_embed_2d),  # the paper's
        "rope": PositionEmbedding(rotary=rope_angles_2d),
        # LightningDiT's
        "sincos_rope": PositionEmbedding(absolute=sincos_pos_embed_2d, rotary=rope_angles_2d),
    },
)


# register_pos_embed("name", PositionEmbedding(...)): `pos_embed=name`
register_pos_embed = POS_EMBEDS.register


class TimestepEmbedder(nn.Module):
    """Scalar timesteps (N,) -> (N, d): 256 sinusoidal frequencies [cos, sin], then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Frequencies on every call (not a buffer) so that casting the model to bf16 cannot round them;
        # torch.compile folds them into a constant. float32 as the reference computes them, but float64
        # in a float64 model: float32 cos/sin at t ≈ 1000 differ across CPUs by ~1e-5 (MKL's code path
        # depends on the vendor), which a float64 model would otherwise carry into every output.
        dtype = torch.promote_types(torch.float32, self.mlp[0].weight.dtype)
        half = self.frequency_embedding_size // 2
        exponent = torch.arange(half, dtype=dtype, device=t.device) / half
        args = t.to(dtype)[:, None] * torch.exp(-math.log(self.max_period) * exponent)[None]
        t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels (N,) -> (N, d). Row `num_classes` is the null label of classifier-free guidance.

    While training, each label is replaced by the null label with probability `class_dropout_prob`.
    """

    def __init__(self, num_classes: int, hidden_size: int, class_dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.class_dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.class_dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)
