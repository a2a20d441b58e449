"""The four conditioning blocks of the DiT paper (§3.2), one registry entry each.

A block is a transformer block plus a rule for how the timestep and class embeddings reach it. The rule
is the static method `condition(x, t_emb, y_emb) -> (x, cond)`, called once before the first block:
it may append tokens to x (in-context) and returns the `cond` tensor handed to every block.
Adding a block type is one new registered class here (or in any imported module) and one YAML file in
`conf/block/`.
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

BLOCKS: dict[str, type["DiTBlock"]] = {}


def register_block(name: str) -> Callable[[type["DiTBlock"]], type["DiTBlock"]]:
    """Class decorator that makes a block selectable by `name` (`build_dit(block=name)`, `block=name`)."""

    def register(cls: type["DiTBlock"]) -> type["DiTBlock"]:
        if name in BLOCKS:
            raise ValueError(f"block {name!r} is already registered by {BLOCKS[name].__qualname__}")
        cls.name = name
        BLOCKS[name] = cls
        return cls

    return register


def get_block(name: str) -> type["DiTBlock"]:
    if name not in BLOCKS:
        raise ValueError(f"unknown block {name!r}; valid blocks: {', '.join(sorted(BLOCKS))}")
    return BLOCKS[name]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x (N, T, d) by per-sample shift, scale (N, 1, d)."""
    return x * (1 + scale) + shift


def mlp(hidden_size: int, mlp_ratio: float) -> Mlp:
    """The ViT MLP: Linear(d, 4d), tanh-approximated GELU, Linear(4d, d); keys fc1, fc2."""
    return Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias, through scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, d/heads)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class CrossAttention(nn.Module):
    """Multi-head attention from tokens x (N, T, d) to a context sequence (N, S, d)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.num_heads
        q = self.q(x).view(n, t, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(n, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class DiTBlock(nn.Module):
    """Base class of the conditioning blocks. Subclasses set `forward(x, cond)` and may override
    `condition` (how the embeddings enter) and `initialize_weights` (run after the model's generic
    xavier init)."""

    name: str = ""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()

    @staticmethod
    def condition(
        x: torch.Tensor, t_emb: torch.Tensor, y_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Default: the blocks see c = t_emb + y_emb (N, d)."""
        return x, t_emb + y_emb

    def initialize_weights(self) -> None:
        pass


@register_block("in_context")
class InContextBlock(DiTBlock):
    """A standard ViT block; t and y enter as two extra tokens appended to the sequence (removed
    after the last block by the backbone)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = mlp(hidden_size, mlp_ratio)

    @staticmethod
    def condition(x: torch.Tensor, t_emb: torch.Tensor, y_emb: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.cat([x, t_emb[:, None], y_emb[:, None]], dim=1), None  # (N, T+2, d)

    def forward(self, x: torch.Tensor, cond: None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@register_block("cross_attention")
class CrossAttentionBlock(DiTBlock):
    """A ViT block with multi-head cross-attention to the length-2 sequence [t_emb, y_emb] after the
    self-attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm3 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = mlp(hidden_size, mlp_ratio)

    @staticmethod
    def condition(
        x: torch.Tensor, t_emb: torch.Tensor, y_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.stack([t_emb, y_emb], dim=1)  # context (N, 2, d)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), cond)
        return x + self.mlp(self.norm3(x))


@register_block("adaln")
class AdaLNBlock(DiTBlock):
    """Adaptive LayerNorm: affine-free LayerNorms whose shift and scale are regressed from c."""

    gated = False

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(hidden_size, mlp_ratio)
        num_chunks = 6 if self.gated else 4
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_chunks * hidden_size))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        chunks = self.adaLN_modulation(cond)[:, None].chunk(6 if self.gated else 4, dim=-1)  # each (N, 1, d)
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
            x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        shift_msa, scale_msa, shift_mlp, scale_mlp = chunks
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


@register_block("adaln_zero")
class AdaLNZeroBlock(AdaLNBlock):
    """adaLN plus per-channel gates α before each residual add; the modulation is zero-initialised so
    that every block starts as the identity. Chunk order as the reference: shift_msa, scale_msa,
    gate_msa, shift_mlp, scale_mlp, gate_mlp."""

    gated = True

    def initialize_weights(self) -> None:
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
