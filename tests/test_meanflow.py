"""MeanFlow (Geng et al. 2025) as the objective `meanflow`, in ditlab's time (t = 0 the noise, 1 the data; a
step from t to r ≥ t), in float64 where numerical: the identity u = v + (r − t)·du/dt against closed forms
(a point mass, Gaussian data) and finite differences, its stop-gradients and adaptive weight, the sampler,
the JVP through every conditioning block with the second time, the paper's DiT unchanged, the config and
the refusals."""

import pytest
import torch
from hydra import compose, initialize_config_dir

from ditlab.design import DesignPoint
from ditlab.diffusion import MeanFlow, SamplingSpec, build_objective, create_diffusion, get_sampler, sample
from ditlab.diffusion.meanflow import average_velocity_and_derivative
from ditlab.diffusion.sampling import Evaluations, check_fits, image_generators
from ditlab.interop.formats import identify
from ditlab.models import build_dit, complete_config
from test_arch_axes import FINGERPRINTS, OPTIONS, PAPER_BLOCKS, fingerprint_output, randomize
from test_train import CONF

F64 = torch.float64


def point_mass(c: torch.Tensor):
    """The exact average velocity of data that is the point c: u(z, t, r) = (c − z)/(1 − t) for every r (the
    paper's (z − c)/t in its time): the straight line from z_t through c, whatever the interval."""

    def u(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, r: torch.Tensor | None = None):
        return (c - z) / (1 - t).reshape(-1, 1, 1, 1)

    return u


def times(t: list[float], r: list[float]) -> torch.Tensor:
    return torch.tensor([t, r], dtype=F64).T  # (N, 2): columns t and r, as `MeanFlow.sample_t` gives them


def test_the_exact_average_velocity_of_a_point_mass_has_zero_loss():
    """Through the real loss, its JVP included: du/dt = 0 along the line, so the target is v = c − ε = u."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 4, 4, generator=g, dtype=F64)
    x1 = c.expand(4, -1, -1, -1)
    noise = torch.randn(x1.shape, generator=g, dtype=F64)
    t = times([0.0, 0.3, 0.7, 0.5], [1.0, 0.3, 0.9, 0.95])  # r = t and r > t, up to the data
    y = torch.tensor([0, 1, 2, 0])
    losses = MeanFlow().training_losses(point_mass(c), x1, t=t, noise=noise, model_kwargs={"y": y})
    assert losses["loss"].max() < 1e-18 and losses["mse"].max() < 1e-24  # rounding: Δ ≈ 1e-14
    off = MeanFlow().training_losses(
        lambda z, t, y, r: point_mass(c)(z, t) + 0.1, x1, t=t, noise=noise, model_kwargs={"y": y}
    )
    assert off["mse"] == pytest.approx(torch.full((4,), 0.01, dtype=F64), rel=1e-12)  # it does measure


def test_the_identity_holds_in_this_convention_where_du_dt_is_not_zero():
    """Gaussian data N(0, s²): z_t ~ N(0, σ_t²), σ_t² = t²s² + (1 − t)², its velocity field is v = z·σ_t'/σ_t
    and its flow scales z by σ_r/σ_t, so u = z·(σ_r/σ_t − 1)/(r − t), whose du/dt = (u − v)/(r − t) is not
    0. An example whose x1 − ε is that velocity at z_t (x1 = z + (1 − t)·v, ε = z − t·v) has the target
    v + (r − t)·du/dt = u exactly: the identity's sign in ditlab's time (the point mass cannot show it)."""
    s = 0.5
    g = torch.Generator().manual_seed(6)
    t = times([0.0, 0.2, 0.5], [0.6, 1.0, 0.7])
    t4 = t[:, :1, None, None]

    def sigma(t: torch.Tensor) -> torch.Tensor:
        return (t**2 * s**2 + (1 - t) ** 2).sqrt()

    def exact(z, t, y=None, r=None):
        t, r = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
        return z * (sigma(r) / sigma(t) - 1) / (r - t)

    z = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    v = z * (t4 * s**2 - (1 - t4)) / sigma(t4) ** 2
    x1, noise = z + (1 - t4) * v, z - t4 * v
    losses = MeanFlow().training_losses(exact, x1, t=t, noise=noise, model_kwargs={"y": None})
    assert losses["mse"].max() < 1e-26
    apart = (exact(z, t[:, 0], r=t[:, 1]) - v).flatten(1).norm(dim=1)
    assert bool((apart > 0.1 * v.flatten(1).norm(dim=1)).all())  # u ≠ v: du/dt ≠ 0


def test_one_and_two_steps_from_the_noise_recover_the_point_mass():
    g = torch.Generator().manual_seed(1)
    c = torch.randn(3, 4, 4, generator=g, dtype=F64)
    noise = torch.randn(5, 3, 4, 4, generator=g, dtype=F64)

    def no_noise() -> torch.Tensor:
        raise AssertionError("meanflow's sampler draws no noise after the start")

    for steps in (1, 2):
        out = get_sampler("meanflow").run(
            MeanFlow(), point_mass(c), noise.clone(), steps, no_noise, {"y": torch.zeros(5, dtype=torch.long)}
        )
        torch.testing.assert_close(out, c.expand_as(out), rtol=0, atol=1e-14)


def smooth(z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, r: torch.Tensor | None = None):
    """A smooth stand-in network u(z, t, r), nonlinear in each."""
    t4, r4 = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
    return torch.tanh(z) * (1 + t4**2) + torch.sin(3 * r4 * z) * t4 + 0.5 * r4 * z**2


def test_the_target_is_the_identity_with_du_dt_by_finite_differences():
    """d/dt u(z_t, t, r) along z_t's path (dz/dt = v), r fixed, by central differences of step h (error
    O(h²) + O(ε/h) ≈ 1e-10 here): the JVP's, and the loss's target v + (r − t)·du/dt with the weight
    1/(‖Δ‖² + c)^p."""
    g = torch.Generator().manual_seed(2)
    x1 = torch.randn(3, 2, 4, 4, generator=g, dtype=F64)
    noise = torch.randn(x1.shape, generator=g, dtype=F64)
    t = times([0.1, 0.4, 0.6], [0.8, 0.4, 0.9])
    t0, r = t[:, 0], t[:, 1]
    z = t0.reshape(-1, 1, 1, 1) * x1 + (1 - t0.reshape(-1, 1, 1, 1)) * noise
    v = x1 - noise

    def u(z, t, r):
        return smooth(z, t, r=r)

    h = 1e-5
    fd = (u(z + h * v, t0 + h, r) - u(z - h * v, t0 - h, r)) / (2 * h)
    out, derivative = average_velocity_and_derivative(u, z, t0, r, v)
    torch.testing.assert_close(out, u(z, t0, r), rtol=0, atol=1e-15)
    torch.testing.assert_close(derivative, fd, rtol=0, atol=1e-8)

    objective = MeanFlow(adaptive_p=0.5, adaptive_c=0.01)
    losses = objective.training_losses(smooth, x1, t=t, noise=noise, model_kwargs={"y": torch.zeros(3)})
    error = (out - (v + (r - t0).reshape(-1, 1, 1, 1) * fd)).flatten(1)
    norm = error.pow(2).sum(1)
    torch.testing.assert_close(losses["mse"], error.pow(2).mean(1), rtol=1e-7, atol=0)
    torch.testing.assert_close(losses["loss"], norm / (norm + 0.01) ** 0.5, rtol=1e-7, atol=0)


def test_the_target_and_the_weight_are_under_stop_gradient():
    """u_θ = a·z + b·t: du/dt = a·v + b. With sg on the target and on w, ∂loss/∂a = w·Σ 2Δ·z and
    ∂loss/∂b = w·Σ 2Δ·t (w = 1/(‖Δ‖² + c), p = 1); without, they would have the target's and w's terms."""
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(2, 1, 3, 3, generator=g, dtype=F64)
    noise = torch.randn(x1.shape, generator=g, dtype=F64)
    t = times([0.2, 0.5], [0.9, 0.7])
    a = torch.tensor(0.7, dtype=F64, requires_grad=True)
    b = torch.tensor(-0.3, dtype=F64, requires_grad=True)
    objective = MeanFlow()
    loss = objective.training_losses(
        lambda z, t, y, r: a * z + b * t.reshape(-1, 1, 1, 1), x1, t=t, noise=noise, model_kwargs={"y": None}
    )["loss"].sum()
    loss.backward()
    with torch.no_grad():
        t0, r = t[:, :1, None, None], t[:, 1:, None, None]
        z, v = t0 * x1 + (1 - t0) * noise, x1 - noise
        delta = a * z + b * t0 - (v + (r - t0) * (a * v + b))
        w = 1 / (delta.pow(2).flatten(1).sum(1) + objective.adaptive_c)
        grad_a = (w * (2 * delta * z).flatten(1).sum(1)).sum()
        grad_b = (w * (2 * delta * t0).flatten(1).sum(1)).sum()
    torch.testing.assert_close(a.grad, grad_a, rtol=1e-12, atol=0)
    torch.testing.assert_close(b.grad, grad_b, rtol=1e-12, atol=0)


def test_training_times_pairs_fraction_and_distributions():
    g = torch.Generator().manual_seed(4)
    pairs = MeanFlow().sample_t(20000, g)
    t, r = pairs[:, 0], pairs[:, 1]
    assert pairs.shape == (20000, 2) and pairs.dtype == torch.float32
    assert bool(((t > 0) & (t <= r) & (r < 1)).all())
    assert float((r != t).float().mean()) == pytest.approx(0.25, abs=0.015)  # the paper's 25%
    # The paper's lognorm(−0.4, 1) of its noise fraction 1 − t: the pairs' times have median sigmoid(0.4).
    assert float(torch.cat([t[r != t], r[r != t]]).median()) == pytest.approx(0.599, abs=0.02)
    assert bool((MeanFlow(fraction_r_neq_t=0).sample_t(1000, g).diff(dim=1) == 0).all())  # flow matching
    uniform = MeanFlow(fraction_r_neq_t=1, time_sampling="uniform").sample_t(20000, g)
    later = uniform[:, 1] - uniform[:, 0]
    assert bool((later >= 0).all()) and float((later > 0).float().mean()) > 0.99
    assert float(uniform[:, 0].mean()) == pytest.approx(1 / 3, abs=0.01)  # the smaller of two uniforms


def tiny(block: str, **options) -> torch.nn.Module:
    return build_dit(
        "DiT-Ti/4", block, input_size=8, in_channels=1, num_classes=3, depth=2, learn_sigma=False, **options
    )


@pytest.mark.parametrize(
    ("block", "options"),
    [*((block, {}) for block in PAPER_BLOCKS), ("adaln_zero", OPTIONS["lightningdit"])],
)
def test_the_jvp_trains_every_block_with_the_second_time(block, options):
    """torch.func.jvp through the DiT (scaled-dot-product attention on its math path): a finite loss, every
    parameter gets gradient, the interval embedding among them; the output depends on r."""
    model = randomize(tiny(block, second_time=True, **options))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 1, 8, 8, generator=g)
    y = torch.tensor([0, 1, 2, 3])  # 3: the null label
    objective = MeanFlow(fraction_r_neq_t=1.0)
    loss = objective.training_losses(model, x, model_kwargs={"y": y}, generator=g)["loss"].mean()
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.count_nonzero()]
    assert not no_grad
    model.eval()
    t = torch.full((4,), 0.3)
    with torch.no_grad():
        assert not torch.equal(model(x, t, y, r=t), model(x, t, y, r=torch.full((4,), 0.9)))
        assert torch.equal(model(x, t, y), model(x, t, y, r=t))  # no r: the interval 0


def test_the_jvp_runs_under_bf16_autocast():
    model = randomize(tiny("adaln_zero", second_time=True))
    x = torch.randn(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MeanFlow().training_losses(model, x, model_kwargs={"y": torch.tensor([0, 1])})["loss"]
    assert loss.dtype == torch.float32 and bool(torch.isfinite(loss).all())


@pytest.mark.parametrize("block", PAPER_BLOCKS)
def test_without_the_second_time_the_dit_is_the_papers(block):
    assert fingerprint_output(block, second_time=False) == pytest.approx(FINGERPRINTS[block], rel=1e-11)
    assert fingerprint_output(block) == pytest.approx(FINGERPRINTS[block], rel=1e-11)
    paper, meanflow = tiny(block), tiny(block, second_time=True)
    assert paper.config["second_time"] is False and paper.r_embedder is None
    assert complete_config({k: v for k, v in paper.config.items() if k != "second_time"}) == paper.config
    extra = {f"r_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    assert meanflow.state_dict().keys() == paper.state_dict().keys() | extra
    assert identify(meanflow.state_dict())["second_time"] and not identify(paper.state_dict())["second_time"]
    with pytest.raises(ValueError, match="takes no second time r: build it with second_time=True"):
        paper(torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long), r=torch.ones(1))


def test_sampling_per_image_nfe_and_guidance():
    """Through `sample`: one evaluation per step (two with CFG), per-image noise, plain CFG on u."""

    def model(x, t, y, r):
        return -x * (1 + r - t).reshape(-1, 1, 1, 1) + 0.1 * y.reshape(-1, 1, 1, 1)

    objective = MeanFlow()
    labels = torch.tensor([0, 1, 2])
    for steps, cfg_scale, nfe in ((1, 1.0, 1), (2, 1.0, 2), (2, 3.0, 4)):
        spec = SamplingSpec(sampler="auto", steps=steps, cfg_scale=cfg_scale)
        evaluations = Evaluations()
        shape = (1, 4, 4)
        generators = image_generators(0, [0, 1, 2], "cpu")
        z, _ = sample(
            model, objective, generators, shape, spec, labels=labels, num_classes=3, evaluations=evaluations
        )
        assert evaluations.per_image == nfe
        alone, _ = sample(
            model, objective, image_generators(0, [1], "cpu"), shape, spec, labels=labels[1:2], num_classes=3
        )
        torch.testing.assert_close(z[1:2], alone, rtol=0, atol=1e-6)
    # One guided step: ε + u_null + s·(u_y − u_null), u_y − u_null = 0.1·(y − 3).
    noise = torch.stack([torch.randn((1, 4, 4), generator=g) for g in image_generators(0, [0, 1, 2], "cpu")])
    spec = SamplingSpec(sampler="meanflow", steps=1, cfg_scale=3.0)
    generators = image_generators(0, [0, 1, 2], "cpu")
    z, _ = sample(model, objective, generators, (1, 4, 4), spec, labels=labels, num_classes=3)
    expected = noise - 2 * noise + 0.1 * 3 + 3.0 * 0.1 * (labels - 3).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-6)


def test_the_config_picks_the_objective_its_sampler_and_the_model():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["diffusion=meanflow"])
        uniform = compose("train", overrides=["diffusion=meanflow", "diffusion.time_sampling=uniform"])
        half = compose("train", overrides=["diffusion=meanflow", "diffusion.fraction_r_neq_t=0.5"])
        paper = compose("train")
    assert (cfg.sampler.name, cfg.steps) == ("auto", 1)
    point = DesignPoint.from_config(cfg)
    assert point.objective == "meanflow" and "objective=meanflow" in point.tags()
    assert cfg.run_name == point.name == "adaln_zero-DiT-Ti-p4+meanflow+logit_normal"
    assert uniform.run_name == "adaln_zero-DiT-Ti-p4+meanflow"
    assert half.run_name == "adaln_zero-DiT-Ti-p4+meanflow+logit_normal+fraction_r_neq_t=0.5"
    arguments = point.model_arguments()
    assert arguments["second_time"] is True and arguments["learn_sigma"] is False
    assert DesignPoint.from_config(paper).model_arguments()["second_time"] is False
    objective = point.build_objective()
    assert isinstance(objective, MeanFlow) and objective.fraction_r_neq_t == 0.25
    assert SamplingSpec(sampler="auto").resolve(objective).sampler == "meanflow"


@pytest.mark.parametrize(
    ("sampler", "objective", "line"),
    [
        (
            "euler",
            MeanFlow(),
            "sampler=euler samples a Interpolant, not this model's objective (MeanFlow): use ",
        ),
        (
            "ddim",
            MeanFlow(),
            "sampler=ddim samples a GaussianDiffusion, not this model's objective (MeanFlow)",
        ),
        ("meanflow", create_diffusion(), "sampler=meanflow samples a MeanFlow, not this model's objective ("),
    ],
)
def test_samplers_and_objectives_that_do_not_fit_refuse_in_one_line(sampler, objective, line):
    with pytest.raises(ValueError) as error:
        check_fits(get_sampler(sampler), objective)
    assert str(error.value).startswith(line) and "\n" not in str(error.value)
    if isinstance(objective, MeanFlow):
        assert str(error.value).endswith("use sampler=meanflow")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("fraction_r_neq_t", 1.5),
        ("fraction_r_neq_t", -0.1),
        ("time_sampling", "beta"),
        ("logit_std", 0.0),
        ("adaptive_p", -1.0),
        ("adaptive_c", 0.0),
    ],
)
def test_a_bad_option_fails_in_one_line_naming_its_key(key, value):
    with pytest.raises(ValueError) as error:
        build_objective({"_target_": "ditlab.diffusion.meanflow.MeanFlow", key: value})
    assert str(error.value).startswith(f"diffusion.{key}=") and "\n" not in str(error.value)


def test_what_cannot_train_through_the_jvp_is_refused_in_one_line():
    from ditlab.training.module import DiTModule

    model = tiny("adaln_zero", second_time=True, gradient_checkpointing=True)
    with pytest.raises(
        ValueError, match=r"^model\.gradient_checkpointing=true cannot train diffusion=meanflow"
    ):
        DiTModule(model, MeanFlow(), torch.nn.Identity())
    with pytest.raises(ValueError, match=r"^repa cannot train with diffusion=meanflow"):
        MeanFlow().check_training(tiny("adaln", second_time=True), repa=True, loss_terms=[])
    with pytest.raises(ValueError, match=r"^loss_terms\.dispersive cannot train with diffusion=meanflow"):
        MeanFlow().check_training(tiny("adaln", second_time=True), repa=False, loss_terms=["dispersive"])
