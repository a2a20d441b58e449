"""SiT's interpolant objective and its samplers, in float64, against the definitions (SiT §2–3):
x_t = α_t·x1 + σ_t·ε (t = 1 the data), v = α'·x1 + σ'·ε, s = ∇ log p_t, the probability-flow ODE
dx/dt = v and the SDE dx = (v + w·s) dt + sqrt(2w) dW."""

import math
import re

import pytest
import torch

from ditlab.diffusion import (
    GaussianDiffusion,
    Interpolant,
    SamplingSpec,
    cfg_model_fn,
    create_diffusion,
    get_sampler,
    sample,
)
from ditlab.diffusion.sampling import Evaluations, seeded_generator

PATH_COEFFICIENTS = {  # (α, σ, α', σ') of t, written out from the paper
    "linear": lambda t: (t, 1 - t, 1.0, -1.0),
    "gvp": lambda t: (
        math.sin(math.pi * t / 2),
        math.cos(math.pi * t / 2),
        math.pi / 2 * math.cos(math.pi * t / 2),
        -math.pi / 2 * math.sin(math.pi * t / 2),
    ),
}


def stand_in(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear 'model' with a learn_sigma-shaped output (2C channels)."""
    head = torch.tanh(x) * (1 + t.reshape(-1, 1, 1, 1)) + 0.1 * y.reshape(-1, 1, 1, 1)
    return torch.cat([head, torch.full_like(head, 7.0)], dim=1)


@pytest.mark.parametrize("path", PATH_COEFFICIENTS)
@pytest.mark.parametrize("predict", ["velocity", "noise", "score"])
def test_loss_is_the_definition(path, predict):
    torch.manual_seed(0)
    x1 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x1)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    objective = Interpolant(path, predict)
    losses = objective.training_losses(stand_in, x1, t=t, noise=eps, model_kwargs={"y": y})
    for i in range(3):
        a, s, da, ds = PATH_COEFFICIENTS[path](float(t[i]))
        x_t = a * x1[i] + s * eps[i]
        out = stand_in(x_t[None], t[i : i + 1], y[i : i + 1])[0, :2]  # the variance half is unused
        if predict == "velocity":
            error = out - (da * x1[i] + ds * eps[i])
        elif predict == "noise":
            error = out - eps[i]
        else:  # the score −ε/σ, trained as σ·s + ε
            error = s * out + eps[i]
        assert float(losses["loss"][i]) == pytest.approx(float(error.pow(2).mean()), rel=1e-12)


def gaussian_fields(path: str, c: torch.Tensor):
    """The exact velocity and score of data = the point mass at c: p_t = N(α_t·c, σ_t²·I)."""

    def velocity(x, t):
        a, s, da, ds = PATH_COEFFICIENTS[path](t)
        return da * c + ds / s * (x - a * c)  # v = α'·x1 + σ'·ε with ε = (x − α·c)/σ

    def score(x, t):
        a, s, _, _ = PATH_COEFFICIENTS[path](t)
        return -(x - a * c) / s**2

    return velocity, score


@pytest.mark.parametrize("path", PATH_COEFFICIENTS)
@pytest.mark.parametrize("predict", ["velocity", "noise", "score"])
def test_every_prediction_converts_to_the_exact_velocity_and_score(path, predict):
    torch.manual_seed(1)
    c = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    velocity, score = gaussian_fields(path, c)
    objective = Interpolant(path, predict, learn_sigma=False)
    for t in (0.2, 0.5, 0.8):
        a, s, _, _ = PATH_COEFFICIENTS[path](t)
        out = {"velocity": velocity(x, t), "noise": (x - a * c) / s, "score": score(x, t)}[predict]
        t_batch = torch.full((4,), t, dtype=torch.float64)
        torch.testing.assert_close(
            objective.velocity(out, x, t_batch), velocity(x, t), rtol=1e-10, atol=1e-10
        )
        torch.testing.assert_close(objective.score(out, x, t_batch), score(x, t), rtol=1e-10, atol=1e-10)


def exact_model(path: str, c: torch.Tensor):
    velocity, _ = gaussian_fields(path, c)

    def model(x, t, y):
        v = torch.stack([velocity(x[i], float(t[i])) for i in range(len(t))]).reshape(x.shape)
        return torch.cat([v, torch.zeros_like(v)], dim=1)

    return model


def fixed_noise(z: torch.Tensor):
    return lambda: z


def test_one_euler_and_one_heun_step():
    torch.manual_seed(2)
    x0 = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    objective = Interpolant("gvp")

    def v(x, t):
        return stand_in(x, torch.full((2,), t, dtype=torch.float64), y)[:, :1]

    euler = get_sampler("euler").run(objective, stand_in, x0, 2, None, {"y": y})
    x_half = x0 + 0.5 * v(x0, 0.0)
    torch.testing.assert_close(euler, x_half + 0.5 * v(x_half, 0.5), rtol=1e-12, atol=1e-12)
    heun = get_sampler("heun").run(objective, stand_in, x0, 1, None, {"y": y})
    predicted = x0 + v(x0, 0.0)
    torch.testing.assert_close(heun, x0 + 0.5 * (v(x0, 0.0) + v(predicted, 1.0)), rtol=1e-12, atol=1e-12)


def test_one_euler_maruyama_step_and_the_mean_last_step():
    torch.manual_seed(3)
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    z = torch.randn_like(x)
    y = torch.zeros(2, dtype=torch.long)
    objective = Interpolant("linear")
    h = 0.04
    sde = get_sampler("euler_maruyama", last_step_size=h)
    evaluations = Evaluations()
    out = sde.run(objective, evaluations.count(stand_in), x, 1, fixed_noise(z), {"y": y})

    def drift(x, t):  # v + w·s with w = σ_t (SiT's "sigma" form, norm 1) and s from the velocity
        a, s, da, ds = PATH_COEFFICIENTS["linear"](t)
        v = stand_in(x, torch.full((2,), t, dtype=torch.float64), y)[:, :1]
        score = (a / da * v - x) / (s**2 - a / da * ds * s)
        return v + s * score, s

    d, w = drift(x, 0.0)
    dt = 1 - h
    x_next = x + d * dt + math.sqrt(2 * w * dt) * z
    expected = x_next + h * drift(x_next, 1 - h)[0]  # "Mean": no noise in the last step
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert evaluations.rows == 2 * len(x)  # one step and the last: 2 evaluations per image


def point_mass_case(path: str, sample_eps: float):
    """(objective, model with the exact field of the point mass c, x0, labels, the exact end point)."""
    torch.manual_seed(5)
    c = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    x0 = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    objective = Interpolant(path, sample_eps=sample_eps)
    t0, t1 = objective.sample_interval()
    (a0, s0, _, _), (a1, s1, _, _) = PATH_COEFFICIENTS[path](t0), PATH_COEFFICIENTS[path](t1)
    # the exact field moves x along x_t = α_t·c + σ_t·ε, with ε fixed by the start: x0 at t0
    end = a1 * c + s1 * (x0 - a0 * c) / s0
    return objective, exact_model(path, c), x0, torch.zeros(5, dtype=torch.long), end, c


@pytest.mark.parametrize(
    ("sampler", "sample_eps", "tolerance"), [("euler", 0.0, 1e-12), ("heun", 1e-3, 1e-12)]
)
def test_odes_with_the_exact_velocity_recover_a_point_mass(sampler, sample_eps, tolerance):
    # On the linear path the exact field of a point mass is constant along trajectories (x1 − x0): a
    # fixed-step solver follows it exactly. Euler never evaluates t = 1 (where the field is 0/0) and lands
    # on c itself; Heun does, so it stops at 1 − 1e-3, on the exact trajectory.
    objective, model, x0, y, end, c = point_mass_case("linear", sample_eps)
    out = get_sampler(sampler).run(objective, model, x0, 3, None, {"y": y})
    torch.testing.assert_close(out, end, rtol=0, atol=tolerance)
    assert float((out - c).abs().max()) < 2e-3 * float((x0 - c).abs().max())


def test_euler_and_heun_converge_at_their_order():
    # On the GVP path the exact trajectory is curved: Euler's error falls 4× with 4× the steps (first
    # order), Heun's 16× (second order).
    objective, model, x0, y, end, _ = point_mass_case("gvp", 0.05)

    def error(sampler: str, steps: int) -> float:
        return float(
            (get_sampler(sampler).run(objective, model, x0, steps, None, {"y": y}) - end).abs().max()
        )

    assert 3.5 < error("euler", 100) / error("euler", 400) < 4.5
    assert 12 < error("heun", 25) / error("heun", 100) < 24  # 16 asymptotically


def test_dopri5_meets_its_tolerances():
    objective, model, x0, y, end, _ = point_mass_case("gvp", 0.05)
    loose, tight = get_sampler("dopri5"), get_sampler("dopri5", atol=1e-10, rtol=1e-9)
    counts = Evaluations(), Evaluations()
    out = tight.run(objective, counts[1].count(model), x0, 1, None, {"y": y})
    assert float((out - end).abs().max()) < 1e-7
    loose.run(objective, counts[0].count(model), x0, 1, None, {"y": y})
    assert counts[1].rows > counts[0].rows > 0  # adaptive: more evaluations for tighter tolerances


def test_the_sde_with_the_exact_fields_recovers_a_point_mass():
    torch.manual_seed(5)
    c = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    x0 = torch.randn(200, 1, 2, 2, dtype=torch.float64)
    y = torch.zeros(200, dtype=torch.long)
    sde = get_sampler("euler_maruyama")
    out = sde.run(
        Interpolant("linear"), exact_model("linear", c), x0, 100, lambda: torch.randn_like(x0), {"y": y}
    )
    # What is left is of the size of σ at the last step (0.04): the noise the "Mean" step does not remove.
    assert float((out - c).abs().mean()) < 0.06
    assert float((x0 - c).abs().mean()) > 0.5


def test_time_sampling_uniform_and_logit_normal():
    g = torch.Generator().manual_seed(0)
    uniform = Interpolant("linear", "noise", "uniform", train_eps=0.01).sample_t(20000, g)
    assert float(uniform.min()) >= 0.01 and float(uniform.max()) <= 0.99
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.01)
    t = Interpolant("linear", "velocity", "logit_normal", logit_mean=0.5, logit_std=0.8).sample_t(20000, g)
    logit = torch.log(t / (1 - t))
    assert float(logit.mean()) == pytest.approx(0.5, abs=0.03)
    assert float(logit.std()) == pytest.approx(0.8, abs=0.03)


def test_guidance_interval_guides_only_inside_and_all_channels():
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    y = torch.tensor([1, 1])

    def model(x, t, y):  # cond (y=1) and null (y=2) outputs differ
        return torch.cat([x * y.reshape(-1, 1, 1, 1), x], dim=1)

    guided = cfg_model_fn(model, 4.0, null_class=2, interval=(0.3, 0.6))
    inside = guided(x, torch.tensor([0.5, 0.5], dtype=torch.float64), y)
    outside = guided(x, torch.tensor([0.9, 0.9], dtype=torch.float64), y)
    mixed = guided(x, torch.tensor([0.5, 0.9], dtype=torch.float64), y)
    torch.testing.assert_close(inside[:, :3], x * 2 + 4.0 * (x * 1 - x * 2))  # all 3 channels guided
    torch.testing.assert_close(outside, model(x, torch.zeros(2), y))
    torch.testing.assert_close(mixed[0], inside[0])
    torch.testing.assert_close(mixed[1], outside[1])


def test_guidance_intervals_mean_the_same_for_both_objectives():
    """cfg_interval is a fraction of the way from the noise (0) to the data (1): the interpolant's t, and
    1 − t/(T − 1) for DDPM timesteps, also in a respaced process (called with the original timesteps)."""
    ddpm = create_diffusion()
    for process in (ddpm, ddpm.respace("ddim50"), ddpm.respace("250")):
        assert process.data_fraction(torch.tensor([999, 699, 300, 0])).tolist() == pytest.approx(
            [0.0, 1 - 699 / 999, 1 - 300 / 999, 1.0], abs=1e-15
        )
    interpolant = Interpolant("linear", "velocity")
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.equal(interpolant.data_fraction(t), t.double())

    def model(x, t, y):  # the guided output moves away from the conditional one only where guided
        return x * (y == 0).reshape(-1, 1, 1, 1)

    guided = cfg_model_fn(model, 3.0, null_class=1, interval=(0.3, 0.7), data_fraction=ddpm.data_fraction)
    x, y = torch.ones(4, 1, 1, 1), torch.zeros(4, dtype=torch.long)
    out = guided(x, torch.tensor([999, 700, 600, 100]), y).flatten()  # fractions 0, 0.2993, 0.3994, 0.8999
    assert out.tolist() == [1.0, 1.0, 3.0, 1.0]


def test_a_sampler_of_the_other_objective_is_one_clear_error():
    model = stand_in
    gens = [seeded_generator(0, i) for i in range(2)]
    with pytest.raises(ValueError, match=re.escape("use sampler=euler | heun | dopri5 | euler_maruyama")):
        sample(model, Interpolant(), gens, (1, 2, 2), SamplingSpec("ddim", steps=2), num_classes=3)
    with pytest.raises(ValueError, match=re.escape("use sampler=ddpm | ddim")):
        sample(model, create_diffusion(), gens, (1, 2, 2), SamplingSpec("euler", steps=2), num_classes=3)
    assert isinstance(create_diffusion(), GaussianDiffusion)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"path": "vp"}, "diffusion.path"),
        ({"predict": "x0"}, "diffusion.predict"),
        ({"time_sampling": "beta"}, "diffusion.time_sampling"),
        ({"predict": "noise", "train_eps": 0.0}, "diffusion.train_eps"),
        ({"logit_std": 0.0}, "diffusion.logit_std"),
    ],
)
def test_bad_settings_name_their_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Interpolant(**kwargs)


def test_sampling_is_per_image_and_guided_flow_sampling_runs():
    torch.manual_seed(6)

    def model(x, t, y):
        return stand_in(x, t, y.clamp(max=2))

    objective = Interpolant("linear")
    both, _ = sample(
        model,
        objective,
        [seeded_generator(3, i) for i in range(2)],
        (1, 2, 2),
        SamplingSpec("heun", steps=4, cfg_scale=2.0),
        labels=torch.tensor([0, 1]),
        num_classes=3,
    )
    second, _ = sample(
        model,
        objective,
        [seeded_generator(3, 1)],
        (1, 2, 2),
        SamplingSpec("heun", steps=4, cfg_scale=2.0),
        labels=torch.tensor([1]),
        num_classes=3,
    )
    torch.testing.assert_close(both[1:], second)
