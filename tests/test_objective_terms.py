"""The extra loss terms (LightningDiT's cosine-velocity term, Diffuse and Disperse's dispersive loss) against
hand computations, their place in the training step (weight 0 or none: the objective's loss exactly), and
JiT's x-prediction with large patches on every block."""

import csv
import json
import math

import pytest
import torch

from ditlab.diffusion import Interpolant, create_diffusion, get_sampler
from ditlab.diffusion.loss_terms import LOSS_TERMS, LossContext, build_loss_terms, dispersive_loss
from ditlab.models import BLOCKS, build_dit
from ditlab.training.module import DiTModule
from test_train import TINY, run_train

PAPER_BLOCKS = ["in_context", "cross_attention", "adaln", "adaln_zero"]


def context(predict: str = "velocity") -> tuple[LossContext, torch.Tensor, torch.Tensor]:
    """A step's context with a fixed 'model output', and the true and predicted velocities by hand."""
    torch.manual_seed(0)
    x1 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x1)
    t = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    objective = Interpolant("linear", predict)
    x_t = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * noise
    out = torch.randn(3, 4, 4, 4, dtype=torch.float64)  # learn_sigma: 2C channels, the second half unused
    predicted = out[:, :2] if predict == "velocity" else (out[:, :2] - x_t) / (1 - t.view(-1, 1, 1, 1))
    return LossContext(objective, x1, noise, t, x_t, out), predicted, x1 - noise


@pytest.mark.parametrize("predict", ["velocity", "data"])
def test_cosine_velocity_is_one_minus_the_cosine(predict):
    ctx, v_hat, v = context(predict)
    channels = LOSS_TERMS["cosine_velocity"]()(ctx)  # LightningDiT's: over C at each position
    image = LOSS_TERMS["cosine_velocity"](over="image")(ctx)
    by_position, by_image = [], []
    for i in range(3):
        a, b = v_hat[i].flatten(), v[i].flatten()
        by_image.append(1 - float(a @ b) / math.sqrt(float(a @ a) * float(b @ b)))
        for h in range(4):
            for w in range(4):
                a, b = v_hat[i, :, h, w], v[i, :, h, w]
                by_position.append(1 - float(a @ b) / math.sqrt(float(a @ a) * float(b @ b)))
    assert float(channels) == pytest.approx(sum(by_position) / len(by_position), rel=1e-12)
    assert float(image) == pytest.approx(sum(by_image) / 3, rel=1e-12)


def test_dispersive_loss_is_the_papers_infonce_l2():
    torch.manual_seed(1)
    z = torch.randn(5, 3, 4, dtype=torch.float64)  # 5 images, 3 tokens of width 4: D = 12
    for tau in (0.5, 1.0):
        flat = z.flatten(1)
        total = sum(
            math.exp(-float((flat[i] - flat[j]).pow(2).sum()) / (12 * tau))
            for i in range(5)
            for j in range(5)
        )
        assert float(dispersive_loss(z, tau)) == pytest.approx(math.log(total / 25), rel=1e-12)
    # Identical images (the diagonal's case): the loss is log 1 = 0, its maximum, with a finite gradient.
    same = torch.ones(4, 2, 3, dtype=torch.float64, requires_grad=True)
    loss = dispersive_loss(same, 0.5)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-12) and bool(torch.isfinite(same.grad).all())


def test_dispersive_reads_the_tokens_of_its_block():
    model = build_dit("DiT-Ti/8", "in_context", input_size=16, in_channels=1, num_classes=3)
    term = build_loss_terms({"dispersive": 0.5})["dispersive"][1]
    term.attach(model)
    assert term.depth == 1  # the paper's depth//4 of 4 blocks
    caught = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: caught.update(tokens=o))
    model(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    assert term.tokens.shape == (2, model.num_patches, 192)  # in-context's t/y tokens dropped
    assert torch.equal(term.tokens, caught["tokens"][:, : model.num_patches])
    with pytest.raises(ValueError, match=r"dispersive\.depth=5"):
        build_loss_terms({"dispersive": 1}, {"dispersive": {"depth": 5}})["dispersive"][1].attach(model)


def test_building_terms_weight_zero_is_none_and_bad_names_fail():
    assert build_loss_terms({"cosine_velocity": 0.0, "dispersive": 0}) == {}
    assert build_loss_terms(None) == {}
    with pytest.raises(ValueError, match="unknown loss term 'cosine'"):
        build_loss_terms({"cosine": 0.1})
    with pytest.raises(ValueError, match="needs a velocity"):
        build_loss_terms({"cosine_velocity": 0.1})["cosine_velocity"][1].check(create_diffusion())


class Stub:
    def get_last_lr(self):
        return [0.0]


def step_loss(module: DiTModule, batch, t, noise) -> tuple[torch.Tensor, dict]:
    """One `training_step`'s loss without a trainer (fixed t and noise, logging caught)."""
    logged = {}
    module.step_noise = lambda x: (t, noise)
    module.log_dict = lambda metrics, **kwargs: logged.update(metrics)
    module.log = lambda name, value, **kwargs: logged.update({name: value})
    module.lr_schedulers = Stub
    torch.manual_seed(0)  # the label dropout
    return module.training_step(batch, 0), logged


def tiny_module(**kwargs) -> DiTModule:
    torch.manual_seed(2)
    model = build_dit("DiT-Ti/8", "adaln", input_size=16, in_channels=1, num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return DiTModule(model, Interpolant("linear"), torch.nn.Identity(), **kwargs)


def test_terms_add_their_weight_and_weight_zero_is_todays_loss():
    torch.manual_seed(3)
    batch = (torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0]))
    t, noise = torch.rand(4), torch.randn(4, 1, 16, 16)
    today, logged = step_loss(tiny_module(), batch, t, noise)
    zero, _ = step_loss(tiny_module(loss_terms=build_loss_terms({"dispersive": 0.0})), batch, t, noise)
    assert torch.equal(today, zero) and set(logged) >= {"train/loss", "train/mse"}
    weights = {"cosine_velocity": 0.1, "dispersive": 0.25}
    total, logged = step_loss(tiny_module(loss_terms=build_loss_terms(weights)), batch, t, noise)
    expected = today + 0.1 * logged["train/cosine_velocity"] + 0.25 * logged["train/dispersive"]
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-7)
    assert float(logged["train/dispersive"].detach()) < 0  # log of a mean of exp(−d) ≤ 1
    assert torch.equal(logged["train/loss"], total)


@pytest.mark.parametrize("patch", [8, 16])
@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_x_prediction_trains_and_samples_with_large_patches_on_every_block(block, patch):
    """JiT's setting at CPU scale: patch 8 (16 tokens) and 16 (4 tokens) on 32×32 pixels."""
    assert block in BLOCKS
    torch.manual_seed(4)
    model = build_dit("DiT-Ti", block, patch_size=patch, depth=2, input_size=32, in_channels=1, num_classes=3)
    objective = Interpolant("linear", "data", "logit_normal", logit_mean=-0.8, logit_std=0.8)  # JiT's t
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x1, y = torch.rand(4, 1, 32, 32) * 2 - 1, torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    loss = objective.training_losses(model, x1, model_kwargs={"y": y})["loss"].mean()
    loss.backward()
    optimizer.step()
    assert math.isfinite(float(loss.detach()))
    assert any(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), before, strict=True))
    with torch.no_grad():
        out = get_sampler("heun", time_shift=2.0).run(
            objective, model, torch.randn(2, 1, 32, 32), 2, None, {"y": y[:2]}
        )
    assert out.shape == (2, 1, 32, 32) and bool(torch.isfinite(out).all())


def test_a_run_with_every_new_option_trains_logs_each_term_and_records_its_coordinates(tmp_path):
    run_train(
        tmp_path,
        *TINY,
        "trainer.max_steps=2",
        "diffusion=sit_linear",
        "diffusion.predict=data",
        "diffusion.time_shift=3",
        "+sampler.options.time_shift=3",
        "loss_terms.cosine_velocity=0.1",
        "loss_terms.dispersive=0.25",
        "loss_term_options.cosine_velocity.over=image",
    )
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["run_name"] == (
        "adaln_zero-DiT-Ti-p8+sit_linear+predict_data+time_shift3+cosine_velocity0.1+dispersive0.25"
        "+cosine_velocity.over=image"
    )
    coordinates = record["coordinates"]
    assert (coordinates["time_shift"], coordinates["sample_time_shift"]) == (3.0, 3.0)
    with open(next(tmp_path.glob("csv/version_*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    for name in ("train/loss", "train/mse", "train/cosine_velocity", "train/dispersive"):
        assert any(row.get(name) for row in rows), name
