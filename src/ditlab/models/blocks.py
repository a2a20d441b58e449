"""The four conditioning blocks of the DiT paper (§3.2), one registry entry each.

A block is a transformer block plus a rule for how the timestep and class embeddings reach it. The rule
is the static method `condition(x, t_emb, y_emb) -> (x, cond)`, called once before the first block:
it may append tokens to x (in-context) and returns the `cond` tensor handed to every block.
Adding a block type is one new registered class here (or in any imported module) and one YAML file in
`conf/block/`.

The layers inside the blocks are LightningDiT's design axes (Yao et al. 2025), each a registry of its own:
`NORMS` (LayerNorm, RMSNorm), `MLPS` (GELU, SwiGLU), a norm on q and k, and rotary position embeddings
handed to the self-attention at forward time (`ditlab.models.embeddings.POS_EMBEDS`). A block receives
the first three as one `BlockOptions` and the rotary tables as `forward(x, cond, rope)`.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp, SwiGLU
from torch import nn

from ditlab.registry import Registry

BLOCKS: Registry[type["DiTBlock"]] = Registry("block")
# norm(dim, affine) -> module; `affine=False` where the paper's LayerNorm has no parameters (adaLN, final layer).
NORMS: Registry[Callable[[int, bool], nn.Module]] = Registry("norm")
# mlp(hidden_size, mlp_ratio) -> module, (N, T, d) -> (N, T, d).
MLPS: Registry[Callable[[int, float], nn.Module]] = Registry("mlp")
Rope = tuple[torch.Tensor, torch.Tensor]  # cos and sin of the rotary angles, each (L, head_dim/2)


register_block = BLOCKS.register  # @register_block("name") on a DiTBlock subclass: `block=name`
register_norm = NORMS.register  # @register_norm("name") on norm(dim, affine): `norm=name`
register_mlp = MLPS.register  # @register_mlp("name") on mlp(hidden_size, mlp_ratio): `mlp=name`


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x (N, T, d) by per-sample shift, scale (N, 1, d)."""
    return x * (1 + scale) + shift


@register_norm("layernorm")
def layer_norm(dim: int, affine: bool = True) -> nn.LayerNorm:
    """The paper's LayerNorm, eps 1e-6 (also on q and k, where timm's default would be 1e-5)."""
    return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)


@register_norm("rmsnorm")
def rms_norm(dim: int, affine: bool = True) -> nn.RMSNorm:
    """x / sqrt(mean(x²) + 1e-6) · weight. The weight (ones at init) is there even where `affine=False`:
    LightningDiT keeps it in its adaLN blocks and final layer, where it multiplies the adaLN scale."""
    return nn.RMSNorm(dim, eps=1e-6)


@register_mlp("gelu")
def mlp(hidden_size: int, mlp_ratio: float) -> Mlp:
    """The ViT MLP: Linear(d, 4d), tanh-approximated GELU, Linear(4d, d); keys fc1, fc2."""
    return Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))


@register_mlp("swiglu")
def swiglu(hidden_size: int, mlp_ratio: float) -> SwiGLU:
    """SiLU(fc1_g(x)) · fc1_x(x), then fc2. Hidden width 2/3 of the GELU MLP's, LightningDiT's
    int(2/3 · int(mlp_ratio · d)) (here in integer arithmetic), so that its three matrices hold about the
    parameters of the GELU MLP's two: 3·d·h ≈ 8·d² at ratio 4 (exactly when 3 divides d)."""
    return SwiGLU(hidden_size, 2 * int(hidden_size * mlp_ratio) // 3)


@dataclass(frozen=True)
class BlockOptions:
    """The layer choices inside a block; the defaults are the DiT paper's. `qk_norm`: an affine `norm` over
    head_dim on each head's q and k (self- and cross-attention), as LightningDiT."""

    norm: str = "layernorm"
    mlp: str = "gelu"
    qk_norm: bool = False

    def __post_init__(self) -> None:
        _ = NORMS[self.norm], MLPS[self.mlp]  # an unknown name fails here, in one line

    def make_norm(self, dim: int, affine: bool = True) -> nn.Module:
        return NORMS[self.norm](dim, affine)

    def make_mlp(self, hidden_size: int, mlp_ratio: float) -> nn.Module:
        return MLPS[self.mlp](hidden_size, mlp_ratio)

    def make_qk_norms(self, head_dim: int) -> tuple[nn.Module, nn.Module]:
        if not self.qk_norm:
            return nn.Identity(), nn.Identity()
        return self.make_norm(head_dim), self.make_norm(head_dim)


PAPER_OPTIONS = BlockOptions()


def takes_options(block_cls: type["DiTBlock"]) -> tuple[bool, bool]:
    """Whether a block's __init__ takes `options` and its forward `rope`: blocks written before these
    existed (a user's plugin) are built and called as before, and can only be used with the paper's layers."""
    return (
        "options" in inspect.signature(block_cls).parameters,
        "rope" in inspect.signature(block_cls.forward).parameters,
    )


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate each adjacent channel pair (x_2j, x_2j+1) of x (N, heads, L, head_dim) by the angle whose cos
    and sin are rope[0][l, j], rope[1][l, j], in their dtype (float32 at least: bf16 would round the
    angles); returns x's dtype."""
    cos, sin = rope
    x0, x1 = x.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)  # each (N, heads, L, head_dim/2)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias, through scaled_dot_product_attention; optionally a norm
    on q and k, then rotary position embedding of q and k (`rope`)."""

    def __init__(self, dim: int, num_heads: int, options: BlockOptions = PAPER_OPTIONS):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = options.make_qk_norms(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # (N, heads, T, d/heads), normalised over d/heads
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, d/heads)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class CrossAttention(nn.Module):
    """Multi-head attention from tokens x (N, T, d) to a context sequence (N, S, d), optionally with a
    norm on q and k; never rotary (the context [t_emb, y_emb] has no positions)."""

    def __init__(self, dim: int, num_heads: int, options: BlockOptions = PAPER_OPTIONS):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm, self.k_norm = options.make_qk_norms(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.num_heads
        q = self.q(x).view(n, t, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(n, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class DiTBlock(nn.Module):
    """Base class of the conditioning blocks. Subclasses set `forward(x, cond, rope=None)` and may override
    `condition` (how the embeddings enter) and `initialize_weights` (run after the model's generic
    xavier init). Taking `options` in __init__ and `rope` in forward is optional (see `takes_options`)."""

    name: str = ""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, options: BlockOptions = PAPER_OPTIONS
    ):
        super().__init__()
        self.options = options

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

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, options: BlockOptions = PAPER_OPTIONS
    ):
        super().__init__(hidden_size, num_heads, mlp_ratio, options)
        self.norm1 = options.make_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, options)
        self.norm2 = options.make_norm(hidden_size)
        self.mlp = options.make_mlp(hidden_size, mlp_ratio)

    @staticmethod
    def condition(x: torch.Tensor, t_emb: torch.Tensor, y_emb: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.cat([x, t_emb[:, None], y_emb[:, None]], dim=1), None  # (N, T+2, d)

    def forward(self, x: torch.Tensor, cond: None = None, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


@register_block("cross_attention")
class CrossAttentionBlock(DiTBlock):
    """A ViT block with multi-head cross-attention to the length-2 sequence [t_emb, y_emb] after the
    self-attention."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, options: BlockOptions = PAPER_OPTIONS
    ):
        super().__init__(hidden_size, num_heads, mlp_ratio, options)
        self.norm1 = options.make_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, options)
        self.norm2 = options.make_norm(hidden_size)
        self.cross_attn = CrossAttention(hidden_size, num_heads, options)
        self.norm3 = options.make_norm(hidden_size)
        self.mlp = options.make_mlp(hidden_size, mlp_ratio)

    @staticmethod
    def condition(
        x: torch.Tensor, t_emb: torch.Tensor, y_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.stack([t_emb, y_emb], dim=1)  # context (N, 2, d)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        x = x + self.cross_attn(self.norm2(x), cond)
        return x + self.mlp(self.norm3(x))


@register_block("adaln")
class AdaLNBlock(DiTBlock):
    """Adaptive LayerNorm: affine-free norms whose shift and scale are regressed from c."""

    gated = False

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, options: BlockOptions = PAPER_OPTIONS
    ):
        super().__init__(hidden_size, num_heads, mlp_ratio, options)
        self.norm1 = options.make_norm(hidden_size, affine=False)
        self.attn = Attention(hidden_size, num_heads, options)
        self.norm2 = options.make_norm(hidden_size, affine=False)
        self.mlp = options.make_mlp(hidden_size, mlp_ratio)
        num_chunks = 6 if self.gated else 4
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, num_chunks * hidden_size))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        chunks = self.adaLN_modulation(cond)[:, None].chunk(6 if self.gated else 4, dim=-1)  # each (N, 1, d)
        if self.gated:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
            x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
            return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        shift_msa, scale_msa, shift_mlp, scale_mlp = chunks
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
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
