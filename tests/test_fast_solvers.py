"""DPM-Solver++ and UniPC (diffusers' schedulers as ditlab samplers) against diffusers' own loop and DDIM."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from ditlab.diffusion import Interpolant, SamplingSpec, create_diffusion, get_sampler, sample
from ditlab.diffusion.sampling import DIFFUSERS_PREDICTION, Evaluations, check_fits, image_generators

F64 = torch.float64
SCHEDULERS = {"dpmsolver++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}


class StandIn:
    """A deterministic stand-in for a DiT: (x, t, y) -> (N, 2C, H, W) (or C channels without the learned
    variance), smooth in x and t, different per class; it records every call's (x, t, y)."""

    def __init__(self, learn_sigma: bool = True, variance: float = 0.3) -> None:
        self.learn_sigma, self.variance, self.calls = learn_sigma, variance, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone(), y.clone()))
        s = (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        label = (y.to(x.dtype) + 1).view(-1, 1, 1, 1)
        out = 0.8 * torch.tanh(x * (1 + s)) + 0.1 * label * torch.cos(x + s)
        return torch.cat([out, torch.full_like(out, self.variance)], 1) if self.learn_sigma else out


def by_hand(name, options, diffusion, model, x, y, steps, clip=False, noises=None):
    """diffusers' loop as `DiTPipeline` runs it: set_timesteps, then per timestep the model, the first C
    channels of its output, `step`."""
    scheduler = SCHEDULERS[name](
        num_train_timesteps=diffusion.num_timesteps,
        trained_betas=diffusion.betas.numpy(),
        prediction_type=DIFFUSERS_PREDICTION[diffusion.predict],
        **options,
        **({"thresholding": True, "sample_max_value": 1.0} if clip else {}),
    )
    scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps):
        out = model(x, t.repeat(len(x)), y)[:, : x.shape[1]]
        extra = {"variance_noise": noises[i]} if noises is not None else {}
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x


CASES = [
    ("dpmsolver++", {}, "epsilon", True),
    ("dpmsolver++", {"solver_order": 3, "lower_order_final": False}, "v", True),
    ("dpmsolver++", {"solver_type": "heun", "use_karras_sigmas": True}, "x0", False),
    ("dpmsolver++", {"use_lu_lambdas": True, "timestep_spacing": "trailing"}, "epsilon", True),
    ("unipc", {}, "epsilon", True),
    (
        "unipc",
        {"solver_order": 3, "solver_type": "bh1", "predict_x0": False, "final_sigmas_type": "sigma_min"},
        "v",
        True,
    ),
    ("unipc", {"disable_corrector": [0], "final_sigmas_type": "sigma_min"}, "x0", False),
]


@pytest.mark.parametrize(("name", "options", "predict", "learn_sigma"), CASES)
@pytest.mark.parametrize("clip", [False, True])
def test_the_wrapper_follows_diffusers_loop_by_hand(name, options, predict, learn_sigma, clip):
    diffusion = create_diffusion(predict=predict, learn_sigma=learn_sigma)
    x = torch.randn(3, 2, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    ours, theirs = StandIn(learn_sigma), StandIn(learn_sigma)
    out = get_sampler(name, **options).run(diffusion, ours, x, 7, None, {"y": y}, clip_denoised=clip)
    expected = by_hand(name, options, diffusion, theirs, x, y, 7, clip=clip)
    # Both sides run diffusers' arithmetic on the same inputs: anything but equality is the wrapper's.
    assert len(ours.calls) == len(theirs.calls) == 7  # one model evaluation per step
    for (x_a, t_a, y_a), (x_b, t_b, y_b) in zip(ours.calls, theirs.calls, strict=True):
        assert torch.equal(t_a, t_b) and t_a.dtype == torch.long and torch.equal(y_a, y_b)
        torch.testing.assert_close(x_a, x_b, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.dtype == F64 and torch.isfinite(out).all()


def test_the_variance_channels_do_not_reach_the_solver():
    # diffusers' own variance_type="learned_range" keeps 3 channels whatever C is; ditlab gives the solver C.
    diffusion = create_diffusion()
    x = torch.randn(2, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1])
    for name in SCHEDULERS:
        a = get_sampler(name).run(diffusion, StandIn(variance=-1.0), x, 5, None, {"y": y})
        b = get_sampler(name).run(diffusion, StandIn(variance=0.9), x, 5, None, {"y": y})
        assert a.shape == x.shape and torch.equal(a, b)


@pytest.mark.parametrize("predict", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("clip", [False, True])
def test_first_order_dpm_solver_is_ddim_and_its_sde_is_ddim_with_eta_1(predict, clip):
    # An independent check of the wiring (betas, prediction type, timesteps, variance channels, clipping):
    # DPM-Solver-1 in the data-prediction form is DDIM (η = 0), and SDE-DPM-Solver-1 is DDIM with η = 1
    # (its noise scale σ_t·√(1 − e^{−2h}) is DDIM's σ_η at η = 1). On ditlab's "ddim10" process with
    # "trailing" spacing the scheduler walks DDIM's timesteps 900, 800, ..., 0 and then lands on the data
    # (σ = 0, DDIM's ᾱ_prev = 1). diffusers keeps the state, ᾱ and σ in float32 (6e-8 per operation),
    # amplified up to 1/√ᾱ_900 ≈ 12× by the x0 prediction of the first steps, over 10 steps: 1e-5 of
    # max(|x|, 1) bounds it (measured: ≤ 3e-6).
    diffusion = create_diffusion(predict=predict)
    process = diffusion.respace("ddim10")
    x = torch.randn(3, 2, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([2, 0, 1])
    noises = iter(torch.randn(10, *x.shape, dtype=F64, generator=torch.Generator().manual_seed(4)))
    fixed = lambda: next(noises)  # noqa: E731
    options = {"solver_order": 1, "timestep_spacing": "trailing"}
    ddim = get_sampler("ddim").run(diffusion, StandIn(), x, 10, None, {"y": y}, clip_denoised=clip)
    dpm = get_sampler("dpmsolver++", **options).run(process, StandIn(), x, 10, None, {"y": y}, clip)
    torch.testing.assert_close(dpm, ddim, rtol=1e-5, atol=1e-5)

    sde = get_sampler("dpmsolver++", algorithm_type="sde-dpmsolver++", **options)
    assert sde.stochastic
    noisy_ddim = get_sampler("ddim", eta=1.0).run(diffusion, StandIn(), x, 10, fixed, {"y": y}, clip)
    noises = iter(torch.randn(10, *x.shape, dtype=F64, generator=torch.Generator().manual_seed(4)))
    noisy_dpm = sde.run(process, StandIn(), x, 10, fixed, {"y": y}, clip)
    torch.testing.assert_close(noisy_dpm, noisy_ddim, rtol=1e-5, atol=1e-5)
    assert (noisy_dpm - dpm).abs().max() > 0.1  # the noise did something


def test_the_sde_variant_keeps_each_image_independent_of_its_batch():
    diffusion = create_diffusion()
    spec = SamplingSpec("dpmsolver++", {"algorithm_type": "sde-dpmsolver++"}, steps=6, cfg_scale=2.0, seed=7)
    labels = torch.tensor([0, 1, 2, 0, 1])

    def draw(indices, seed=7):
        gens = image_generators(seed, indices, "cpu")
        return sample(
            StandIn(), diffusion, gens, (1, 4, 4), spec, labels=labels[list(indices)], num_classes=3
        )[0]

    whole = draw(range(5))
    split = torch.cat([draw(range(2)), draw(range(2, 5))])
    torch.testing.assert_close(split, whole, rtol=0, atol=0)
    assert (draw(range(5), seed=8) - whole).abs().max() > 0.1


@pytest.mark.parametrize("name", ["dpmsolver++", "unipc"])
def test_guided_sampling_with_an_interval_guides_the_steps_inside_it(name):
    # sample() with guidance on the interval [0.3, 0.7] of the way to the data = the hand loop with the
    # guided output ε_u + s·(ε_c − ε_u) where 0.3 ≤ 1 − t/999 ≤ 0.7 and ε_c elsewhere; the model is called
    # with the original timesteps, and a guided step costs two evaluations (one doubled batch).
    diffusion, steps, scale = create_diffusion(), 10, 3.0
    spec = SamplingSpec(name, steps=steps, cfg_scale=scale, cfg_interval=(0.3, 0.7), seed=2)
    labels = torch.tensor([0, 2])
    gens = image_generators(2, range(2), "cpu")
    model = StandIn()
    evaluations = Evaluations()
    out, _ = sample(
        model, diffusion, gens, (1, 4, 4), spec, labels=labels, num_classes=3, evaluations=evaluations
    )

    inner = StandIn()

    def guided(x, t, y):
        cond = inner(x, t, y)
        fraction = 1 - t[0].item() / 999
        if not 0.3 <= fraction <= 0.7:
            return cond
        uncond = inner(x, t, torch.full_like(y, 3))
        return torch.cat([uncond[:, :1] + scale * (cond[:, :1] - uncond[:, :1]), cond[:, 1:]], 1)

    x = torch.stack([torch.randn((1, 4, 4), generator=g) for g in image_generators(2, range(2), "cpu")])
    expected = by_hand(name, {}, diffusion, guided, x, labels, steps)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # float32: batch-doubled vs not

    timesteps = [int(t[0]) for _, t, _ in model.calls]
    assert timesteps == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    doubled = [t for x, t, _ in model.calls if len(x) == 4]
    assert [int(t[0]) for t in doubled] == [699, 599, 500, 400, 300]
    assert evaluations.per_image == steps + 5


def test_bad_options_and_objectives_fail_in_one_line():
    for name, options, match in [
        (
            "dpmsolver++",
            {"solver_order": 4},
            r"sampler.options.solver_order=4: dpmsolver\+\+ takes 1 \| 2 \| 3",
        ),
        ("dpmsolver++", {"algorithm_type": "dpm"}, "algorithm_type=dpm"),
        (
            "dpmsolver++",
            {"order": 2},
            r"sampler.options.order: order is not an option of sampler dpmsolver\+\+",
        ),
        ("unipc", {"solver_type": "midpoint"}, "solver_type=midpoint: unipc takes bh1 | bh2"),
        ("unipc", {"solver_order": 0}, "solver_order=0"),
        ("unipc", {"predict_x0": False}, "final_sigmas_type=sigma_min"),
        ("unipc", {"disable_corrector": 0}, r"disable_corrector=0: unipc takes a list of step indices"),
        ("unipc", {"disable_corrector": ["first"]}, r"disable_corrector=\['first'\]"),
        ("unipc", {"disable_corrector": None}, r"disable_corrector=None"),
        ("unipc", {"disable_corrector": {"0": 1}}, r"disable_corrector=\{'0': 1\}"),
    ]:
        with pytest.raises(ValueError, match=match) as error:
            SamplingSpec(name, options)
        assert "\n" not in str(error.value)
    with pytest.raises(
        ValueError, match=r"sampler=unipc samples a GaussianDiffusion, not this model's"
    ) as error:
        check_fits(get_sampler("unipc"), Interpolant())
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="steps=1001"):
        get_sampler("unipc").run(
            create_diffusion(), StandIn(), torch.zeros(1, 1, 2, 2), 1001, None, {"y": None}
        )
