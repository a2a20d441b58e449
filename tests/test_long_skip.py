"""U-ViT's long skip connections (Bao et al. 2023) as the `long_skip` axis: off, the paper's DiT bit for bit;
on, block i feeds block depth−1−i through a Linear(2d → d) that starts as [I | 0], with every block, the
other layer axes and gradient checkpointing; its parameters and Gflops follow their closed forms; the
config, the run name, results.json and checkpoints carry it."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate

from ditlab.design import DesignPoint, default_axes
from ditlab.diffusion import create_diffusion
from ditlab.interop import infer_config, load_dit
from ditlab.interop.diffusers_export import to_diffusers
from ditlab.metrics import count_params, forward_flops, gflops
from ditlab.models import DiT, build_dit, complete_config
from ditlab.report.records import load_records
from test_arch_axes import FINGERPRINTS, OPTIONS, PAPER_BLOCKS, fingerprint_output, inputs, randomize
from test_interop import outputs, randomized, save_ditlab_ckpt
from test_train import CONF, TINY, needs_fashion_mnist, run_train


def tiny(block: str, depth: int = 4, **options) -> DiT:
    return build_dit("DiT-Ti/4", block, input_size=16, in_channels=3, num_classes=5, depth=depth, **options)


def skip_keys(num_skips: int) -> set[str]:
    return {f"long_skips.{i}.{name}" for i in range(num_skips) for name in ("weight", "bias")}


def block_inputs_and_outputs(model: DiT) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Each block's input tokens and output tokens in one forward of `model` on `inputs()`."""
    seen_in, seen_out = {}, {}
    hooks = []
    for i, block in enumerate(model.blocks):
        hooks.append(block.register_forward_pre_hook(lambda _m, args, i=i: seen_in.__setitem__(i, args[0])))
        hooks.append(block.register_forward_hook(lambda _m, _a, out, i=i: seen_out.__setitem__(i, out)))
    with torch.no_grad():
        model(*inputs())
    for hook in hooks:
        hook.remove()
    return seen_in, seen_out


# ---- off: the paper's model ---------------------------------------------------------------------------


@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_off_by_default_is_the_papers_model(block):
    assert fingerprint_output(block, long_skip=False) == pytest.approx(FINGERPRINTS[block], rel=1e-11)
    implicit, explicit = randomize(tiny(block)).eval(), randomize(tiny(block, long_skip=False)).eval()
    assert implicit.config == explicit.config and implicit.config["long_skip"] is False
    assert implicit.state_dict().keys() == explicit.state_dict().keys()
    assert not any(key.startswith("long_skips") for key in implicit.state_dict())
    assert torch.equal(implicit(*inputs()), explicit(*inputs()))
    # A config saved before the axis existed builds the model without long skips.
    assert complete_config({k: v for k, v in implicit.config.items() if k != "long_skip"}) == implicit.config


def test_the_papers_design_point_has_no_long_skips():
    assert DesignPoint().long_skip is False and default_axes()["long_skip"] is False
    assert DesignPoint().model_arguments()["long_skip"] is False
    assert DesignPoint().name == "adaln_zero-DiT-XL-p2"


# ---- on: the wiring -----------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [4, 5])
@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_block_i_feeds_block_depth_minus_1_minus_i(block, depth):
    """Each block of the second half sees long_skips[depth−1−i](its plain input ‖ block i's output); the
    others (the first half, an odd depth's middle block) their plain input, over the whole sequence they
    see (in-context's t and y tokens included)."""
    model = randomize(tiny(block, depth, long_skip=True)).eval()
    half = (depth - 1) // 2  # the middle block(s) take none
    assert len(model.long_skips) == half
    assert {k for k in model.state_dict() if k.startswith("long_skips")} == skip_keys(half)
    seen_in, seen_out = block_inputs_and_outputs(model)
    tokens = model.num_patches + (2 if block == "in_context" else 0)
    assert all(x.shape[1] == tokens for x in seen_in.values())
    for r in range(1, depth):
        expected = seen_out[r - 1]
        if r >= depth - half:
            expected = model.long_skips[depth - 1 - r](torch.cat([expected, seen_out[depth - 1 - r]], dim=-1))
        assert torch.equal(seen_in[r], expected), r


@pytest.mark.parametrize("depth", [4, 5])
def test_only_the_open_skip_carries_its_blocks_output(depth):
    """Every projection at its init [I | 0] but one set to [0 | I]: exactly one block, depth−1−i, sees
    block i's output instead of its plain input."""
    model = randomize(tiny("adaln_zero", depth, long_skip=True)).eval()
    d = model.config["hidden_size"]
    eye, zero = torch.eye(d), torch.zeros(d, d)
    for i in range((depth - 1) // 2):
        with torch.no_grad():
            for j, skip in enumerate(model.long_skips):
                skip.weight.copy_(torch.cat([zero, eye] if j == i else [eye, zero], dim=1))
                skip.bias.zero_()
        seen_in, seen_out = block_inputs_and_outputs(model)
        for r in range(1, depth):
            source = i if r == depth - 1 - i else r - 1
            assert torch.equal(seen_in[r], seen_out[source]), (i, r)


@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_at_init_the_skips_pass_the_plain_input(block):
    """[I | 0] at init: with the other weights of a model without long skips, the same output."""
    plain = randomize(tiny(block)).eval()
    skipped = tiny(block, long_skip=True).eval()
    d = skipped.config["hidden_size"]
    for skip in skipped.long_skips:
        assert torch.equal(skip.weight, torch.cat([torch.eye(d), torch.zeros(d, d)], dim=1))
        assert not skip.bias.count_nonzero()
    missing, unexpected = skipped.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == skip_keys(1) and not unexpected  # depth 4: block 0 feeds block 3
    assert torch.equal(skipped(*inputs()), plain(*inputs()))


# ---- on: training, the other axes, checkpointing -------------------------------------------------------


@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_each_block_trains_with_long_skips(block):
    """The project's init and DDPM loss, two AdamW steps: finite losses; the zero final layer stops every
    other gradient at the first step (adaLN-Zero's and the paper's init), so both halves of every skip
    projection get gradient at the second and move."""
    torch.manual_seed(0)
    model = tiny(block, depth=5, long_skip=True)
    diffusion, optimizer = create_diffusion(), torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, _, y = inputs()
    d = model.config["hidden_size"]
    for _ in range(2):
        optimizer.zero_grad()
        loss = diffusion.training_losses(model, x, model_kwargs={"y": y})["loss"].mean()
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
    for skip in model.long_skips:
        grad = skip.weight.grad
        assert grad[:, :d].count_nonzero() and grad[:, d:].count_nonzero() and skip.bias.grad.count_nonzero()
        assert skip.weight[:, d:].count_nonzero()  # the skip half has opened


@pytest.mark.parametrize("option", ["none", *OPTIONS])
@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_long_skips_with_every_block_option_and_checkpointing(block, option):
    """Every parameter gets gradient, and gradient checkpointing gives the same gradients."""
    options = {"long_skip": True, "class_dropout_prob": 0.0, **OPTIONS.get(option, {})}
    grads = []
    for ckpt in (False, True):
        model = randomize(tiny(block, depth=3, **options))
        model.gradient_checkpointing = ckpt
        out = model(*inputs())
        assert out.shape == (3, 6, 16, 16) and torch.isfinite(out).all()
        out.square().mean().backward()
        assert not [n for n, p in model.named_parameters() if p.grad is None or not p.grad.count_nonzero()]
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


# ---- parameters and Gflops ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,block,depth",
    [
        ("DiT-S/2", "adaln_zero", None),
        ("DiT-B/4", "in_context", None),
        ("DiT-XL/8", "cross_attention", None),
        ("DiT-L/2", "adaln", 7),  # odd: the middle block takes no skip
    ],
)
def test_params_and_gflops_follow_the_closed_forms(name, block, depth):
    """((D−1)//2)·(2d·d + d) more parameters; ((D−1)//2)·tokens·2d·d more multiply-adds, counted once as `gflops`
    counts them (the concatenation and the bias adds are free in that convention), over every token the
    block sees: T + 2 with in-context."""
    with torch.device("meta"):
        plain, skipped = (build_dit(name, block, depth=depth, long_skip=on) for on in (False, True))
    d, num_skips = plain.config["hidden_size"], (plain.config["depth"] - 1) // 2
    tokens = plain.num_patches + (2 if block == "in_context" else 0)
    assert count_params(skipped) - count_params(plain) == num_skips * (2 * d * d + d)
    assert forward_flops(skipped) - forward_flops(plain) == 2 * num_skips * tokens * 2 * d * d
    assert gflops(skipped) - gflops(plain) == pytest.approx(num_skips * tokens * 2 * d * d / 1e9, abs=1e-9)


# ---- the config, the run, the checkpoint --------------------------------------------------------------


def test_the_config_chooses_and_names_long_skips():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["long_skip=true", "qk_norm=true"])
        plain = compose("train")
    assert (
        cfg.run_name == "adaln_zero-DiT-Ti-p4+qk_norm+long_skip" and plain.run_name == "adaln_zero-DiT-Ti-p4"
    )
    point = DesignPoint.from_config(cfg)
    assert point.long_skip is True and "long_skip=True" in point.tags()
    assert {
        k for k, v in point.coordinates().items() if DesignPoint.from_config(plain).coordinates()[k] != v
    } == {
        "qk_norm",
        "long_skip",
    }
    model = instantiate(cfg.net, **point.model_arguments(), input_size=32, in_channels=1, num_classes=10)
    assert model.config["long_skip"] is True and len(model.long_skips) == (model.config["depth"] - 1) // 2
    # `-m long_skip=false,true`: one job per value, as Hydra's basic sweeper writes their overrides.
    (sweep,) = OverridesParser.create().parse_overrides(["long_skip=false,true"])
    with initialize_config_dir(str(CONF), version_base="1.3"):
        jobs = [compose("train", overrides=[f"long_skip={v}"]) for v in sweep.sweep_string_iterator()]
    assert [(job.long_skip, job.run_name) for job in jobs] == [
        (False, "adaln_zero-DiT-Ti-p4"),
        (True, "adaln_zero-DiT-Ti-p4+long_skip"),
    ]


@needs_fashion_mnist
def test_a_long_skip_run_records_and_reloads_its_point(tmp_path):
    """Two steps of a tiny run: its name, results.json coordinates, the report's axes and the checkpoint's
    model config carry the flag; the checkpoint loads back with its long skips."""
    run_train(tmp_path, *TINY, "long_skip=true", "net.depth=3", "trainer.max_steps=2")
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["run_name"] == "adaln_zero-DiT-Ti-p8+long_skip"
    assert record["coordinates"]["long_skip"] is True and record["axis_defaults"]["long_skip"] is False
    (run,) = load_records([tmp_path])
    assert run.axes == (("long_skip", True),)
    loaded = load_dit(tmp_path / "checkpoints" / "last.ckpt")
    assert loaded.model.config["long_skip"] is True and loaded.coordinates["long_skip"] is True
    assert len(loaded.model.long_skips) == 1  # 3 blocks: block 0 feeds block 2


def test_long_skips_need_three_blocks():
    with pytest.raises(ValueError, match="long_skip=true needs depth ≥ 3: with 2 blocks"):
        tiny("adaln_zero", depth=2, long_skip=True)


def test_checkpoints_and_bare_weights_keep_the_flag(tmp_path):
    config = dict(
        input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=3, num_heads=2, num_classes=3
    )
    model, ema = randomized(DiT(**config, long_skip=True), 0), randomized(DiT(**config, long_skip=True), 1)
    loaded = load_dit(save_ditlab_ckpt(tmp_path / "skip.ckpt", model, ema)).model
    assert loaded.config == ema.config and loaded.config["long_skip"] is True
    assert torch.equal(outputs(loaded), outputs(ema))
    # A bare state dict: the projections tell the flag, and the paper's weights still give the paper's DiT.
    with torch.device("meta"):
        skipped, plain = (build_dit("DiT-S/4", "in_context", long_skip=on) for on in (True, False))
    assert infer_config(skipped.state_dict()) == skipped.config
    assert infer_config(plain.state_dict()) == plain.config and plain.config["long_skip"] is False
    with pytest.raises(ValueError, match="'long_skip': True"):  # diffusers' DiT has no long skips
        to_diffusers(build_dit("DiT-Ti/4", input_size=8, in_channels=1, num_classes=3, long_skip=True))
