"""A run's name shows its point: the paper's axes, then each later axis whose value is not the paper's, so
that no two points of a sweep share a run folder, a W&B run name or a record's run_name."""

import inspect
import itertools
from dataclasses import replace

from hydra import compose, initialize_config_dir

from ditlab.design import DesignPoint, default_axes, point_name
from ditlab.diffusion import GaussianDiffusion, Interpolant
from ditlab.models import DIT_SIZES, DiT, build_dit
from test_train import CONF


def run_name(*overrides: str) -> str:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides)).run_name


def test_the_points_of_a_sweep_have_different_names():
    names = {
        (objective, pos_embed): run_name(f"diffusion={objective}", f"pos_embed={pos_embed}")
        for objective, pos_embed in itertools.product(("ddpm", "sit_linear"), ("sincos", "rope"))
    }
    assert names == {
        ("ddpm", "sincos"): "adaln_zero-DiT-Ti-p4",  # the paper's point keeps the paper's name
        ("ddpm", "rope"): "adaln_zero-DiT-Ti-p4+rope",
        ("sit_linear", "sincos"): "adaln_zero-DiT-Ti-p4+sit_linear",  # velocity: the interpolant's own
        ("sit_linear", "rope"): "adaln_zero-DiT-Ti-p4+sit_linear+rope",
    }


def test_flags_numbers_and_the_predictions_of_other_objectives():
    assert run_name("qk_norm=true", "repa=random_vit", "repa.weight=0.25", "model=DiT-S", "patch=2") == (
        "adaln_zero-DiT-S-p2+qk_norm+repa0.25"
    )
    assert run_name("diffusion.predict=v") == "adaln_zero-DiT-Ti-p4+predict_v"
    assert (
        run_name("diffusion=sit_linear", "diffusion.predict=noise")
        == "adaln_zero-DiT-Ti-p4+sit_linear+predict_noise"
    )
    # The FID's sampler scores a run; it is no part of its name.
    assert run_name("sampler=ddpm") == "adaln_zero-DiT-Ti-p4"
    assert point_name({"block": "adaln", "model": "DiT-B", "patch": 8}) == "adaln-DiT-B-p8"  # an old record


def test_the_default_design_point_is_the_papers():
    point = DesignPoint()
    assert (point.block, point.model, point.patch) == ("adaln_zero", "DiT-XL", 2)
    assert point.coordinates() == {"block": "adaln_zero", "model": "DiT-XL", "patch": 2} | default_axes()
    assert point.name == "adaln_zero-DiT-XL-p2"
    diffusion = point.build_objective()  # no options: the paper's diffusion
    assert isinstance(diffusion, GaussianDiffusion)
    assert (diffusion.num_timesteps, diffusion.learn_sigma, diffusion.predict) == (1000, True, "epsilon")


def test_the_model_and_the_objective_come_from_the_point():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["diffusion=sit_linear", "pos_embed=rope", "model=DiT-S", "patch=8"])
    point = DesignPoint.from_config(cfg)
    assert (point.objective, point.predict, point.pos_embed) == ("sit_linear", "velocity", "rope")
    assert isinstance(point.build_objective(), Interpolant)
    model = build_dit(**point.model_arguments(), input_size=16, in_channels=1, num_classes=3)
    config = model.config
    assert (config["patch_size"], config["pos_embed"], config["hidden_size"], config["learn_sigma"]) == (
        8,
        "rope",
        DIT_SIZES["DiT-S"].hidden_size,
        True,
    )
    # A different point is a different name, and changing a field changes only that coordinate.
    other = replace(point, qk_norm=True)
    assert other.name == point.name + "+qk_norm"
    assert {k for k, v in other.coordinates().items() if point.coordinates()[k] != v} == {"qk_norm"}


def test_every_model_argument_of_the_point_is_the_constructors():
    taken = inspect.signature(build_dit).parameters.keys() | inspect.signature(DiT).parameters.keys()
    assert set(DesignPoint().model_arguments()) <= taken


def test_objective_options_off_their_defaults_name_the_run():
    """A sweep over an objective's options (the README's fixed-variance sweep, the cosine schedule) gives
    each point its own name; the options at their defaults add nothing."""
    assert run_name("diffusion.learn_sigma=false", "diffusion.fixed_variance=small") == (
        "adaln_zero-DiT-Ti-p4+learn_sigma=false,fixed_variance=small"
    )
    assert run_name("diffusion=cosine") == "adaln_zero-DiT-Ti-p4+noise_schedule=cosine"
    assert (
        run_name("diffusion=sit_linear", "diffusion.logit_std=2")
        == "adaln_zero-DiT-Ti-p4+sit_linear+logit_std=2"
    )
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["diffusion=sit_linear", "sampler=auto"])
    assert DesignPoint.from_config(cfg).objective_args == ""


def test_x_prediction_time_shift_and_loss_terms_name_the_run():
    """Issue 21 §2's axes: each off its default names the run once (time_shift by its own axis, not also
    in objective_args); the sampler's time shift, like the sampler, is a coordinate but no part of the name."""
    sit = "adaln_zero-DiT-Ti-p4+sit_linear"
    assert run_name("diffusion=sit_linear", "diffusion.predict=data") == sit + "+predict_data"
    assert run_name("diffusion=sit_linear", "diffusion.predict=data", "diffusion.loss=x") == (
        sit + "+predict_data+loss=x"
    )
    assert run_name("diffusion=sit_linear", "diffusion.time_shift=3") == sit + "+time_shift3"
    assert run_name("diffusion=sit_linear", "diffusion.time_shift=1") == sit  # s = 1: today's name
    assert run_name(
        "loss_terms.cosine_velocity=0.1",
        "loss_terms.dispersive=0.25",
        "loss_term_options.dispersive.temperature=1",
    ) == ("adaln_zero-DiT-Ti-p4+cosine_velocity0.1+dispersive0.25+dispersive.temperature=1")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["diffusion=sit_linear", "+sampler.options.time_shift=3"])
    point = DesignPoint.from_config(cfg)
    assert (point.sample_time_shift, point.time_shift, point.name) == (3.0, 1.0, sit)
    assert "sample_time_shift=3.0" in point.tags()
    assert DesignPoint().coordinates()["time_shift"] == 1.0  # the paper's point: no shift, no extra terms
    assert (DesignPoint().cosine_velocity, DesignPoint().dispersive, DesignPoint().loss_term_args) == (
        0.0,
        0.0,
        "",
    )
