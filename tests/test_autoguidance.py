"""Autoguidance (Karras et al. 2024): guidance by a weaker model of the same objective, alone or beside
classifier-free guidance; its counting, validation, loading and its way through training, sample.py and
fid_nfe.py."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ditlab.diffusion import Interpolant, SamplingSpec, cfg_model_fn, create_diffusion, sample
from ditlab.diffusion.sampling import Evaluations, image_generators
from ditlab.interop.checkpoints import load_dit, load_guide
from ditlab.interop.generation import ImageSampler, run_sample
from ditlab.models import DiT
from ditlab.report import fid_nfe
from test_metrics import StubFeatures
from test_sample_cli import TINY, read_npz, write_tiny_ckpt
from test_train import needs_fashion_mnist, run_train

ROOT = Path(__file__).resolve().parents[1]
C = 2  # ε channels of the stand-ins (2C outputs: ε and the learned variance)


class StandIn:
    """A class-conditional stand-in for a DiT: 2C output channels, the null class (3) its own output; counts
    its calls."""

    def __init__(self, weight: float) -> None:
        self.weight, self.calls = weight, 0

    def __call__(self, x, t, y):
        self.calls += 1
        eps = torch.tanh(self.weight * x) + 0.1 * y.to(x.dtype).view(-1, 1, 1, 1) + 0.01 * t.view(-1, 1, 1, 1)
        return torch.cat([eps, -3 * eps], 1)


def inputs(n: int = 3):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, C, 2, 2, generator=gen, dtype=torch.float64)
    return x, torch.linspace(0.2, 0.8, n, dtype=torch.float64), torch.tensor([0, 1, 2][:n])


# The formula ---------------------------------------------------------------------------------------------


def test_pure_autoguidance_is_the_guide_plus_w_times_the_difference():
    model, guide, (x, t, y) = StandIn(1.0), StandIn(0.3), inputs()
    out = cfg_model_fn(model, 1.0, null_class=3, guide=guide, guide_scale=2.5)(x, t, y)
    cond, weak = model(x, t, y), guide(x, t, y)
    torch.testing.assert_close(
        out[:, :C], weak[:, :C] + 2.5 * (cond[:, :C] - weak[:, :C]), rtol=0, atol=1e-12
    )
    assert torch.equal(out[:, C:], cond[:, C:])  # the learned variance stays the model's
    assert (model.calls, guide.calls) == (2, 2)  # the model once on the plain batch (no doubled one)


def test_a_scale_of_one_or_no_guide_is_classifier_free_guidance_bit_for_bit():
    x, t, y = inputs()
    plain = cfg_model_fn(StandIn(1.0), 4.0, null_class=3)(x, t, y)
    guide = StandIn(0.3)
    assert torch.equal(cfg_model_fn(StandIn(1.0), 4.0, 3, guide=guide, guide_scale=1.0)(x, t, y), plain)
    assert torch.equal(cfg_model_fn(StandIn(1.0), 4.0, 3, guide=None, guide_scale=3.0)(x, t, y), plain)
    assert guide.calls == 0


def test_cfg_and_autoguidance_together_add_both_terms():
    model, guide, (x, t, y) = StandIn(1.0), StandIn(0.3), inputs()
    out = cfg_model_fn(model, 4.0, null_class=3, guide=guide, guide_scale=2.0)(x, t, y)
    cond, uncond, weak = (
        m(x, t, labels)[:, :C] for m, labels in ((model, y), (model, torch.full_like(y, 3)), (guide, y))
    )
    expected = cond + (4.0 - 1) * (cond - uncond) + (2.0 - 1) * (cond - weak)
    torch.testing.assert_close(out[:, :C], expected, rtol=0, atol=1e-12)
    assert torch.equal(out[:, C:], model(x, t, y)[:, C:])


def test_only_the_guidance_channels_are_guided():
    model, guide, (x, t, y) = StandIn(1.0), StandIn(0.3), inputs()
    out = cfg_model_fn(model, 1.0, null_class=3, guidance_channels=1, guide=guide, guide_scale=3.0)(x, t, y)
    cond, weak = model(x, t, y), guide(x, t, y)
    torch.testing.assert_close(
        out[:, :1], weak[:, :1] + 3.0 * (cond[:, :1] - weak[:, :1]), rtol=0, atol=1e-12
    )
    assert torch.equal(out[:, 1:], cond[:, 1:])


def test_the_interval_leaves_steps_outside_unguided():
    model, guide, (x, t, y) = StandIn(1.0), StandIn(0.3), inputs()  # t = 0.2, 0.5, 0.8 (the interpolant's)
    guided = cfg_model_fn(model, 2.0, 3, interval=(0.4, 0.6), guide=guide, guide_scale=3.0)
    out, cond = guided(x, t, y), model(x, t, y)
    assert torch.equal(out[[0, 2]], cond[[0, 2]]) and not torch.allclose(out[1], cond[1])
    calls = guide.calls
    guided(x, torch.full_like(t, 0.9), y)  # the whole batch outside: the plain model alone
    assert guide.calls == calls


# Counting, the spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "objective", "cfg_scale", "interval", "nfe"),
    [
        ("ddim", "ddpm", 1.0, None, 2 * 6),  # the model and the guide: 2 evaluations a step
        ("ddim", "ddpm", 3.0, None, 3 * 6),  # the doubled batch and the guide: 3
        ("ddpm", "ddpm", 1.0, (0.0, 0.5), 6 + 3),  # guided only on the half nearest the noise
        ("euler", "sit", 2.0, None, 3 * 6),
    ],
)
def test_the_guide_s_evaluations_are_counted(sampler, objective, cfg_scale, interval, nfe):
    diffusion = create_diffusion() if objective == "ddpm" else Interpolant()
    spec = SamplingSpec(
        sampler, steps=6, cfg_scale=cfg_scale, cfg_interval=interval, guide="g", guide_scale=2
    )
    evaluations, guide = Evaluations(), StandIn(0.3)
    gens = image_generators(0, range(3), "cpu")
    sample(
        StandIn(1.0), diffusion, gens, (C, 2, 2), spec, num_classes=3, evaluations=evaluations, guide=guide
    )
    assert (evaluations.images, evaluations.per_image) == (3, nfe)


def test_the_spec_refuses_a_scale_without_a_guide_and_a_guide_that_does_nothing():
    for options, message in [
        ({"guide_scale": 2.0}, "callbacks.fid.guide.scale=2 needs a guide: set callbacks.fid.guide.ckpt="),
        (
            {"guide": "a.ckpt"},
            "callbacks.fid.guide.ckpt=a.ckpt with callbacks.fid.guide.scale=1 does nothing",
        ),
        ({"guide": "a.ckpt", "guide_scale": -1}, "callbacks.fid.guide.scale=-1 is out of range"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}") as error:
            SamplingSpec(key="callbacks.fid.", **options)
        assert "\n" not in str(error.value)
    # A record names the guide; an unguided one is what it was before guides (old sample.py jobs resume).
    record = SamplingSpec(guide="a.ckpt", guide_scale=2).as_record()
    assert (record["guide"], record["guide_scale"]) == ("a.ckpt", 2)
    assert "guide" not in SamplingSpec().as_record() and "guide_scale" not in SamplingSpec().as_record()
    assert SamplingSpec(guide="runs/a/step_0000500.ckpt", guide_scale=2).summary() == (
        "ddim 50 steps, cfg 1.0, guide 2 step_0000500.ckpt"
    )
    gens = image_generators(0, range(1), "cpu")
    with pytest.raises(ValueError, match="the guide model was not given"):
        sample(
            StandIn(1.0),
            create_diffusion(),
            gens,
            (C, 2, 2),
            SamplingSpec(guide="a", guide_scale=2),
            num_classes=3,
        )


# Loading the guide -------------------------------------------------------------------------------------


IDENTITY = {"name": "identity", "pretrained": None, "scale_factor": 1.0}


def write_ckpt(path: Path, diffusion: dict, seed: int = 0, autoencoder: dict = IDENTITY, **config) -> Path:
    """A ditlab checkpoint of a tiny pixel-space model (TINY with `config`'s changes), random EMA weights."""
    model = DiT(**TINY | config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    state = {f"{prefix}.{k}": v for prefix in ("model", "ema") for k, v in model.state_dict().items()}
    data = {"name": "toy", "num_classes": model.num_classes, "image_size": model.input_size, "channels": 1}
    header = {
        "version": 1,
        "model_config": model.config,
        "diffusion": diffusion,
        "autoencoder": autoencoder,
        "data": data | {"class_names": None},
    }
    torch.save({"state_dict": state, "ditlab": header}, path)
    return path


DDPM = {"learn_sigma": True, "noise_schedule": "linear", "diffusion_steps": 1000}
SIT = {"_target_": "ditlab.diffusion.interpolant.Interpolant", "path": "linear"}


def config_of(name: str) -> dict:
    """A run's diffusion config as training records it (conf/diffusion/<name>.yaml, every key)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"diffusion={name}"])
    return OmegaConf.to_container(cfg.diffusion, resolve=True)


def test_a_guide_that_does_not_fit_is_refused_in_one_line_naming_guide_ckpt(tmp_path):
    model = load_dit(write_ckpt(tmp_path / "model.ckpt", DDPM)).model
    for name, diffusion, config, differs in [
        ("sit.ckpt", SIT, {}, "objective sit_linear vs ddpm"),
        ("cosine.ckpt", DDPM | {"noise_schedule": "cosine"}, {}, "noise_schedule cosine vs linear"),
        ("x0.ckpt", DDPM | {"predict": "x0"}, {}, "predict x0 vs epsilon"),
        ("size.ckpt", DDPM, {"input_size": 16}, "input_size 16 vs 8"),
        ("classes.ckpt", DDPM, {"num_classes": 5}, "num_classes 5 vs 3"),
    ]:
        path = write_ckpt(tmp_path / name, diffusion, **config)
        with pytest.raises(ValueError) as error:
            load_guide(path, model.config, DDPM)
        assert str(error.value).startswith(
            f"guide.ckpt={path} cannot guide this model (guide vs model: {differs})"
        )
        assert "\n" not in str(error.value)
    mse = {"name": "sd_vae", "pretrained": "stabilityai/sd-vae-ft-mse", "scale_factor": 0.18215}
    vae_latents = write_ckpt(tmp_path / "mse.ckpt", DDPM, autoencoder=mse)  # same shapes, other latents
    with pytest.raises(
        ValueError, match=r"guide vs model: latents of autoencoder sd_vae \(scale 0.18215\) vs identity"
    ):
        load_guide(vae_latents, model.config, DDPM, autoencoder=IDENTITY)
    with pytest.raises(ValueError, match=r"sd_vae \(scale 0.18215\) vs sd_vae \(scale 0.2\)"):
        load_guide(vae_latents, model.config, DDPM, autoencoder=mse | {"scale_factor": 0.2})
    ema = mse | {"pretrained": "stabilityai/sd-vae-ft-ema"}  # another decoder of the same latents: fits
    assert load_guide(vae_latents, model.config, DDPM, autoencoder=ema) is not None
    with pytest.raises(
        FileNotFoundError, match=f"^guide.ckpt: checkpoint '{tmp_path}/missing.ckpt' does not exist"
    ):
        load_guide(tmp_path / "missing.ckpt", model.config, DDPM)


def test_a_smaller_model_of_the_objective_guides_whatever_else_it_was_trained_with(tmp_path):
    # A training run's diffusion config (every key of conf/diffusion) against a checkpoint header's, and the
    # reverse: normalize_diffusion reads both; learned or fixed variance does not matter.
    small = {"hidden_size": 16, "depth": 1}
    guide = load_guide(
        write_ckpt(tmp_path / "g.ckpt", DDPM | {"learn_sigma": False}, **small, learn_sigma=False),
        TINY,
        config_of("ddpm"),
    )
    assert not guide.training and not any(p.requires_grad for p in guide.parameters())
    assert (
        load_guide(write_ckpt(tmp_path / "s.ckpt", SIT, **small), TINY, config_of("sit_linear")).config[
            "depth"
        ]
        == 1
    )
    with pytest.raises(ValueError, match="objective sit_gvp vs sit_linear"):
        load_guide(write_ckpt(tmp_path / "gvp.ckpt", SIT | {"path": "gvp"}), TINY, config_of("sit_linear"))


# sample.py, fid_nfe.py ---------------------------------------------------------------------------------


def compose_cfg(config: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(config, overrides=["device=cpu", *overrides])


def test_sample_py_with_a_guide_records_it_and_samples_as_the_library(tmp_path):
    ckpt = write_tiny_ckpt(tmp_path / "model.ckpt", seed=0)
    guide = write_ckpt(tmp_path / "guide.ckpt", DDPM, seed=1, hidden_size=16, depth=1)
    common = (f"ckpt={ckpt}", "num_samples=6", "steps=3", "cfg_scale=1", "sampler=ddim", "progress=false")
    written = run_sample(
        compose_cfg("sample", *common, f"guide.ckpt={guide}", "guide.scale=2", f"out={tmp_path}/g")
    )
    job = json.loads(written["npz"].with_suffix(".json").read_text())
    assert (job["guide"], job["guide_scale"], len(job["guide_sha256"])) == (str(guide), 2, 64)
    images, labels = read_npz(written["npz"])
    spec = SamplingSpec("ddim", steps=3, guide=str(guide), guide_scale=2)
    sampler = ImageSampler(load_dit(ckpt), spec)
    expected, expected_labels = sampler(range(6))
    assert np.array_equal(images, expected.numpy()) and np.array_equal(labels, expected_labels.numpy())
    assert sampler.evaluations.per_image == 6  # 3 steps, the model and the guide each
    plain = run_sample(compose_cfg("sample", *common, f"out={tmp_path}/p"))
    assert not np.array_equal(read_npz(plain["npz"])[0], images)
    assert "guide" not in json.loads(plain["npz"].with_suffix(".json").read_text())  # as before autoguidance
    with pytest.raises(ValueError, match=r"^guide\.scale=2 needs a guide: set guide\.ckpt="):
        run_sample(compose_cfg("sample", *common, "guide.scale=2"))


def test_fid_against_nfe_with_a_guide(tmp_path, monkeypatch):
    monkeypatch.setattr(fid_nfe, "InceptionFeatures", lambda *args, **kwargs: StubFeatures())
    ckpt = write_tiny_ckpt(tmp_path / "model.ckpt")
    guide = write_ckpt(tmp_path / "guide.ckpt", DDPM, seed=1)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8))
    cfg = compose_cfg(
        "fid_nfe",
        f"ckpt={ckpt}",
        f"ref={ref}",
        f"cache_dir={tmp_path / 'cache'}",
        "samplers=[ddim]",
        "steps=[2]",
        "num_samples=8",
        "batch_size=8",
        f"guide.ckpt={guide}",
        "guide.scale=2",
        "cfg_scale=1.5",
    )
    monkeypatch.chdir(tmp_path)
    written = fid_nfe.run_fid_nfe(cfg)
    assert written["json"] == Path("fid_nfe") / "model-guide2-guide" / "fid_nfe.json"
    document = json.loads(written["json"].read_text())
    assert (document["guide"], document["guide_scale"], len(document["guide_sha256"])) == (str(guide), 2, 64)
    assert [p["nfe"] for p in document["points"]] == [3 * 2]  # CFG's doubled batch and the guide


# Training ----------------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_a_tiny_run_guided_by_a_smaller_model_records_the_guide(tmp_path):
    # debug=tiny's model: 32×32, 1 channel, 10 classes; its guide a smaller one (d=16, one block).
    guide = write_ckpt(
        tmp_path / "guide.ckpt",
        config_of("ddpm"),
        input_size=32,
        patch_size=8,
        num_classes=10,
        hidden_size=16,
        depth=1,
    )
    fid = [
        "callbacks.fid.num_samples=10",
        "callbacks.fid.num_reference_images=10",
        f"callbacks.fid.cache_dir={tmp_path}/cache",
    ]
    proc = run_train(
        tmp_path / "run", "debug=tiny", "trainer.max_steps=1", *fid, f"guide.ckpt={guide}", "guide.scale=2"
    )
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (record["fid_guide"], record["fid_guide_scale"]) == (str(guide), 2)
    assert record["fid_sampler"] == "ddim 2 steps, cfg 1.0, guide 2 guide.ckpt"
    assert record["fid_nfe"] == 4  # 2 steps, the model and the guide each
    assert "guide 2 guide.ckpt, NFE 4" in proc.stdout
    assert (tmp_path / "run" / "samples" / "final.png").is_file()

    # A guide of another objective: one line before the first step.
    sit = write_ckpt(tmp_path / "sit.ckpt", SIT, input_size=32, patch_size=8, num_classes=10)
    proc = run_train(
        tmp_path / "bad", "debug=tiny", "logger=none", f"guide.ckpt={sit}", "guide.scale=2", check=False
    )
    line = (
        f"guide.ckpt={sit} cannot guide this model (guide vs model: objective sit_linear vs ddpm): the guide "
        "must be a model of the same objective, input shape, classes and autoencoder"
    )
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == f"error: {line}", proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_the_run_s_guide_node_is_checked_before_anything_runs():
    from ditlab.training.run import check_values

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["guide.scale=3"])
    with pytest.raises(ValueError, match=r"^guide\.scale=3 needs a guide: set guide\.ckpt="):
        check_values(cfg)
