import math
import time

import pytest
import torch
import torch.nn.functional as F

from ditlab.metrics import count_params, gflops
from ditlab.models import BLOCKS, DIT_SIZES, DiTBlock, build_dit, register_block
from ditlab.models.embeddings import sincos_pos_embed_2d

# Paper Table 4: (params in millions, forward Gflops) at 32×32×4, 1000 classes, learned sigma.
TABLE_4 = {
    "DiT-S/8": (33.1, 0.36),
    "DiT-S/4": (32.9, 1.41),
    "DiT-S/2": (33.0, 6.06),
    "DiT-B/8": (130.9, 1.42),
    "DiT-B/4": (130.5, 5.56),
    "DiT-B/2": (130.5, 23.01),
    "DiT-L/8": (458.6, 5.01),
    "DiT-L/4": (458.1, 19.70),
    "DiT-L/2": (458.1, 80.71),
    "DiT-XL/8": (675.7, 7.39),
    "DiT-XL/4": (675.1, 29.05),
    "DiT-XL/2": (675.1, 118.64),
}
BLOCK_ABLATION_GFLOPS = {
    "in_context": 119.37,
    "cross_attention": 137.62,
    "adaln": 118.56,
    "adaln_zero": 118.64,
}


def meta_model(name: str, block: str = "adaln_zero", **kwargs):
    with torch.device("meta"):
        return build_dit(name, block, **kwargs)


@pytest.mark.parametrize("name", TABLE_4)
def test_table_4_params_and_gflops(name):
    params_m, paper_gflops = TABLE_4[name]
    model = meta_model(name)
    # The paper counts the fixed position embedding (a frozen nn.Parameter in the reference).
    n_params = count_params(model) + model.pos_embed.numel()
    assert n_params / 1e6 == pytest.approx(params_m, rel=0.005)
    assert gflops(model) == pytest.approx(paper_gflops, rel=0.01)


@pytest.mark.parametrize("block", BLOCK_ABLATION_GFLOPS)
def test_block_ablation_gflops(block):
    assert gflops(meta_model("DiT-XL/2", block)) == pytest.approx(BLOCK_ABLATION_GFLOPS[block], rel=0.01)


def test_gflops_is_fast_on_a_real_cpu_model():
    model = build_dit("DiT-S/2")
    start = time.perf_counter()
    value = gflops(model)
    assert time.perf_counter() - start < 1.0
    assert value == pytest.approx(6.06, rel=0.01)
    assert model.training  # mode restored


def test_gflops_counts_attention_quadratically():
    # Doubling the token count (patch 4 -> 2 at fixed width) quadruples the attention term, so the
    # ratio exceeds the 4× of the token-linear terms' per-token cost × 4 tokens ... i.e. > 4.
    small, large = gflops(meta_model("DiT-S/4")), gflops(meta_model("DiT-S/2"))
    assert large / small > 4.0


def test_reference_state_dict_keys():
    sd = meta_model("DiT-XL/2").state_dict()
    top = {k for k in sd if not k.startswith("blocks.")}
    assert top == {
        "pos_embed",
        "x_embedder.proj.weight",
        "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
    }
    block0 = {k.removeprefix("blocks.0.") for k in sd if k.startswith("blocks.0.")}
    assert block0 == {
        f"{m}.{p}"
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
        for p in ("weight", "bias")
    }
    assert len({k.split(".")[1] for k in sd if k.startswith("blocks.")}) == 28
    assert sd["pos_embed"].shape == (1, 256, 1152)
    assert sd["x_embedder.proj.weight"].shape == (1152, 4, 2, 2)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (6 * 1152, 1152)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 8, 1152)


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_shape_and_zero_at_init(block, learn_sigma):
    model = build_dit("DiT-Ti/4", block, input_size=16, in_channels=3, num_classes=7, learn_sigma=learn_sigma)
    x = torch.randn(5, 3, 16, 16)
    out = model(x, torch.randint(0, 1000, (5,)), torch.randint(0, 8, (5,)))
    assert out.shape == (5, 6 if learn_sigma else 3, 16, 16)
    assert torch.count_nonzero(out) == 0  # the zero-initialised final layer


def test_adaln_zero_blocks_start_as_identity():
    model = build_dit("DiT-Ti/4", "adaln_zero", input_size=16)
    x, c = torch.randn(2, 16, 192), torch.randn(2, 192)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)


def randomize(model):
    """Non-zero random weights everywhere so that every path contributes."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1))
    return model


def reference_forward(sd, x, t, y, *, patch, heads, out_channels):
    """The reference DiT (adaLN-Zero) written out op by op, in float64, from the state dict alone."""
    sd = {k: v.double() for k, v in sd.items()}
    x, n = x.double(), x.shape[0]

    def linear(h, name):
        return h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def layer_norm(h):
        mu = h.mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + 1e-6)

    def gelu_tanh(h):
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tokens = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    # The reference computes the sinusoidal timestep features in float32 whatever the model's dtype;
    # ditlab in float64 for a float64 model (the float32 values differ across CPUs by ~1e-5).
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    args = t.double()[:, None] * freqs
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], -1)
    t_emb = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    d = tokens.shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}"
        mods = linear(F.silu(c), f"{b}.adaLN_modulation.1")[:, None]
        s1, sc1, g1, s2, sc2, g2 = mods.split(d, dim=-1)
        hmod = layer_norm(tokens) * (1 + sc1) + s1
        qkv = linear(hmod, f"{b}.attn.qkv").reshape(n, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ qkv[2]
        tokens = tokens + g1 * linear(att.transpose(1, 2).reshape(n, -1, d), f"{b}.attn.proj")
        hmod = layer_norm(tokens) * (1 + sc2) + s2
        tokens = tokens + g2 * linear(gelu_tanh(linear(hmod, f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1")[:, None].split(d, dim=-1)
    out = linear(layer_norm(tokens) * (1 + scale) + shift, "final_layer.linear")
    side = math.isqrt(out.shape[1])
    out = out.reshape(n, side, side, patch, patch, out_channels)
    return out.permute(0, 5, 1, 3, 2, 4).reshape(n, out_channels, side * patch, side * patch)


def test_matches_reference_forward_in_float64():
    model = randomize(build_dit("DiT-Ti/4", input_size=16, num_classes=10).double()).eval()
    model.blocks = model.blocks[:3]
    x = torch.randn(3, 4, 16, 16, dtype=torch.float64)
    t, y = torch.tensor([0, 500, 999]), torch.tensor([1, 10, 4])  # 10 = the null label
    ours = model(x, t, y)
    ref = reference_forward(model.state_dict(), x, t, y, patch=4, heads=3, out_channels=8)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_pos_embed_closed_form():
    d, grid = 16, 4
    pe = sincos_pos_embed_2d(d, grid).double()
    for row, col in [(0, 0), (1, 3), (3, 2)]:
        token = pe[row * grid + col]
        for k in range(d // 4):
            omega = 1 / 10000 ** (k / (d / 4))
            assert token[k].item() == pytest.approx(math.sin(col * omega), abs=1e-6)
            assert token[d // 4 + k].item() == pytest.approx(math.cos(col * omega), abs=1e-6)
            assert token[d // 2 + k].item() == pytest.approx(math.sin(row * omega), abs=1e-6)
            assert token[3 * d // 4 + k].item() == pytest.approx(math.cos(row * omega), abs=1e-6)


def test_null_label_is_num_classes_and_dropout_uses_it():
    model = randomize(build_dit("DiT-Ti/4", input_size=16, num_classes=3))
    x, t = torch.randn(4, 4, 16, 16), torch.full((4,), 10)
    model.eval()
    null_out = model(x, t, torch.full((4,), 3))
    model.train()
    model.y_embedder.class_dropout_prob = 1.0  # drop every label
    torch.testing.assert_close(model(x, t, torch.tensor([0, 1, 2, 0])), null_out)
    assert model.y_embedder.embedding_table.num_embeddings == 4


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 2])
    grads = []
    for ckpt in (False, True):
        model = randomize(build_dit("DiT-Ti/4", input_size=16, class_dropout_prob=0.0))
        model.gradient_checkpointing = ckpt
        model(x, t, y).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_clear_errors():
    with pytest.raises(ValueError, match=r"unknown model 'DiT-M/2'.*DiT-S"):
        build_dit("DiT-M/2")
    with pytest.raises(ValueError, match=r"unknown block 'film'.*adaln_zero.*in_context"):
        build_dit("DiT-S/2", "film")
    with pytest.raises(
        ValueError, match=r"patch size 8 does not divide the input size 28.*\[1, 2, 4, 7, 14, 28\]"
    ):
        build_dit("DiT-S/8", input_size=28)
    with pytest.raises(ValueError, match="no patch size"):
        build_dit("DiT-S")
    model = build_dit("DiT-Ti/4", input_size=16)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 4, 16, 16\)"):
        model(torch.randn(1, 3, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_a_new_block_is_one_registered_class():
    @register_block("test_prenorm_only")
    class PreNormMLPBlock(DiTBlock):
        def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
            super().__init__(hidden_size, num_heads, mlp_ratio)
            self.fc = torch.nn.Linear(hidden_size, hidden_size)

        def forward(self, x, cond):
            return x + self.fc(x) * cond[:, None]

    try:
        model = build_dit("DiT-Ti/8", "test_prenorm_only", input_size=16)
        assert isinstance(model.blocks[0], PreNormMLPBlock)
        assert model(torch.randn(2, 4, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long)).shape == (
            2,
            8,
            16,
            16,
        )
        assert register_block("test_prenorm_only")(PreNormMLPBlock) is PreNormMLPBlock  # again: a no-op
        with pytest.raises(
            ValueError, match=r"block 'test_prenorm_only' is already registered as .*PreNormMLPBlock"
        ):
            register_block("test_prenorm_only")(type("Other", (PreNormMLPBlock,), {}))
    finally:
        BLOCKS.pop("test_prenorm_only")


def test_tiny_size_is_marked_not_in_paper():
    assert not DIT_SIZES["DiT-Ti"].in_paper
    assert all(DIT_SIZES[s].in_paper for s in ("DiT-S", "DiT-B", "DiT-L", "DiT-XL"))
