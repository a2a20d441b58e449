"""MaskDiT's masked training (Zheng et al. 2023) as the `masking` axis: off, the paper's DiT bit for bit; on,
each image's own random subset of round((1 − r)·T) tokens through the blocks (reproducible from the step's
seed), a decoder with a learned mask token over all of them, the objective's loss on the visible patches
and the reconstruction loss on the masked ones, an unmasked fine-tune at the end; every block; the masked
pass's Gflops and the training compute against their closed forms; the config, its checks and the names."""

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate

from ditlab.design import DesignPoint, default_axes
from ditlab.diffusion import Interpolant, MeanFlow, create_diffusion
from ditlab.diffusion.gaussian_diffusion import discretized_gaussian_log_likelihood, masked_mean, normal_kl
from ditlab.interop import infer_config
from ditlab.interop.diffusers_export import to_diffusers
from ditlab.metrics import forward_flops
from ditlab.models import DiT, build_dit, complete_config
from ditlab.training.masking import (
    Masking,
    draw_keep,
    num_kept,
    patchify,
    reconstruction_loss,
    visible_pixels,
)
from ditlab.training.module import DiTModule
from ditlab.training.run import ConfigError, check_values
from test_arch_axes import FINGERPRINTS, PAPER_BLOCKS, fingerprint_output, inputs, randomize
from test_train import CONF

CHANNELS, SIZE, PATCH = 2, 16, 4  # the tests' tiny DiT: 16 tokens of 4×4×2 values


def tiny(block: str = "adaln_zero", decoder_depth: int = 2, **options) -> DiT:
    return build_dit(
        "DiT-Ti/4",
        block,
        input_size=SIZE,
        in_channels=CHANNELS,
        num_classes=3,
        depth=2,
        decoder_depth=decoder_depth,
        **options,
    )


def small_weights(model: DiT, seed: int = 0) -> DiT:
    """Small random weights everywhere (the zero-initialised layers would stop every gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


HALF = Masking(0.5)  # MaskDiT's ratio: the tests' masked training


def module(model: DiT, masking: Masking | None = HALF, objective=None, seed: int = 7) -> DiTModule:
    return DiTModule(model, objective or create_diffusion(), torch.nn.Identity(), masking=masking, seed=seed)


class Stub:
    def get_last_lr(self):
        return [0.0]


def attach(dit_module: DiTModule, step: int, max_steps: int = 10, world_size: int = 1, rank: int = 0) -> dict:
    """A stand-in trainer at `step` of `max_steps`; returns what the step logs."""
    dit_module.trainer = SimpleNamespace(
        global_step=step, max_steps=max_steps, world_size=world_size, global_rank=rank
    )
    logged = {}
    dit_module.log_dict = lambda metrics, **kwargs: logged.update(metrics)
    dit_module.log = lambda name, value, **kwargs: logged.update({name: value})
    dit_module.lr_schedulers = Stub
    return logged


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, CHANNELS, SIZE, SIZE, generator=g), torch.tensor([0, 1, 2, 3])[:n] % 3


# ---- off: the paper's DiT -----------------------------------------------------------------------------


@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_off_by_default_is_the_papers_model(block):
    assert fingerprint_output(block, decoder_depth=0) == pytest.approx(FINGERPRINTS[block], rel=1e-11)
    implicit = randomize(build_dit("DiT-Ti/4", block, input_size=16, in_channels=3, num_classes=5, depth=2))
    explicit = randomize(
        build_dit("DiT-Ti/4", block, input_size=16, in_channels=3, num_classes=5, depth=2, decoder_depth=0)
    )
    assert implicit.config == explicit.config and implicit.config["decoder_depth"] == 0
    assert implicit.state_dict().keys() == explicit.state_dict().keys()
    assert not any(k.startswith(("decoder_blocks", "mask_token")) for k in implicit.state_dict())
    assert implicit.mask_token is None and not len(implicit.decoder_blocks)
    assert torch.equal(implicit.eval()(*inputs()), explicit.eval()(*inputs()))
    # A config saved before the axis existed builds the model without a decoder.
    assert (
        complete_config({k: v for k, v in implicit.config.items() if k != "decoder_depth"}) == implicit.config
    )


def test_the_papers_point_and_module_do_not_mask():
    point = DesignPoint()
    assert (point.mask_ratio, point.decoder_depth, point.recon_weight, point.finetune_steps) == (
        0.0,
        0,
        0.1,
        0,
    )
    assert default_axes()["mask_ratio"] == 0.0 and point.model_arguments()["decoder_depth"] == 0
    assert point.name == "adaln_zero-DiT-XL-p2" and point.masking() == Masking()
    plain = module(tiny(decoder_depth=0), masking=None)
    attach(plain, step=0)
    assert plain.masking == Masking() and plain.step_keep(batch()[0]) is None
    summary = plain.complexity()
    assert set(summary) == {"gflops", "params_m"}  # no masked pass: the record keeps its keys
    assert plain.train_compute_gflop(5, 32) == summary["gflops"] * 3 * (5 * 32)  # as before, bit for bit


def test_the_objectives_unmasked_loss_is_the_all_ones_mask():
    """loss_mask=None keeps the objectives' own means (bit for bit: the code path is the old one); a mask of
    ones gives the same values up to the order of the sums."""
    x, labels = batch()
    t, noise = (
        torch.tensor([0, 10, 500, 999]),
        torch.randn(x.shape, generator=torch.Generator().manual_seed(4)),
    )
    model = small_weights(tiny(decoder_depth=0)).eval()  # eval: no label dropout
    ones = torch.ones(len(x), 1, SIZE, SIZE)
    for objective, times in ((create_diffusion(), t), (Interpolant("linear"), t / 1000)):
        plain = objective.training_losses(model, x, times, noise, {"y": labels})
        masked = objective.training_losses(model, x, times, noise, {"y": labels}, loss_mask=ones)
        for key in plain:
            torch.testing.assert_close(masked[key], plain[key], rtol=1e-5, atol=1e-7)


# ---- which tokens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio,tokens", [(0.25, 16), (0.5, 16), (0.5, 9), (0.7, 64), (0.9, 256), (0.75, 4)])
def test_the_kept_count_and_each_images_own_subset(ratio, tokens):
    kept = num_kept(tokens, ratio)
    assert kept == round((1 - ratio) * tokens)
    keep = draw_keep(8, tokens, kept, torch.Generator().manual_seed(0), "cpu")
    assert keep.shape == (8, kept) and keep.dtype == torch.long
    assert torch.equal(keep, keep.sort(dim=1).values) and keep.min() >= 0 and keep.max() < tokens
    assert all(len(set(row.tolist())) == kept for row in keep)  # a subset: no token twice
    assert len({tuple(row.tolist()) for row in keep}) > 1  # each image its own
    assert torch.equal(keep, draw_keep(8, tokens, kept, torch.Generator().manual_seed(0), "cpu"))
    assert not torch.equal(keep, draw_keep(8, tokens, kept, torch.Generator().manual_seed(1), "cpu"))


def test_the_steps_masks_reproduce_apart_from_its_noise_and_split_by_rank():
    x = batch()[0]
    masked, plain = module(small_weights(tiny())), module(small_weights(tiny(decoder_depth=0)), masking=None)
    for dit_module in (masked, plain):
        attach(dit_module, step=3)
    keep = masked.step_keep(x)
    assert keep.shape == (4, 8) and torch.equal(keep, masked.step_keep(x))  # from the step's seed
    # The masks draw from a stream apart: the times and noise are the unmasked run's.
    for a, b in zip(masked.step_noise(x), plain.step_noise(x), strict=True):
        assert torch.equal(a, b)
    attach(masked, step=4)
    assert not torch.equal(keep, masked.step_keep(x))  # another step, other masks
    attach(masked, step=3)
    whole = masked.step_keep(torch.cat([x, x]))
    for rank in (0, 1):  # two processes of 4 images each: their slices of the 8-image draw
        attach(masked, step=3, world_size=2, rank=rank)
        assert torch.equal(masked.step_keep(x), whole[4 * rank : 4 * rank + 4])


def test_the_finetune_schedule_switches_masking_off_at_max_steps_minus_finetune_steps():
    masking = Masking(0.5, finetune_steps=3)
    assert [masking.ratio_at(step, 10) for step in range(10)] == [0.5] * 7 + [0.0] * 3
    assert [Masking(0.5).ratio_at(step, 10) for step in range(10)] == [0.5] * 10
    assert [Masking(0.5, finetune_steps=10).ratio_at(step, 10) for step in range(10)] == [0.0] * 10
    assert [masking.masked_steps(steps, 10) for steps in (0, 5, 7, 8, 10)] == [0, 5, 7, 7, 7]
    assert Masking(0.0, finetune_steps=3).masked_steps(10, 10) == 0
    # The module: masked up to step 6, unmasked from step 7 (no reconstruction, logged as 0; the mask token
    # gets a zero gradient, which DDP's static graph needs).
    dit_module = module(small_weights(tiny()), masking=masking)
    for step, masked in ((6, True), (7, False), (9, False)):
        logged = attach(dit_module, step=step)
        assert (dit_module.step_keep(batch()[0]) is not None) is masked
        dit_module.model.zero_grad(set_to_none=True)
        dit_module.training_step(batch(), 0).backward()
        assert bool(logged["train/recon"]) is masked  # 0 without masked patches
        assert logged["train/mask_ratio"] == (0.5 if masked else 0.0)
        grad = dit_module.model.mask_token.grad
        assert grad is not None and bool(grad.count_nonzero()) is masked


# ---- the model --------------------------------------------------------------------------------------------


def reference_forward(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, keep: torch.Tensor):
    """The masked forward written out image by image with plain indexing: the visible tokens (their
    position embeddings added before) through the blocks with their own rotary angles, back on the grid
    with the mask token elsewhere, the position table added again, the decoder, the final layer."""
    tokens_per_image = model.num_patches
    angles = None if model.rotary is None else model.rotary(model.head_dim, SIZE // PATCH, None)

    def rope(positions: torch.Tensor, length: int) -> tuple:
        if angles is None:
            return ()
        padded = F.pad(angles[positions], (0, 0, 0, length - len(positions)))
        return ((padded.cos().to(x.dtype), padded.sin().to(x.dtype)),)

    outputs = []
    for i, visible in enumerate(keep):
        tokens = model.x_embedder(x[i : i + 1])
        if model.pos_embed is not None:
            tokens = tokens + model.pos_embed
        t_emb, y_emb = model.t_embedder(t[i : i + 1]), model.y_embedder(y[i : i + 1])
        tokens, cond = model.block_cls.condition(tokens[:, visible], t_emb, y_emb)
        for block in model.blocks:
            tokens = block(tokens, cond, *rope(visible, tokens.shape[1]))
        grid = model.mask_token.repeat(1, tokens_per_image, 1)
        grid[:, visible] = tokens[:, : len(visible)]
        if model.pos_embed is not None:
            grid = grid + model.pos_embed
        tokens = torch.cat([grid, tokens[:, len(visible) :]], dim=1)
        for block in model.decoder_blocks:
            tokens = block(tokens, cond, *rope(torch.arange(tokens_per_image), tokens.shape[1]))
        outputs.append(model.unpatchify(model.final_layer(tokens[:, :tokens_per_image], t_emb + y_emb)))
    return torch.cat(outputs)


@pytest.mark.parametrize(
    "block,pos_embed",
    [
        ("in_context", "rope"),
        ("cross_attention", "sincos"),
        ("adaln", "sincos_rope"),
        ("adaln_zero", "sincos"),
    ],
)
def test_the_encoder_sees_each_images_visible_tokens_at_their_positions(block, pos_embed):
    model = small_weights(tiny(block, pos_embed=pos_embed)).double().eval()
    x, _, y = inputs(channels=CHANNELS, dtype=torch.float64)
    y = y % 3
    t = torch.tensor([0, 500, 999])
    keep = draw_keep(3, 16, 6, torch.Generator().manual_seed(5), "cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y, keep=keep), reference_forward(model, x, t, y, keep))
        # Every token kept: the unmasked forward (the mask token appears nowhere).
        full = torch.arange(16).expand(3, 16)
        torch.testing.assert_close(model(x, t, y, keep=full), model(x, t, y))
    with pytest.raises(ValueError, match="needs a decoder"):
        tiny(block, decoder_depth=0, pos_embed=pos_embed)(x.float(), t, y, keep=keep)


@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_each_block_trains_a_masked_step(block):
    """DDPM's hybrid loss on the visible patches plus the reconstruction: finite, and one AdamW step moves
    the decoder and the mask token (and the blocks) with gradient checkpointing too."""
    options = {"pos_embed": "rope"} if block in ("in_context", "cross_attention") else {}
    dit_module = module(small_weights(tiny(block, **options)))
    dit_module.model.gradient_checkpointing = block == "adaln"
    logged = attach(dit_module, step=0)
    optimizer = torch.optim.AdamW(dit_module.model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in dit_module.model.state_dict().items()}
    loss = dit_module.training_step(batch(), 0)
    assert torch.isfinite(loss) and {"train/mse", "train/vb", "train/recon"} <= logged.keys()
    loss.backward()
    model = dit_module.model
    assert model.mask_token.grad.count_nonzero()
    assert all(p.grad.count_nonzero() for p in model.decoder_blocks.parameters())
    optimizer.step()
    after = model.state_dict()
    for key in ("mask_token", "decoder_blocks.0.attn.qkv.weight", "decoder_blocks.1.mlp.fc2.weight"):
        assert not torch.equal(before[key], after[key]), key


# ---- the loss -----------------------------------------------------------------------------------------------


def test_masked_mean_is_the_mean_over_the_visible_pixels_and_channels():
    x = torch.arange(2 * 2 * 2 * 2, dtype=torch.float64).view(2, 2, 2, 2)  # (N, C, H, W)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(2, 1, 2, 2)
    # Image 0: pixels (0,0) and (1,1) of channels 0 and 1: (0 + 3 + 4 + 7)/4; image 1: 8 more each.
    assert masked_mean(x, mask).tolist() == [3.5, 11.5]


def test_visible_pixels_are_the_kept_patches():
    keep = torch.tensor([[0, 5], [3, 12]])  # of a 4×4 grid of 4×4-pixel patches
    pixels = visible_pixels(keep, 4, 4)
    assert pixels.shape == (2, 1, 16, 16) and pixels.sum().item() == 2 * 2 * 16
    assert pixels[0, 0, :4, :4].all() and pixels[0, 0, 4:8, 4:8].all() and not pixels[0, 0, :4, 4:8].any()
    assert pixels[1, 0, :4, 12:].all() and pixels[1, 0, 12:, :4].all()
    # The patch embedding's token order: image tokens row-major, as `patchify` cuts them.
    assert torch.equal(patchify(pixels, 4).amax(-1), torch.zeros(2, 16).scatter(1, keep, 1.0))


def hand_masked(values: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """(N,): the plain mean of each image's values (C, H, W) at its visible pixels, picked by indexing."""
    return torch.stack([v[:, m[0].bool()].mean() for v, m in zip(values, pixels, strict=True)])


@pytest.mark.parametrize("objective", ["ddpm", "sit_velocity", "sit_data"])
def test_the_loss_on_visible_patches_is_the_objectives_on_hand_masked_pixels(objective):
    """float64: every term of the objective's loss with `loss_mask` equals the same elementwise loss averaged
    by hand over the visible pixels (DDPM: ε's squared error and the VLB's KL, its decoder NLL at t = 0;
    SiT: the velocity error; JiT's x-prediction: (x̂ − x1)/max(1 − t, 0.05) on the linear path)."""
    g = torch.Generator().manual_seed(6)
    x1, noise = (
        torch.randn(4, 2, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(4, 2, 8, 8, generator=g),
    )
    x1, noise = x1.clamp(-1, 1), noise.double()
    out = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)  # the model's output, learn_sigma
    pixels = visible_pixels(draw_keep(4, 16, 6, g, "cpu"), 4, 2).double()
    if objective == "ddpm":
        diffusion, t = create_diffusion(), torch.tensor([0, 3, 400, 999])
    else:
        diffusion = Interpolant("linear", predict="velocity" if objective == "sit_velocity" else "data")
        t = torch.tensor([0.1, 0.5, 0.97, 0.99], dtype=torch.float64)
    losses = diffusion.training_losses(lambda *args, **kwargs: out, x1, t, noise, loss_mask=pixels)
    tt = t.view(-1, 1, 1, 1)
    if objective == "ddpm":
        x_t = diffusion.q_sample(x1, t, noise)
        torch.testing.assert_close(losses["mse"], hand_masked((noise - out[:, :2]) ** 2, pixels))
        frozen = diffusion.p_mean_variance(out, x_t, t, clip_denoised=False)
        mean, _, log_variance = diffusion.q_posterior_mean_variance(x1, x_t, t)
        kl = normal_kl(mean, log_variance, frozen["mean"], frozen["log_variance"])
        nll = -discretized_gaussian_log_likelihood(x1, frozen["mean"], 0.5 * frozen["log_variance"])
        per_pixel = torch.where(tt == 0, nll, kl) / math.log(2)
        torch.testing.assert_close(losses["vb"], hand_masked(per_pixel, pixels))
        torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    elif objective == "sit_velocity":
        torch.testing.assert_close(losses["loss"], hand_masked((out[:, :2] - (x1 - noise)) ** 2, pixels))
    else:
        error = (out[:, :2] - x1) / (1 - tt).clamp_min(0.05)
        torch.testing.assert_close(losses["loss"], hand_masked(error**2, pixels))


def test_the_reconstruction_target_is_the_noisy_inputs_standardised_masked_patches():
    """At each masked patch, the mean over its p·p·C values of (prediction − (x_t − mean)/√(var + 1e-6))²
    (var unbiased, MaskDiT's), averaged over the image's masked patches; visible patches do not count."""
    g = torch.Generator().manual_seed(8)
    x_t, prediction = (
        torch.randn(3, 2, 8, 8, generator=g).double(),
        torch.randn(3, 2, 8, 8, generator=g).double(),
    )
    keep = draw_keep(3, 16, 10, g, "cpu")
    expected = []
    for image in range(3):
        errors = []
        for token in sorted(set(range(16)) - set(keep[image].tolist())):
            row, col = divmod(token, 4)
            patch = x_t[image, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2]
            target = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
            predicted = prediction[image, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2]
            errors.append((predicted - target).pow(2).mean())
        expected.append(torch.stack(errors).mean())
    loss = reconstruction_loss(prediction, x_t, keep, 2)
    torch.testing.assert_close(loss, torch.stack(expected))
    # The standardised target itself at the masked patches, anything at the visible ones: no loss.
    target = (patchify(x_t, 2) - patchify(x_t, 2).mean(-1, keepdim=True)) / (
        patchify(x_t, 2).var(-1, keepdim=True) + 1e-6
    ).sqrt()
    visible = torch.zeros(3, 16).scatter(1, keep, 1.0).bool()[..., None]
    perfect = torch.where(visible, torch.full_like(target, 7.0), target)
    perfect = perfect.view(3, 4, 4, 2, 2, 2).permute(0, 5, 1, 3, 2, 4).reshape(3, 2, 8, 8)  # unpatchify
    assert reconstruction_loss(perfect, x_t, keep, 2).abs().max() < 1e-12


@pytest.mark.parametrize("objective", ["ddpm", "sit"])
def test_the_step_loss_is_the_visible_loss_plus_lambda_times_the_reconstruction(objective):
    """The module's loss: the objective's loss with the visible pixels' mask plus λ·reconstruction of the
    network's own input x_t from its output's first C channels; both terms logged."""
    diffusion = create_diffusion() if objective == "ddpm" else Interpolant("linear")
    losses = {}
    for weight in (0.1, 0.0):
        dit_module = module(small_weights(tiny()), Masking(0.5, recon_weight=weight), diffusion)
        logged, seen = attach(dit_module, step=2), {}

        def catch(_module, args, kwargs, out, seen=seen):
            seen.update(x_t=args[0], keep=kwargs["keep"], out=out)

        dit_module.model.register_forward_hook(catch, with_kwargs=True)
        torch.manual_seed(0)  # the label dropout
        losses[weight] = dit_module.training_step(batch(), 0)
        x = batch()[0]
        t, noise = dit_module.step_noise(x)
        pixels = visible_pixels(seen["keep"], 4, PATCH)
        objective_loss = diffusion.training_losses(
            lambda *args, out=seen["out"], **kwargs: out, x, t, noise, loss_mask=pixels
        )
        recon = reconstruction_loss(seen["out"][:, :CHANNELS], seen["x_t"], seen["keep"], PATCH)
        expected = (objective_loss["loss"] + weight * recon).mean()
        torch.testing.assert_close(losses[weight], expected)
        torch.testing.assert_close(logged["train/recon"], recon.mean())
        torch.testing.assert_close(logged["train/mse"], objective_loss["mse"].mean())
    assert losses[0.1] > losses[0.0]


def test_what_masked_training_refuses():
    model = tiny()
    masking = Masking(0.5)
    masking.check(model, create_diffusion(), repa=False, loss_terms=[])
    with pytest.raises(ValueError, match=r"^masking.mask_ratio=0.99 keeps none of the 16 tokens"):
        Masking(0.99).check(model, create_diffusion(), repa=False, loss_terms=[])
    with pytest.raises(
        ValueError, match=r"needs a decoder to restore the masked tokens: masking.decoder_depth"
    ):
        masking.check(tiny(decoder_depth=0), create_diffusion(), repa=False, loss_terms=[])
    with pytest.raises(ValueError, match="cannot train MeanFlow"):
        masking.check(model, MeanFlow(), repa=False, loss_terms=[])
    with pytest.raises(ValueError, match="cannot train with repa"):
        masking.check(model, create_diffusion(), repa=True, loss_terms=[])
    with pytest.raises(
        ValueError, match=r"cannot train with loss_terms.dispersive: .*; set loss_terms.dispersive=0$"
    ):
        masking.check(model, create_diffusion(), repa=False, loss_terms=["dispersive"])
    with pytest.raises(ValueError, match="needs a decoder"):  # the module checks it when built
        module(tiny(decoder_depth=0))


# ---- Gflops and training compute ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,ratio,decoder_depth", [("DiT-S/2", 0.5, 2), ("DiT-B/4", 0.75, 3)])
def test_the_masked_pass_gflops_follow_the_closed_form(name, ratio, decoder_depth):
    """adaLN-Zero, in multiply-adds: a block over n tokens costs 12d²·n (qkv, proj, the MLP) + 2d·n²
    (attention) + 6d² (its modulation, once per image). The masked pass runs the D blocks over
    K = round((1 − r)·T) tokens and the decoder's over all T; the patch embedding (C·p²·d per token), the
    time embedding (256·d + d²) and the final layer (2d² + p²·2C·d per token) are the unmasked pass's."""
    with torch.device("meta"):
        plain, decoded = (build_dit(name, decoder_depth=depth) for depth in (0, decoder_depth))
    config = plain.config
    d, depth, p, c = (config[k] for k in ("hidden_size", "depth", "patch_size", "in_channels"))
    tokens = plain.num_patches

    def block(n: int) -> int:
        return 12 * d * d * n + 2 * d * n * n + 6 * d * d

    def forward(encoder_tokens: int, decoder_blocks: int) -> int:
        ends = c * p * p * d * tokens + 256 * d + d * d + 2 * d * d + p * p * 2 * c * d * tokens
        return ends + depth * block(encoder_tokens) + decoder_blocks * block(tokens)

    kept = num_kept(tokens, ratio)
    assert forward_flops(plain) == 2 * forward(tokens, 0)
    assert forward_flops(decoded) == 2 * forward(tokens, decoder_depth)
    masked = forward_flops(decoded, visible_tokens=kept)
    assert masked == 2 * forward(kept, decoder_depth)
    assert masked / forward_flops(decoded) == pytest.approx(
        forward(kept, decoder_depth) / forward(tokens, decoder_depth), rel=1e-12
    )


def test_complexity_reports_both_passes_and_compute_counts_each_steps_pass():
    dit_module = module(tiny(), Masking(0.5, finetune_steps=3))
    attach(dit_module, step=0, max_steps=10)
    summary = dit_module.complexity()
    assert summary["gflops"] == forward_flops(dit_module.model) / 2e9  # the unmasked (sampling) pass
    assert summary["gflops_train_forward"] == forward_flops(dit_module.model, visible_tokens=8) / 2e9
    assert summary["gflops_train_forward"] < summary["gflops"]
    for steps, masked in ((4, 4), (7, 7), (10, 7)):  # 7 masked steps, then 3 unmasked
        expected = 3 * 32 * (masked * summary["gflops_train_forward"] + (steps - masked) * summary["gflops"])
        assert dit_module.train_compute_gflop(steps, 32) == pytest.approx(expected, rel=1e-12)


# ---- the config, the name, the checks -----------------------------------------------------------------------


def composed(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_the_config_chooses_and_names_masked_training():
    cfg, plain = composed("masking.mask_ratio=0.5"), composed()
    assert cfg.run_name == "adaln_zero-DiT-Ti-p4+mask0.5" and plain.run_name == "adaln_zero-DiT-Ti-p4"
    point = DesignPoint.from_config(cfg)
    assert (point.mask_ratio, point.decoder_depth) == (0.5, 2) and "mask_ratio=0.5" in point.tags()
    assert point.masking() == Masking(0.5, 0.1, 0)
    changed = {
        k for k, v in point.coordinates().items() if DesignPoint.from_config(plain).coordinates()[k] != v
    }
    assert changed == {"mask_ratio", "decoder_depth"}
    model = instantiate(cfg.net, **point.model_arguments(), input_size=32, in_channels=1, num_classes=10)
    assert len(model.decoder_blocks) == 2 and model.mask_token.shape == (1, 1, 192)
    names = {
        ("masking.mask_ratio=0.5", "masking.decoder_depth=4"): "+mask0.5+decoder_depth4",
        ("masking.mask_ratio=0.5", "masking.recon_weight=0"): "+mask0.5+recon_weight0",
        ("masking.mask_ratio=0.5", "masking.finetune_steps=300"): "+mask0.5+finetune_steps300",
        (
            "masking.decoder_depth=2",
        ): "+decoder_depth2",  # the decoder without masking (the fine-tune's model)
        ("masking.recon_weight=0", "masking.finetune_steps=300"): "",  # do nothing without masking
    }
    for overrides, suffix in names.items():
        assert composed(*overrides).run_name == "adaln_zero-DiT-Ti-p4" + suffix, overrides
    # `-m masking.mask_ratio=0,0.5`: one job per value, as Hydra's basic sweeper writes their overrides.
    (sweep,) = OverridesParser.create().parse_overrides(["masking.mask_ratio=0,0.5"])
    jobs = [
        composed(f"masking.mask_ratio={v}", "masking.finetune_steps=300")
        for v in sweep.sweep_string_iterator()
    ]
    assert [job.run_name for job in jobs] == [
        "adaln_zero-DiT-Ti-p4",
        "adaln_zero-DiT-Ti-p4+mask0.5+finetune_steps300",
    ]


@pytest.mark.parametrize(
    "override,message",
    [
        ("masking.mask_ratio=1", "masking.mask_ratio=1 is out of range: it must be in [0, 1)"),
        ("masking.mask_ratio=-0.1", "masking.mask_ratio=-0.1 is out of range: it must be in [0, 1)"),
        ("masking.mask_ratio=half", "masking.mask_ratio=half is out of range: it must be in [0, 1)"),
        (
            "masking.finetune_steps=-1",
            "masking.finetune_steps=-1 is out of range: it must be a whole number in",
        ),
        (
            "masking.finetune_steps=3001",
            "masking.finetune_steps=3001 is out of range: it must be a whole number in [0, trainer.max_steps=3000]",
        ),
        ("masking.recon_weight=-1", "masking.recon_weight=-1 is out of range: it must be ≥ 0"),
        (
            "masking.decoder_depth=-1",
            "masking.decoder_depth=-1 is out of range: it must be a whole number ≥ 0",
        ),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        check_values(composed(override))


def test_a_masked_run_without_a_decoder_is_refused():
    with pytest.raises(
        ConfigError, match=r"^masking.decoder_depth=0 is out of range: it must be a whole number ≥ 1"
    ):
        check_values(composed("masking.mask_ratio=0.5", "masking.decoder_depth=0"))
    check_values(composed("masking.mask_ratio=0.5", "masking.finetune_steps=3000"))  # the whole run unmasked


def test_bare_weights_tell_the_decoder_and_diffusers_refuses_it():
    with torch.device("meta"):
        decoded = build_dit("DiT-S/4", "in_context", decoder_depth=3)
    assert infer_config(decoded.state_dict()) == decoded.config and decoded.config["decoder_depth"] == 3
    with pytest.raises(ValueError, match="'decoder_depth': 2"):
        to_diffusers(build_dit("DiT-Ti/4", input_size=8, in_channels=1, num_classes=3, decoder_depth=2))
