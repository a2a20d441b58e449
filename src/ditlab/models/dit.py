"""The DiT backbone (Peebles & Xie 2022), with any of the registered conditioning blocks.

State-dict keys of `adaln_zero` models are those of the reference implementation, so released
checkpoints (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt) load with strict=True. The LightningDiT axes
(`pos_embed`, `norm`, `qk_norm`, `mlp`), U-ViT's long skips (`long_skip`) and MaskDiT's decoder
(`decoder_depth`) default to the paper's choices, which leave the model unchanged.
"""

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ditlab.models.blocks import BLOCKS, PAPER_OPTIONS, BlockOptions, Rope, modulate, takes_options
from ditlab.models.embeddings import POS_EMBEDS, LabelEmbedder, PatchEmbed, TimestepEmbedder
from ditlab.registry import Registry


@dataclass(frozen=True)
class DiTSize:
    depth: int
    hidden_size: int
    num_heads: int
    in_paper: bool = True


DIT_SIZES: Registry[DiTSize] = Registry(
    "model size",
    {
        "DiT-S": DiTSize(depth=12, hidden_size=384, num_heads=6),
        "DiT-B": DiTSize(depth=12, hidden_size=768, num_heads=12),
        "DiT-L": DiTSize(depth=24, hidden_size=1024, num_heads=16),
        "DiT-XL": DiTSize(depth=28, hidden_size=1152, num_heads=16),
        # Not in the paper: the CPU demo's size (and the tests'). Shallow rather than narrow: on two CPU cores
        # 4 blocks of d=192 at patch 4 learn Fashion-MNIST footwear in 8 minutes, 12 blocks at patch 8 do not.
        "DiT-Ti": DiTSize(depth=4, hidden_size=192, num_heads=3, in_paper=False),
        # Not in the paper: the CPU scaling study's two smaller sizes (conf/experiment/cpu_scaling.yaml). With
        # DiT-Ti they grow as S -> B -> L do: width ×2 at equal depth, then depth ×2 and width ×1.5 (B -> L: ×4/3).
        "DiT-Nano": DiTSize(depth=2, hidden_size=64, num_heads=1, in_paper=False),
        "DiT-Micro": DiTSize(depth=2, hidden_size=128, num_heads=2, in_paper=False),
    },
)
PATCH_SIZES = (2, 4, 8)  # the paper's; any patch size dividing the input works


# register_size("name", DiTSize(...)): `model=name` (with its conf/model YAML)
register_size = DIT_SIZES.register


class FinalLayer(nn.Module):
    """Affine-free norm (LayerNorm in the paper), adaLN shift/scale from c, Linear(d -> p·p·out_channels)."""

    def __init__(
        self, hidden_size: int, patch_size: int, out_channels: int, options: BlockOptions = PAPER_OPTIONS
    ):
        super().__init__()
        self.norm_final = options.make_norm(hidden_size, affine=False)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer: model(x, t, y) with x (N, C, H, W), t (N,), y (N,) long labels, returns
    (N, 2C if learn_sigma else C, H, W) — ε and, with learn_sigma, the variance interpolation v.

    Labels lie in [0, num_classes); label `num_classes` is the null label of classifier-free guidance.

    LightningDiT's axes: `pos_embed` "sincos" (the paper's absolute table) | "rope" (2-D rotary q and k in
    every self-attention) | "sincos_rope" (both, LightningDiT's); `norm` "layernorm" | "rmsnorm" for every
    norm of the blocks and the final layer; `qk_norm` a norm on each head's q and k; `mlp` "gelu" |
    "swiglu". Registries: `POS_EMBEDS`, `NORMS`, `MLPS`.

    `long_skip` (U-ViT, Bao et al. 2023): the output of block i < (depth−1)//2 is concatenated with the input
    of block depth−1−i along the channels and projected back by `long_skips[i]`, a Linear(2d → d), over every
    token the block sees (in-context's t and y tokens too, as in U-ViT); the middle block (two with an even
    depth: one would feed the next, whose input its output already is) takes none, so it needs depth ≥ 3.
    Each projection starts as [I | 0]: the block sees its plain input, so at init the model
    computes what the same weights compute without long skips (adaLN-Zero's trunk stays the identity), and
    the skip half of the weight is learnt from there (its gradient is the block input's times the skip).

    `second_time` (MeanFlow's, Geng et al. 2025): the model is given a second time, the end r of the
    interval [t, r] that its output averages the velocity over (`ditlab.diffusion.meanflow`), as
    `forward(..., r=r)`. A second `TimestepEmbedder` (`r_embedder`) embeds the interval r − t and adds it to
    the time embedding, so that every block and the final layer see c = t_emb(t) + r_emb(r − t) + y_emb:
    the paper's (t, t − r) conditioning, its interval t − r being r − t in ditlab's time (t = 0 the noise).
    Without r the interval is 0 (the instantaneous velocity). `False`, the default, is the paper's DiT with
    the same state-dict keys and outputs.

    `decoder_depth` (MaskDiT's decoder, Zheng et al. 2023; `ditlab.training.masking`): that many more blocks
    of the same kind and width after the DiT's own, and a learned `mask_token` (d,). Given `keep` (N, K), the
    indices of each image's visible tokens, `forward(..., keep=keep)` runs the DiT's blocks (the encoder) on
    those K tokens only, each with its position embedding (absolute, and rotary by its grid position);
    in-context's t and y tokens are appended after the masking, so never masked; cross-attention's context
    and the adaLN condition are unchanged. The decoder (`decode`) puts the encoder's tokens back on the grid
    with the mask token at every other position, adds the position table to every image token (MaskDiT's
    decoder position embedding), and runs its blocks over the whole sequence before the final layer. Without
    `keep` (sampling, the unmasked fine-tune) every token goes through the encoder and the decoder. 0, the
    default, is the paper's DiT with the same state-dict keys and outputs.
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        block: str = "adaln_zero",
        pos_embed: str = "sincos",
        norm: str = "layernorm",
        qk_norm: bool = False,
        mlp: str = "gelu",
        long_skip: bool = False,
        second_time: bool = False,
        decoder_depth: int = 0,
        gradient_checkpointing: bool = False,
    ):
        # The constructor's arguments, captured once (saved in checkpoints; a training setting is not).
        config = {
            k: v for k, v in locals().items() if k not in ("self", "__class__", "gradient_checkpointing")
        }
        super().__init__()
        if input_size % patch_size != 0:
            divisors = [p for p in range(1, input_size + 1) if input_size % p == 0]
            raise ValueError(
                f"patch size {patch_size} does not divide the input size {input_size}; "
                f"valid patch sizes for this input: {divisors}"
            )
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if long_skip and depth < 3:
            raise ValueError(
                f"long_skip=true needs depth ≥ 3: with {depth} blocks no block feeds a later one but its "
                "neighbour, whose input its output already is; use a deeper model or long_skip=false"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        block_cls = BLOCKS[block]
        position = POS_EMBEDS[pos_embed]
        options = BlockOptions(norm=norm, mlp=mlp, qk_norm=qk_norm)
        head_dim, grid_size = hidden_size // num_heads, input_size // patch_size
        if position.rotary is not None:
            try:  # fail here rather than at the first forward
                position.rotary(head_dim, grid_size, None)
            except ValueError as err:
                raise ValueError(
                    f"pos_embed {pos_embed!r}: {err} (hidden_size {hidden_size} / num_heads {num_heads})"
                ) from None
        has_options, has_rope = takes_options(block_cls)
        if (options != PAPER_OPTIONS and not has_options) or (position.rotary is not None and not has_rope):
            raise ValueError(
                f"block {block!r} takes no `options` in __init__ or no `rope` in forward, so it only builds "
                "with norm='layernorm', mlp='gelu', qk_norm=False and a pos_embed without rotary part"
            )
        self.config = config
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.block_cls = block_cls
        self.gradient_checkpointing = gradient_checkpointing
        self.num_patches = grid_size**2
        self.head_dim = head_dim
        self.rotary = position.rotary

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # None without a second time: no state-dict keys, the paper's model.
        self.r_embedder = TimestepEmbedder(hidden_size) if second_time else None
        # (1, T, d), fixed; a None buffer (rotary only) is left out of the state dict.
        table = position.absolute(hidden_size, grid_size)[None] if position.absolute is not None else None
        self.register_buffer("pos_embed", table)
        block_kwargs = {"options": options} if has_options else {}
        self.blocks = nn.ModuleList(
            block_cls(hidden_size, num_heads, mlp_ratio, **block_kwargs) for _ in range(depth)
        )
        # Empty without long skips: no state-dict keys, and the forward loop below skips no block.
        self.long_skips = nn.ModuleList(
            nn.Linear(2 * hidden_size, hidden_size) for _ in range((depth - 1) // 2 if long_skip else 0)
        )
        # MaskDiT's decoder, empty by default: no state-dict keys, no mask token.
        self.decoder_blocks = nn.ModuleList(
            block_cls(hidden_size, num_heads, mlp_ratio, **block_kwargs) for _ in range(decoder_depth)
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if decoder_depth else None
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, options)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's init: xavier-uniform Linears with zero bias, the patch conv as a flattened Linear,
        N(0, 0.02) label table and timestep MLP, block-specific inits, a zero final layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, self.r_embedder):
            if embedder is not None:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        for block in (*self.blocks, *self.decoder_blocks):
            block.initialize_weights()
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)  # MAE's and MaskDiT's
        for skip in self.long_skips:  # [I | 0]: the block's plain input (see the class docstring)
            nn.init.eye_(skip.weight)  # eye_ of a (d, 2d) matrix: the identity on the first d inputs
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p·p·C) -> (N, C, H, W), in the reference's (p, q, c) order within a patch."""
        p, c = self.patch_size, self.out_channels
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def rope(
        self, length: int, dtype: torch.dtype, device: torch.device, keep: torch.Tensor | None = None
    ) -> Rope:
        """cos and sin (length, head_dim/2) of the rotary angles of a sequence of `length` ≥ T tokens, in
        `dtype` promoted to float32 at least. Tokens after the image tokens (in-context's t and y) are not
        on the grid and get angle 0, i.e. no rotation (a logit between one of them and an image token then
        depends on the image token's absolute position). With `keep` (N, K), the image tokens are each
        image's visible ones, each at its grid position's angles: (N, 1, length, head_dim/2)."""
        angles = self.rotary(self.head_dim, self.input_size // self.patch_size, device)
        if keep is not None:
            angles = angles[keep][:, None]  # (N, 1, K, head_dim/2): broadcast over the heads
        angles = F.pad(angles, (0, 0, 0, length - angles.shape[-2]))
        dtype = torch.promote_types(dtype, torch.float32)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        r: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, {self.input_size}, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        tokens = self.x_embedder(x)  # (N, T, d)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        if keep is not None:  # masked training: the encoder sees each image's visible tokens only
            if self.mask_token is None:
                raise ValueError(
                    "keep= (masked training) needs a decoder: build the DiT with decoder_depth ≥ 1"
                )
            tokens = tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))  # (N, K, d)
        t_emb = self.t_embedder(t)  # (N, d)
        if self.r_embedder is not None:
            t_emb = t_emb + self.r_embedder(torch.zeros_like(t) if r is None else r - t)
        elif r is not None:
            raise ValueError(
                "this DiT takes no second time r: build it with second_time=True (diffusion=meanflow does)"
            )
        y_emb = self.y_embedder(y)  # (N, d)
        tokens, cond = self.block_cls.condition(tokens, t_emb, y_emb)
        rope = () if self.rotary is None else (self.rope(tokens.shape[1], tokens.dtype, tokens.device, keep),)
        # U-ViT's long skips (none by default): the first half's outputs, fused last-in first-out.
        depth, num_skips, skipped = len(self.blocks), len(self.long_skips), []
        for i, block in enumerate(self.blocks):
            if i >= depth - num_skips:  # skipped[-1] is block depth−1−i's output
                tokens = self.long_skips[depth - 1 - i](torch.cat([tokens, skipped.pop()], dim=-1))
            tokens = self.run_block(block, tokens, cond, rope)
            if i < num_skips:
                skipped.append(tokens)
        if self.mask_token is not None:
            tokens = self.decode(tokens, cond, keep)
        tokens = self.final_layer(tokens[:, : self.num_patches], t_emb + y_emb)  # drop in-context tokens
        return self.unpatchify(tokens)

    def run_block(
        self, block: nn.Module, tokens: torch.Tensor, cond: Any, rope: tuple[Rope, ...]
    ) -> torch.Tensor:
        # Blocks without a rotary embedding are called as (tokens, cond): a user's block may not take `rope`.
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, tokens, cond, *rope, use_reentrant=False)
        return block(tokens, cond, *rope)

    def decode(self, tokens: torch.Tensor, cond: Any, keep: torch.Tensor | None) -> torch.Tensor:
        """MaskDiT's decoder on the encoder's output `tokens` (the visible image tokens when `keep` is given,
        then in-context's t and y tokens, carried over): the image tokens back on the grid with the mask
        token at the masked positions, the position table added to all of them, then the decoder blocks."""
        visible = self.num_patches if keep is None else keep.shape[1]
        image, extra = tokens[:, :visible], tokens[:, visible:]
        if keep is not None:
            grid = self.mask_token.to(image.dtype).expand(image.shape[0], self.num_patches, -1)
            image = grid.scatter(1, keep[..., None].expand(-1, -1, image.shape[-1]), image)
        if self.pos_embed is not None:
            image = image + self.pos_embed
        tokens = torch.cat([image, extra], dim=1)
        rope = () if self.rotary is None else (self.rope(tokens.shape[1], tokens.dtype, tokens.device),)
        for block in self.decoder_blocks:
            tokens = self.run_block(block, tokens, cond, rope)
        return tokens


def complete_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (a saved `DiT.config`) with the `DiT` defaults of the arguments it lacks: a checkpoint saved
    before an argument existed was built with that argument's default (e.g. pos_embed="sincos")."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(DiT).parameters.items()
        if name != "gradient_checkpointing"
    }
    return {**defaults, **config}


def parse_model_name(name: str, patch_size: int | None = None) -> tuple[DiTSize, int]:
    """ "DiT-XL/2" -> (size, 2); "DiT-XL" takes its patch size from `patch_size`."""
    size_name, _, patch = name.partition("/")
    if size_name not in DIT_SIZES:
        raise ValueError(f"unknown model {name!r}; valid sizes: {', '.join(DIT_SIZES)} (e.g. 'DiT-XL/2')")
    if patch:
        if not patch.isdigit():
            raise ValueError(f"bad patch size in {name!r}; write e.g. 'DiT-XL/2' (patch sizes {PATCH_SIZES})")
        if patch_size is not None and patch_size != int(patch):
            raise ValueError(f"model {name!r} conflicts with patch_size={patch_size}")
        patch_size = int(patch)
    if patch_size is None:
        raise ValueError(f"no patch size given for {name!r}; write e.g. '{size_name}/2' or pass patch_size")
    return DIT_SIZES[size_name], patch_size


def build_dit(
    name: str = "DiT-XL/2",
    block: str = "adaln_zero",
    *,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    patch_size: int | None = None,
    depth: int | None = None,
    **kwargs,
) -> DiT:
    """Build one point of the design space: `build_dit("DiT-B/4", "adaln")`.

    `depth` overrides the size's number of blocks (for depth ablations and fast tests). Extra keyword
    arguments (mlp_ratio, class_dropout_prob, pos_embed, norm, qk_norm, mlp, long_skip, second_time,
    decoder_depth, gradient_checkpointing) go to `DiT`.
    """
    size, patch_size = parse_model_name(name, patch_size)
    return DiT(
        input_size=input_size,
        patch_size=patch_size,
        in_channels=in_channels,
        hidden_size=size.hidden_size,
        depth=size.depth if depth is None else depth,
        num_heads=size.num_heads,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        block=block,
        **kwargs,
    )
