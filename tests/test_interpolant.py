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
from ditlab.diffusion.interpolant import shift_time
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
@pytest.mark.parametrize("predict", ["velocity", "noise", "score", "data"])
def test_every_prediction_converts_to_the_exact_velocity_and_score(path, predict):
    torch.manual_seed(1)
    c = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    velocity, score = gaussian_fields(path, c)
    objective = Interpolant(path, predict, learn_sigma=False)
    for t in (0.2, 0.5, 0.8):
        a, s, _, _ = PATH_COEFFICIENTS[path](t)
        # data: the oracle E[x1 | x_t] = c of a point mass (σ_t > JiT's clip 0.05 at these t)
        out = {
            "velocity": velocity(x, t),
            "noise": (x - a * c) / s,
            "score": score(x, t),
            "data": c.expand_as(x),
        }
        out = out[predict]
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
        ({"time_shift": 0.0}, "diffusion.time_shift"),
        ({"loss": "eps"}, "diffusion.loss"),
        ({"predict": "data", "clip_sigma": 0.0}, "diffusion.clip_sigma"),
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


# ---- x-prediction (JiT, Li & He 2025) -------------------------------------------------------------------

JIT_T_EPS = 0.05  # JiT's t_eps: the velocity's division by 1 − t is by max(1 − t, 0.05)


@pytest.mark.parametrize("path", PATH_COEFFICIENTS)
def test_data_prediction_loss_is_jits_velocity_loss_and_x_loss_is_plain(path):
    torch.manual_seed(7)
    x1 = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x1)
    t = torch.tensor([0.0, 0.3, 0.9, 0.99], dtype=torch.float64)  # 0.99: inside the clip on both paths
    y = torch.tensor([0, 1, 2, 0])
    velocity_loss = Interpolant(path, "data").training_losses(
        stand_in, x1, t=t, noise=eps, model_kwargs={"y": y}
    )
    x_loss = Interpolant(path, "data", loss="x").training_losses(
        stand_in, x1, t=t, noise=eps, model_kwargs={"y": y}
    )
    for i in range(4):
        a, s, da, ds = PATH_COEFFICIENTS[path](float(t[i]))
        z = a * x1[i] + s * eps[i]
        x_hat = stand_in(z[None], t[i : i + 1], y[i : i + 1])[0, :2]
        if path == "linear":  # JiT's own lines: v = (x − z)/max(1 − t, t_eps), v̂ = (x̂ − z)/max(1 − t, t_eps)
            v, v_hat = ((x - z) / max(1 - float(t[i]), JIT_T_EPS) for x in (x1[i], x_hat))
        else:  # the same conversion on GVP: ((α'σ − ασ')·x + σ'·z) / max(σ, t_eps)
            v, v_hat = (((da * s - a * ds) * x + ds * z) / max(s, JIT_T_EPS) for x in (x1[i], x_hat))
        if s >= JIT_T_EPS:  # outside the clip the target is the true velocity α'·x1 + σ'·ε
            torch.testing.assert_close(v, da * x1[i] + ds * eps[i], rtol=1e-12, atol=1e-12)
        assert float(velocity_loss["loss"][i]) == pytest.approx(float((v_hat - v).pow(2).mean()), rel=1e-12)
        assert float(x_loss["loss"][i]) == pytest.approx(float((x_hat - x1[i]).pow(2).mean()), rel=1e-12)


def true_outputs(path: str, x1: torch.Tensor, eps: torch.Tensor, t: float) -> tuple[torch.Tensor, dict]:
    """x_t and what each prediction's exact model outputs there, from (x1, ε) in closed form."""
    a, s, da, ds = PATH_COEFFICIENTS[path](t)
    outputs = {"velocity": da * x1 + ds * eps, "noise": eps, "score": -eps / s, "data": x1}
    return a * x1 + s * eps, outputs


@pytest.mark.parametrize("path", PATH_COEFFICIENTS)
@pytest.mark.parametrize("predict", ["velocity", "noise", "score", "data"])
def test_round_trips_between_predictions(path, predict):
    """Each prediction's exact output converts to the exact clean image, velocity and score (so any one
    converts to any other), and the velocity/x losses of an exact model are zero."""
    torch.manual_seed(8)
    x1 = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    eps = torch.randn_like(x1)
    objective = Interpolant(path, predict, learn_sigma=False)
    for t in (0.1, 0.5, 0.9):
        x_t, outputs = true_outputs(path, x1, eps, t)
        t_batch = torch.full((3,), t, dtype=torch.float64)
        out = outputs[predict]
        torch.testing.assert_close(objective.data_prediction(out, x_t, t_batch), x1, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(
            objective.velocity(out, x_t, t_batch), outputs["velocity"], rtol=1e-10, atol=1e-10
        )
        torch.testing.assert_close(
            objective.score(out, x_t, t_batch), outputs["score"], rtol=1e-10, atol=1e-10
        )
    t = torch.full((3,), 0.4, dtype=torch.float64)

    def exact(x, t_model):
        return true_outputs(path, x1, eps, 0.4)[1][predict]

    for loss in ("velocity", "x"):
        losses = Interpolant(path, predict, loss=loss, learn_sigma=False).training_losses(
            exact, x1, t=t, noise=eps
        )
        assert float(losses["loss"].abs().max()) < 1e-20


@pytest.mark.parametrize("path", PATH_COEFFICIENTS)
def test_the_clip_acts_only_near_the_data_end(path):
    """The division by σ_t vanishes at t = 1, the *data* end in this (and JiT's) convention, not at the noise
    end: JiT's clip changes the velocity only where σ_t < 0.05 and keeps it finite at t = 1."""
    torch.manual_seed(9)
    x = torch.randn(101, 1, 2, 2, dtype=torch.float64)
    x_hat = torch.randn_like(x)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    clipped = Interpolant(path, "data", learn_sigma=False).velocity(x_hat, x, t)
    unclipped = Interpolant(path, "data", learn_sigma=False, clip_sigma=1e-300).velocity(x_hat, x, t)
    sigma = torch.tensor([PATH_COEFFICIENTS[path](float(ti))[1] for ti in t])
    inside = sigma < JIT_T_EPS
    assert inside.any() and bool((t[inside] > 0.9).all())  # only the last few percent towards the data
    torch.testing.assert_close(clipped[~inside], unclipped[~inside], rtol=0, atol=0)
    assert bool((clipped[inside] != unclipped[inside]).any().item())
    assert float(clipped.abs().max()) < 1e3 < 1e10 < float(unclipped[-1].abs().max())  # 1/σ at t = 1


# ---- time shift (SD3, Esser et al. 2024; RAE, Zheng et al. 2025) -----------------------------------------


def test_time_shift_is_sd3s_in_this_convention():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert shift_time(t, 1.0) is t  # s = 1: no arithmetic at all
    for s in (0.5, 3.0, 7.0):
        shifted = shift_time(t, s)
        sd3 = s * (1 - t) / (1 + (s - 1) * (1 - t))  # SD3 shifts the noise fraction 1 − t
        torch.testing.assert_close(shifted, 1 - sd3, rtol=1e-12, atol=1e-12)
        assert float(shifted[0]) == 0.0 and float(shifted[-1]) == 1.0  # the ends stay
        assert bool((shifted.diff() > 0).all())  # monotone
        # The median of uniform times, 1/2, goes to 1/(1 + s): towards the noise for s > 1.
        assert float(shift_time(torch.tensor(0.5, dtype=torch.float64), s)) == pytest.approx(
            1 / (1 + s), rel=1e-12
        )
        assert bool((shifted[1:-1] < t[1:-1]).all()) == (s > 1)


def test_training_times_shift_and_s1_is_bit_identical():
    for kwargs in ({"predict": "velocity"}, {"predict": "noise", "time_sampling": "logit_normal"}):
        plain = Interpolant("linear", **kwargs).sample_t(1000, torch.Generator().manual_seed(3))
        same = Interpolant("linear", time_shift=1.0, **kwargs).sample_t(
            1000, torch.Generator().manual_seed(3)
        )
        assert torch.equal(plain, same)
        objective = Interpolant("linear", time_shift=3.0, **kwargs)
        eps = objective.train_eps
        u = (plain - eps) / (1 - 2 * eps)
        shifted = objective.sample_t(1000, torch.Generator().manual_seed(3))
        torch.testing.assert_close(shifted, eps + (1 - 2 * eps) * u / (u + 3 * (1 - u)), rtol=1e-5, atol=1e-6)
        assert float(shifted.median()) < float(plain.median())


def recorded_times(sampler, objective, steps):
    times = []

    def model(x, t, y):
        times.append(float(t[0]))
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)

    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    sampler.run(
        objective, model, x, steps, lambda: torch.zeros_like(x), {"y": torch.zeros(1, dtype=torch.long)}
    )
    return times


def test_the_samplers_time_grid_shifts_and_s1_is_todays():
    objective = Interpolant("linear", "noise")  # sample_eps 1e-3: the grid runs over [1e-3, 1 − 1e-3]
    t0, t1 = objective.sample_interval()
    u = [i / 4 for i in range(4)]
    by_hand = [t0 + (t1 - t0) * ui / (ui + 3 * (1 - ui)) for ui in u]  # Euler's left ends, s = 3
    assert recorded_times(get_sampler("euler", time_shift=3.0), objective, 4) == pytest.approx(
        by_hand, abs=1e-15
    )
    today = torch.linspace(t0, t1, 5, dtype=torch.float64)[:-1].tolist()
    assert recorded_times(get_sampler("euler"), objective, 4) == today  # exactly the equal steps
    assert recorded_times(get_sampler("euler", time_shift=1.0), objective, 4) == today
    t0, t1 = objective.sample_interval(sde=True, last_step_size=0.04)
    sde = recorded_times(get_sampler("euler_maruyama", time_shift=3.0), objective, 4)
    assert sde == pytest.approx([t0 + (t1 - t0) * ui / (ui + 3 * (1 - ui)) for ui in u] + [t1], abs=1e-15)
    with pytest.raises(ValueError, match="time_shift"):
        get_sampler("heun", time_shift=0)
    with pytest.raises(ValueError, match="not an option of sampler dopri5"):
        get_sampler("dopri5", time_shift=3.0)  # adaptive: no grid to shift
