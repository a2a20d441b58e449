"""A run's name shows its point: the paper's axes, then each later axis whose value is not the paper's, so
that no two points of a sweep share a run folder, a W&B run name or a record's run_name."""

import itertools

from hydra import compose, initialize_config_dir

from ditlab.design import point_name
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
