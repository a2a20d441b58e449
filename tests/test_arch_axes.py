"""LightningDiT's architecture axes (pos_embed, norm, qk_norm, mlp) with every block: the paper defaults
leave the model as it was, each option trains, and RoPE, RMSNorm, SwiGLU and their Gflops match their
closed forms."""

import numpy as np
import pytest
import torch
from timm.layers import SwiGLU
from torch import nn

from ditlab.metrics import count_params, forward_flops
from ditlab.models import MLPS, DiT, DiTBlock, build_dit, complete_config, register_block, register_mlp
from ditlab.models.blocks import BLOCKS, Attention, apply_rope, mlp
from ditlab.models.embeddings import rope_angles_2d
from test_golden import fill_weights, pcg64_normal

PAPER_BLOCKS = ("in_context", "cross_attention", "adaln", "adaln_zero")
DEFAULTS = {"pos_embed": "sincos", "norm": "layernorm", "qk_norm": False, "mlp": "gelu"}
OPTIONS = {
    "rope": {"pos_embed": "rope"},
    "sincos_rope": {"pos_embed": "sincos_rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "qk_norm": {"qk_norm": True},
    "swiglu": {"mlp": "swiglu"},
    "lightningdit": {"pos_embed": "sincos_rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu"},
}
# (sum, sum of |·|) of `fingerprint_output` for each block. First recorded on the code before the axes were
# added; recorded again (Intel Xeon, torch 2.14.1) when the weights moved to PCG64 and a float64 model's
# timestep features to float64, which made them the same on every CPU (tests/test_golden.py).
FINGERPRINTS = {
    "in_context": (4198.326298887734, 35273.21858275158),
    "cross_attention": (3118.7288345028983, 34496.226670285236),
    "adaln": (727.8706095641104, 33381.7216338489),
    "adaln_zero": (-10492.530744315602, 33961.84585629219),
}


def tiny(block: str, **options) -> DiT:
    return build_dit("DiT-Ti/4", block, input_size=16, in_channels=3, num_classes=5, depth=2, **options)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero weights everywhere (the zero-initialised layers would hide paths and gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if p.ndim > 1 else 0.1))
    return model


def inputs(n: int = 3, channels: int = 3, size: int = 16, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, channels, size, size, generator=g, dtype=dtype)
    return x, torch.tensor([0, 500, 999])[:n], torch.tensor([1, 4, 5])[:n]  # 5 = the null label


def fingerprint_output(block: str, **options) -> tuple[float, float]:
    """(sum, sum of |·|) of a float64 model's output, from weights and input that are the same on every
    machine (see tests/test_golden.py for why and for the tolerance)."""
    model = build_dit("DiT-Ti/4", block, input_size=8, in_channels=1, num_classes=3, depth=2, **options)
    model = fill_weights(model.double(), seed=0, scale=0.3, bias_scale=0.1).eval()
    x = pcg64_normal(np.random.default_rng(2), 2, 1, 8, 8)
    out = model(x, torch.tensor([3, 700]), torch.tensor([0, 3]))
    return out.sum().item(), out.abs().sum().item()


# ---- the paper's defaults -----------------------------------------------------------------------------


@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_paper_defaults_leave_the_model_as_it_was(block):
    assert fingerprint_output(block) == pytest.approx(FINGERPRINTS[block], rel=1e-11)
    implicit, explicit = randomize(tiny(block)).eval(), randomize(tiny(block, **DEFAULTS)).eval()
    assert implicit.config == explicit.config and implicit.config.items() >= DEFAULTS.items()
    assert implicit.state_dict().keys() == explicit.state_dict().keys()
    assert torch.equal(implicit(*inputs()), explicit(*inputs()))
    assert not any(isinstance(m, nn.RMSNorm | SwiGLU) for m in implicit.modules())


def test_configs_saved_before_the_axes_complete_to_the_paper_defaults():
    model = tiny("adaln_zero", norm="rmsnorm")
    old = {k: v for k, v in model.config.items() if k not in DEFAULTS}
    assert complete_config(old) == model.config | DEFAULTS
    assert complete_config(model.config) == model.config
    assert DiT(**old).config == complete_config(old)


# ---- every option with every block --------------------------------------------------------------------


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_each_option_trains_with_every_block(block, option):
    options = OPTIONS[option]
    model = randomize(tiny(block, **options))
    assert model.config.items() >= options.items()
    out = model(*inputs())
    assert out.shape == (3, 6, 16, 16)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.count_nonzero()]
    assert not no_grad

    modules = list(model.modules())
    if options.get("norm") == "rmsnorm":
        assert not any(isinstance(m, nn.LayerNorm) for m in modules)
        assert isinstance(model.final_layer.norm_final, nn.RMSNorm)
        assert model.final_layer.norm_final.weight is not None  # LightningDiT keeps the weight here too
    if options.get("mlp") == "swiglu":
        assert all(isinstance(b.mlp, SwiGLU) for b in model.blocks)
    if options.get("qk_norm"):
        norm_cls = nn.RMSNorm if options.get("norm") == "rmsnorm" else nn.LayerNorm
        attns = [m for m in modules if hasattr(m, "q_norm")]
        assert len(attns) == 2 * (2 if block == "cross_attention" else 1)
        assert all(isinstance(a.q_norm, norm_cls) and a.q_norm.weight.shape == (64,) for a in attns)
    if "pos_embed" in options:
        assert ("pos_embed" in model.state_dict()) == options["pos_embed"].startswith("sincos")
        # The same weights without the rotation compute something else.
        unrotated = tiny(block, **(options | {"pos_embed": "sincos"}))
        unrotated.load_state_dict(model.state_dict(), strict=False)
        assert not torch.allclose(unrotated(*inputs()), model(*inputs()))


@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_all_options_together_checkpoint_and_cast(block):
    x, t, y = inputs()
    grads = []
    for ckpt in (False, True):
        model = randomize(tiny(block, **OPTIONS["lightningdit"], class_dropout_prob=0.0))
        model.gradient_checkpointing = ckpt
        model(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    out = model.eval().to(torch.bfloat16)(x.bfloat16(), t, y)  # the rotation runs in float32
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---- RoPE ---------------------------------------------------------------------------------------------


def rotate(x: torch.Tensor, grid: int) -> torch.Tensor:
    """ditlab's rotation of x (..., T, head_dim) at the T = grid² positions, in float64."""
    angles = rope_angles_2d(x.shape[-1], grid)
    return apply_rope(x, (angles.cos(), angles.sin()))


def test_rope_is_lightningdits_vision_rotary_embedding():
    # EVA-02's VisionRotaryEmbeddingFast as LightningDiT builds it (dim = head_dim/2, theta 10000),
    # written with its einsum / repeat / broadcat / rotate_half.
    head_dim, grid = 16, 4
    dim = head_dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    freqs = torch.einsum("i,f->if", torch.arange(grid, dtype=torch.float64), freqs).repeat_interleave(2, -1)
    freqs = torch.cat([freqs[:, None].expand(grid, grid, dim), freqs[None].expand(grid, grid, dim)], -1)
    cos, sin = freqs.cos().reshape(-1, head_dim), freqs.sin().reshape(-1, head_dim)

    def rotate_half(x):
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([-x2, x1], -1).flatten(-2)

    x = torch.randn(
        2, 3, grid * grid, head_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    torch.testing.assert_close(rotate(x, grid), x * cos + rotate_half(x) * sin, rtol=1e-12, atol=1e-12)


def test_rope_closed_forms():
    head_dim, grid = 16, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, grid * grid, head_dim, generator=g, dtype=torch.float64)
    rotated = rotate(x, grid)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)  # per head
    assert torch.equal(rotated[..., 0, :], x[..., 0, :])  # position (0, 0) is the identity
    assert not torch.allclose(rotated[..., 1, :], x[..., 1, :])

    q, k = torch.randn(2, head_dim, generator=g, dtype=torch.float64)
    tables = rotate(torch.stack([q, k])[:, None].expand(2, grid * grid, head_dim), grid)  # (2, T, hd)

    def logit(a: tuple[int, int], b: tuple[int, int]) -> float:
        return (tables[0, a[0] * grid + a[1]] @ tables[1, b[0] * grid + b[1]]).item()

    for (a, b), shift in [
        (((1, 2), (3, 0)), (4, 5)),
        (((0, 0), (2, 6)), (5, 1)),
        (((7, 7), (3, 4)), (-3, -4)),
    ]:
        moved = logit((a[0] + shift[0], a[1] + shift[1]), (b[0] + shift[0], b[1] + shift[1]))
        assert moved == pytest.approx(logit(a, b), rel=1e-12, abs=1e-12)
    assert logit((0, 0), (0, 0)) == pytest.approx((q @ k).item(), rel=1e-12)
    # ... and on the offset, both along rows and along columns (the first and second half of head_dim).
    assert logit((1, 0), (0, 0)) != pytest.approx(logit((0, 0), (0, 0)))
    assert logit((0, 1), (0, 0)) != pytest.approx(logit((1, 0), (0, 0)))


def test_in_context_tokens_are_not_rotated():
    model = tiny("in_context", pos_embed="rope").double()
    cos, sin = model.rope(model.num_patches + 2, torch.float64, torch.device("cpu"))
    assert cos.shape == (18, 32) and cos.dtype == torch.float64
    assert torch.equal(cos[-2:], torch.ones(2, 32, dtype=torch.float64)) and not sin[-2:].count_nonzero()
    assert sin[: model.num_patches].count_nonzero()
    # The t and y tokens' rows of the rotated q are their unrotated q.
    attn, x = model.blocks[0].attn, torch.randn(1, 18, 192, dtype=torch.float64)
    q = attn.qkv(x)[..., :192].view(1, 18, 3, 64).transpose(1, 2)
    assert torch.equal(apply_rope(q, (cos, sin))[:, :, -2:], q[:, :, -2:])


# ---- RMSNorm and SwiGLU -------------------------------------------------------------------------------


@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_rmsnorm_closed_form(block):
    model = randomize(tiny(block, norm="rmsnorm", qk_norm=True).double())
    x = torch.randn(2, 5, 192, dtype=torch.float64)
    for norm in (model.blocks[0].norm1, model.final_layer.norm_final):
        expected = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * norm.weight
        torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    q_norm, q = model.blocks[0].attn.q_norm, torch.randn(2, 3, 5, 64, dtype=torch.float64)
    expected = q / torch.sqrt(q.square().mean(-1, keepdim=True) + 1e-6) * q_norm.weight
    torch.testing.assert_close(q_norm(q), expected, rtol=1e-12, atol=1e-12)


def test_swiglu_width_and_parameters():
    for name, d, h in [("DiT-S/4", 384, 1024), ("DiT-XL/2", 1152, 3072), ("DiT-L/4", 1024, 2730)]:
        with torch.device("meta"):
            block = build_dit(name, mlp="swiglu").blocks[0]
            gelu = build_dit(name).blocks[0]
        assert (block.mlp.fc1_g.out_features, block.mlp.fc1_x.out_features, block.mlp.fc2.in_features) == (
            h,
        ) * 3
        assert count_params(block.mlp) == 3 * d * h + 2 * h + d
        assert count_params(gelu.mlp) == 8 * d * d + 5 * d
        assert abs(count_params(block.mlp) - count_params(gelu.mlp)) <= 3 * d + 2 * h  # ≈ the same


@pytest.mark.parametrize("name", ["DiT-S/4", "DiT-XL/2", "DiT-L/4"])
def test_forward_flops_of_each_option(name):
    with torch.device("meta"):
        paper = build_dit(name)
        flops = {option: forward_flops(build_dit(name, **options)) for option, options in OPTIONS.items()}
    base = forward_flops(paper)
    d, depth, tokens = paper.config["hidden_size"], paper.config["depth"], paper.num_patches
    h = 2 * 4 * d // 3
    swiglu_macs = depth * tokens * (3 * d * h - 8 * d * d)  # per sample; 0 when 3 divides d
    assert (swiglu_macs == 0) == (d % 3 == 0)
    for option in ("rope", "sincos_rope", "rmsnorm", "qk_norm"):  # elementwise: no matmul MACs
        assert flops[option] == base, option
    assert flops["swiglu"] - base == 2 * swiglu_macs  # forward_flops counts a multiply-add as 2
    assert flops["lightningdit"] - base == 2 * swiglu_macs


# ---- errors and extension -----------------------------------------------------------------------------


def test_clear_errors():
    with pytest.raises(ValueError, match=r"unknown norm 'batchnorm'; valid norms: layernorm, rmsnorm"):
        tiny("adaln_zero", norm="batchnorm")
    with pytest.raises(ValueError, match=r"unknown mlp 'relu'; valid mlps: gelu, swiglu"):
        tiny("adaln_zero", mlp="relu")
    with pytest.raises(ValueError, match=r"unknown pos_embed 'learned'; valid pos_embeds: rope, sincos, "):
        tiny("adaln_zero", pos_embed="learned")
    with pytest.raises(ValueError, match=r"head_dim divisible by 4, got 6 \(hidden_size 48 / num_heads 8\)"):
        DiT(input_size=8, hidden_size=48, num_heads=8, depth=1, pos_embed="sincos_rope")
    DiT(input_size=8, hidden_size=48, num_heads=8, depth=1)  # fine without the rotation


def test_a_block_written_before_the_options_still_builds_with_the_defaults():
    @register_block("test_old_style")
    class OldStyleBlock(DiTBlock):
        def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
            super().__init__(hidden_size, num_heads, mlp_ratio)
            self.attn = Attention(hidden_size, num_heads)
            self.mlp = mlp(hidden_size, mlp_ratio)

        def forward(self, x, cond):
            return x + self.attn(x) + self.mlp(x) * cond[:, None]

    try:
        model = tiny("test_old_style")
        assert model(*inputs()).shape == (3, 6, 16, 16)
        for option in ("rope", "rmsnorm", "swiglu", "qk_norm"):
            with pytest.raises(ValueError, match=r"block 'test_old_style' takes no `options`"):
                tiny("test_old_style", **OPTIONS[option])
    finally:
        BLOCKS.pop("test_old_style")


def test_a_new_mlp_is_one_registered_function():
    @register_mlp("test_relu")
    def relu_mlp(hidden_size: int, mlp_ratio: float) -> nn.Module:
        width = int(hidden_size * mlp_ratio)
        return nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, hidden_size))

    try:
        model = tiny("adaln", mlp="test_relu")
        assert isinstance(model.blocks[0].mlp[1], nn.ReLU)
        assert model(*inputs()).shape == (3, 6, 16, 16)
        assert register_mlp("test_relu")(relu_mlp) is relu_mlp  # the same function again: a no-op
        with pytest.raises(ValueError, match=r"mlp 'test_relu' is already registered as .*relu_mlp"):
            register_mlp("test_relu")(lambda hidden_size, mlp_ratio: nn.Identity())
    finally:
        MLPS.pop("test_relu")
