"""Everything that can be checked is checked before the first step: each bad value below ends the run with
exit status 2 and one line naming the key at fault, before any checkpoint is written."""

import pytest

from test_train import needs_fashion_mnist, run_train

SIT = ["diffusion=sit_linear"]
CASES = {
    "fid sampler vs objective": (
        [*SIT, "callbacks.fid.sampler=ddim"],
        "error: callbacks.fid.sampler=ddim samples a GaussianDiffusion, not this model's objective (Interpolant)",
    ),
    "grid sampler vs objective": (
        [*SIT, "callbacks.sample_grid.sampler=ddpm"],
        "error: callbacks.sample_grid.sampler=ddpm samples a GaussianDiffusion",
    ),
    "a preset's FID sampler": (
        ["experiment=cpu_design_space", *SIT],
        "error: callbacks.fid.sampler=ddim samples a GaussianDiffusion",
    ),
    "cfg_interval reversed": (
        ["callbacks.sample_grid.cfg_interval=[0.8,0.2]"],
        "error: callbacks.sample_grid.cfg_interval=[0.8, 0.2] must be [low, high] with 0 ≤ low ≤ high ≤ 1",
    ),
    "cfg_interval outside [0, 1]": (
        ["callbacks.sample_grid.cfg_interval=[0.5,2]"],
        "error: callbacks.sample_grid.cfg_interval=[0.5, 2] must be [low, high] with 0 ≤ low ≤ high ≤ 1",
    ),
    "cfg_interval of three values": (
        ["callbacks.sample_grid.cfg_interval=[1,2,3]"],
        "error: callbacks.sample_grid.cfg_interval=[1, 2, 3] must be [low, high]",
    ),
    "SBDM at sample_eps=0": (
        [*SIT, "sampler=euler_maruyama", "sampler.options.diffusion_form=SBDM", "diffusion.sample_eps=0"],
        "error: euler_maruyama's SBDM diffusion coefficient is infinite at the first time t=0 "
        "(diffusion.sample_eps=0)",
    ),
    "qk_norm not a bool": (
        ["qk_norm=maybe"],
        "error: qk_norm=maybe is out of range: it must be true or false",
    ),
    "long_skip not a bool": (
        ["long_skip=1"],
        "error: long_skip=1 is out of range: it must be true or false",
    ),
    "negative REPA weight": (
        ["repa=random_vit", "repa.weight=-1"],
        "error: repa.weight=-1 is out of range: it must be > 0",
    ),
    "no steps": (
        ["trainer.max_steps=0"],
        "error: trainer.max_steps=0 is out of range: it must be a whole number ≥ 1",
    ),
    "a REPA encoder that does not take the data": (
        ["repa=random_vit", "+repa.encoder_kwargs.in_chans=1"],
        "error: repa.encoder=vit_small_patch14_dinov2 cannot encode this data's 1-channel 32px images at the "
        "DiT's 4×4 tokens",
    ),
    "a key of another objective": (
        ["+diffusion.time_sampling=logit_normal"],
        "error: diffusion.time_sampling is not an option of this diffusion (ditlab.diffusion.create_diffusion); "
        "its options: timestep_respacing, noise_schedule,",
    ),
}


@needs_fashion_mnist
@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_value_is_one_line_before_the_first_step(tmp_path, case):
    overrides, line = CASES[case]
    proc = run_train(tmp_path, "debug=tiny", "logger=none", *overrides, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [e for e in proc.stderr.splitlines() if e.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(line), proc.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "results.json").exists()
