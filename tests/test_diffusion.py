"""The diffusion objective and samplers against closed forms, in float64."""

import functools
import itertools
import math

import pytest
import torch
from torch import nn

from ditlab.diffusion import (
    GaussianDiffusion,
    cfg_model_fn,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_sampler,
    make_betas,
    normal_kl,
    space_timesteps,
)

F64 = torch.float64


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return create_diffusion()


def true_eps_model(base: GaussianDiffusion, x0: torch.Tensor, v: float | None = None):
    """A model that knows the data is the point mass x0: it returns the exact ε of x_t (and a constant
    v when the variance is learned). Indexed by ORIGINAL timesteps, through `base`'s tables."""

    def model_fn(x, t):
        a = base.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if v is None else torch.cat([eps, torch.full_like(eps, v)], dim=1)

    return model_fn


# Schedules ---------------------------------------------------------------------------------------------


def test_linear_and_cosine_betas():
    betas = make_betas("linear", 1000)
    assert betas.dtype == F64 and betas.shape == (1000,)
    assert betas[0].item() == 1e-4 and betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert make_betas("linear", 250)[0].item() == pytest.approx(4e-4)  # scaled by 1000/T

    cosine = make_betas("cosine", 1000)
    alpha_bar = torch.cumprod(1 - cosine, 0)
    s = torch.arange(1, 1001, dtype=F64) / 1000
    closed = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert cosine.max().item() == 0.999  # the cap is hit at the last step
    torch.testing.assert_close(alpha_bar[:-1], closed[:-1], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="linear"):
        make_betas("quadratic", 1000)


def test_space_timesteps_250_matches_adm():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert {b - a for a, b in itertools.pairwise(steps)} == {4, 5}
    assert steps == [round(i * 999 / 249) for i in range(250)]
    assert space_timesteps(1000, 250) == steps


def test_space_timesteps_sections_and_ddim():
    steps = space_timesteps(300, "10,15,20")  # sections [0, 100), [100, 200), [200, 300)
    assert len(steps) == 45
    assert [sum(lo <= s < lo + 100 for s in steps) for lo in (0, 100, 200)] == [10, 15, 20]
    assert steps[:2] == [0, 11] and steps[10] == 100 and steps[-1] == 299
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    # Float accumulation as in the reference, which differs from round(i·stride) for some counts.
    assert space_timesteps(1000, "21")[15] == 749
    for bad in ("abc", "2000", "0"):
        with pytest.raises(ValueError):
            space_timesteps(1000, bad)


# Forward process and posterior ----------------------------------------------------------------------------


def test_q_moments_closed_form_and_empirical(diffusion):
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 100, 500, 999])
    x0 = torch.tensor([0.5, -1.0, 0.3, 0.9], dtype=F64).view(4, 1, 1, 1)
    alpha_bar = diffusion.alphas_cumprod[t].view(4, 1, 1, 1)
    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    torch.testing.assert_close(mean, alpha_bar.sqrt() * x0)
    torch.testing.assert_close(var, 1 - alpha_bar)
    torch.testing.assert_close(log_var, (1 - alpha_bar).log())

    n = 20000
    noise = torch.randn(4, n, 1, 1, generator=gen, dtype=F64)
    x_t = diffusion.q_sample(x0.expand(4, n, 1, 1), t, noise)
    emp_mean, emp_var = x_t.mean(dim=(1, 2, 3)), x_t.var(dim=(1, 2, 3))
    std = (1 - alpha_bar).sqrt().flatten()
    assert ((emp_mean - mean.flatten()).abs() < 5 * std / math.sqrt(n)).all()
    assert ((emp_var / (1 - alpha_bar.flatten()) - 1).abs() < 5 * math.sqrt(2 / n)).all()


def test_posterior_closed_form_and_bayes(diffusion):
    betas, alpha_bar = diffusion.betas, diffusion.alphas_cumprod
    t = torch.tensor([1, 10, 400, 999])
    x0 = torch.tensor([0.7, -0.2, 0.1, -0.9], dtype=F64).view(4, 1, 1, 1)
    x_t = torch.tensor([0.6, 0.3, -0.5, 1.2], dtype=F64).view(4, 1, 1, 1)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)

    b, ab, ab_prev = betas[t], alpha_bar[t], alpha_bar[t - 1]
    closed_var = b * (1 - ab_prev) / (1 - ab)
    closed_mean = (ab_prev.sqrt() * b / (1 - ab)) * x0.flatten() + (
        (1 - b).sqrt() * (1 - ab_prev) / (1 - ab)
    ) * x_t.flatten()
    torch.testing.assert_close(var.flatten(), closed_var, rtol=1e-12, atol=0)
    torch.testing.assert_close(log_var.flatten(), closed_var.log(), rtol=1e-12, atol=0)
    torch.testing.assert_close(mean.flatten(), closed_mean, rtol=1e-12, atol=1e-14)

    # Bayes: q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), by quadrature on a fine grid.
    for i in range(4):
        m, s = closed_mean[i], closed_var[i].sqrt()
        grid = torch.linspace(m - 12 * s, m + 12 * s, 40001, dtype=F64)
        log_p = -((x_t.flatten()[i] - (1 - b[i]).sqrt() * grid) ** 2) / (2 * b[i]) - (
            grid - ab_prev[i].sqrt() * x0.flatten()[i]
        ) ** 2 / (2 * (1 - ab_prev[i]))
        w = (log_p - log_p.max()).exp()
        w = w / w.sum()
        bayes_mean = (w * grid).sum()
        torch.testing.assert_close(mean.flatten()[i], bayes_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var.flatten()[i], (w * (grid - bayes_mean) ** 2).sum(), rtol=1e-6, atol=0)


# Loss helpers ----------------------------------------------------------------------------------------------


def test_normal_kl():
    gen = torch.Generator().manual_seed(1)
    m1, m2, lv1, lv2 = torch.randn(4, 100, generator=gen, dtype=F64)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15
    s1, s2 = (0.5 * lv1).exp(), (0.5 * lv2).exp()
    closed = (s2 / s1).log() + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), closed)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, s1), torch.distributions.Normal(m2, s2)
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), reference)


@pytest.mark.parametrize(("mean", "log_scale"), [(0.0, -3.0), (0.37, -1.0), (-0.99, -5.0), (0.2, 1.0)])
def test_discretized_gaussian_sums_to_one(mean, log_scale):
    bins = torch.linspace(-1, 1, 256, dtype=F64)  # the 256 pixel values mapped to [-1, 1]
    means, log_scales = torch.full_like(bins, mean), torch.full_like(bins, log_scale)
    log_probs = discretized_gaussian_log_likelihood(bins, means, log_scales)
    assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_gaussian_is_float32_safe():
    x = torch.tensor([-1.0, 0.0, 1.0])
    log_probs = discretized_gaussian_log_likelihood(x, torch.tensor([1.0, 0.9, -1.0]), torch.full((3,), -8.0))
    assert torch.isfinite(log_probs).all()


# Training objective --------------------------------------------------------------------------------------


@pytest.mark.parametrize("predict", ["epsilon", "x0", "v"])
def test_vlb_of_the_true_posterior_is_zero(diffusion, predict):
    """A model giving the true prediction and v = -1 (log-variance at the lower end of the learned range,
    log β̃_t, the true posterior variance for t > 0) has KL = 0 for t > 0 and mse = 0."""
    gd = GaussianDiffusion(diffusion.betas, predict=predict)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(6, 2, 4, 4, generator=gen, dtype=F64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=F64)
    t = torch.tensor([0, 1, 2, 50, 500, 999])
    target = {"epsilon": noise, "x0": x0, "v": gd._target(x0, t, noise)}[predict]
    losses = gd.training_losses(
        lambda x, t_: torch.cat([target, -torch.ones_like(target)], dim=1), x0, t=t, noise=noise
    )
    assert set(losses) == {"loss", "mse", "vb"} and all(v.shape == (6,) for v in losses.values())
    assert losses["mse"].abs().max() < 1e-20
    assert losses["vb"][1:].abs().max() < 1e-9
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    # At t = 0 the vb is the decoder NLL of x0 under N(x0, β̃_1), in bits/dim, against the exact CDF.
    sigma = gd.posterior_variance[1].sqrt()
    exact = torch.special.ndtr((x0 + 1 / 255 - x0) / sigma) - torch.special.ndtr((x0 - 1 / 255 - x0) / sigma)
    exact = torch.where(x0.abs() > 0.999, torch.special.ndtr(torch.tensor(1 / 255) / sigma), exact)
    expected = -exact.log().mean() / math.log(2)
    assert losses["vb"][0].item() == pytest.approx(expected.item(), rel=1e-2)


def test_vb_trains_only_the_variance(diffusion):
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 3, 4, 4, generator=gen, dtype=F64) * 2 - 1
    out = torch.randn(4, 6, 4, 4, generator=gen, dtype=F64, requires_grad=True)
    t = torch.tensor([0, 3, 300, 900])
    losses = diffusion.training_losses(lambda x, t_: out, x0, t=t, generator=gen)
    (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), out, retain_graph=True)
    assert grad_vb[:, :3].abs().max() == 0 and grad_vb[:, 3:].abs().max() > 0
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), out)
    assert grad_mse[:, 3:].abs().max() == 0 and grad_mse[:, :3].abs().max() > 0


def test_training_losses_sample_t_and_noise_from_the_generator(diffusion):
    x0 = torch.zeros(8, 1, 2, 2, dtype=F64)
    seen = []

    def model_fn(x, t):
        seen.append(t)
        return torch.zeros(8, 2, 2, 2, dtype=F64)

    a = diffusion.training_losses(model_fn, x0, generator=torch.Generator().manual_seed(4))
    b = diffusion.training_losses(model_fn, x0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert torch.equal(seen[0], seen[1]) and seen[0].dtype == torch.long
    assert seen[0].min() >= 0 and seen[0].max() < 1000 and len(set(seen[0].tolist())) > 4


def test_fixed_variance_mse_loss():
    gd = create_diffusion(learn_sigma=False)
    x0 = torch.zeros(2, 1, 2, 2, dtype=F64)
    noise = torch.ones_like(x0)
    losses = gd.training_losses(lambda x, t: 0.5 * noise, x0, t=torch.tensor([5, 6]), noise=noise)
    assert set(losses) == {"loss", "mse"}
    torch.testing.assert_close(losses["loss"], torch.full((2,), 0.25, dtype=F64))


@pytest.mark.parametrize("respacing", [None, "250", "ddim50"])
@pytest.mark.parametrize("kind", ["large", "small"])
def test_fixed_variances_equal_the_reference_formulas(kind, respacing):
    """ADM's FIXED_LARGE (the reference's default, sigma_small=False) and FIXED_SMALL, re-derived in
    float64 from the (respaced) betas: large = [β̃_1, β_1, β_2, ...] (0-based), small = β̃_t with its log
    clipped at t = 0 to log β̃_1."""
    gd = create_diffusion(respacing, learn_sigma=False, fixed_variance=kind)
    betas = [float(b) for b in gd.betas]
    alpha_bar, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        alpha_bar.append(prod)
    prev = [1.0, *alpha_bar[:-1]]
    posterior = [b * (1 - p) / (1 - a) for b, p, a in zip(betas, prev, alpha_bar, strict=True)]
    if kind == "large":
        variance = [posterior[1], *betas[1:]]
        log_variance = [math.log(v) for v in variance]
    else:
        variance = posterior
        log_variance = [math.log(posterior[1]), *(math.log(v) for v in posterior[1:])]
    T = gd.num_timesteps
    t = torch.tensor([0, 1, T // 2, T - 1])
    x = torch.zeros(4, 1, 2, 2, dtype=F64)
    out = gd.p_mean_variance(torch.zeros_like(x), x, t, clip_denoised=False)
    for i, step in enumerate(t.tolist()):
        assert out["variance"][i].unique().item() == pytest.approx(variance[step], rel=1e-12)
        assert out["log_variance"][i].unique().item() == pytest.approx(log_variance[step], rel=1e-12)
    with pytest.raises(ValueError, match="fixed_variance"):
        create_diffusion(learn_sigma=False, fixed_variance="medium")


def test_bad_configuration_and_inputs_raise(diffusion):
    with pytest.raises(ValueError, match="learn_sigma"):
        GaussianDiffusion(diffusion.betas, learn_sigma=False, loss="hybrid")
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(diffusion.betas, predict="score")
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.1, 1.5]))
    x0 = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match="expected"):
        diffusion.training_losses(lambda x, t: torch.zeros(2, 4, 2, 2), x0)  # no variance channels
    with pytest.raises(ValueError, match="move the diffusion"):
        run_sampler("ddpm", diffusion, lambda x, t: x, torch.zeros(1, 1, 2, 2, device="meta"), 10)


def run_sampler(name, diffusion, model_fn, x, steps, generator=None, model_kwargs=None, **options):
    """The one sampling API (the sampler registry's `run`) from the starting noise x, each step's noise drawn
    for the whole batch from one `generator`."""
    noise = lambda: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)  # noqa: E731
    with torch.no_grad():
        return get_sampler(name, **options).run(diffusion, model_fn, x, steps, noise, model_kwargs or {})


# Respacing and samplers ----------------------------------------------------------------------------------


def test_respaced_betas_reproduce_kept_alpha_bar(diffusion):
    spaced = diffusion.respace("250")
    kept = torch.tensor(space_timesteps(1000, "250"))
    assert spaced.num_timesteps == 250 and torch.equal(spaced.timestep_map, kept)
    torch.testing.assert_close(spaced.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-13, atol=0)
    # Respacing twice maps to the original steps, and create_diffusion respaces the same way.
    twice = spaced.respace("10")
    assert torch.equal(twice.timestep_map, kept[space_timesteps(250, "10")])
    torch.testing.assert_close(twice.alphas_cumprod, diffusion.alphas_cumprod[twice.timestep_map])
    assert torch.equal(create_diffusion("250").betas, spaced.betas)


def test_samplers_call_the_model_with_original_timesteps(diffusion):
    calls = []

    def model_fn(x, t):
        calls.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    run_sampler("ddim", diffusion, model_fn, torch.randn(3, 1, 2, 2), 10)  # DDIM's ddim10 stride
    assert [c.tolist() for c in calls] == [[s] * 3 for s in range(900, -1, -100)]
    calls.clear()
    run_sampler("ddpm", diffusion, model_fn, torch.randn(3, 1, 2, 2), 4)  # DDPM's "4": round(i·999/3)
    assert [c.tolist() for c in calls] == [[s] * 3 for s in (999, 666, 333, 0)]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_recover_a_point_mass(diffusion, sampler):
    """With the exact ε of a point-mass data distribution both samplers land on it: DDIM (η = 0) at
    every step, DDPM because its last step returns the posterior mean at t = 0, which is x0."""
    gen = torch.Generator().manual_seed(5)
    c = torch.rand(1, 2, 3, 3, generator=gen, dtype=F64) * 2 - 1
    noise = torch.randn(4, 2, 3, 3, generator=gen, dtype=F64)
    model_fn = true_eps_model(diffusion, c, v=0.0)
    x = run_sampler(sampler, diffusion, model_fn, noise, 25, generator=gen)
    torch.testing.assert_close(x, c.expand_as(x), rtol=0, atol=1e-10)


def test_ddim_eta0_is_deterministic(diffusion):
    calls = []

    def model_fn(x, t):
        calls.append(t)
        return torch.cat([torch.tanh(x) * (t.view(-1, 1, 1, 1) / 1000), torch.zeros_like(x)], dim=1)

    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    a = run_sampler("ddim", diffusion, model_fn, noise, 20, generator=torch.Generator().manual_seed(1))
    b = run_sampler("ddim", diffusion, model_fn, noise, 20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and len(calls) == 40  # η = 0 draws no noise; 20 steps each
    noisy = run_sampler("ddim", diffusion, model_fn, noise, 20, generator=torch.Generator(), eta=1.0)
    assert not torch.allclose(noisy, a)


def test_ddpm_seed_reproduces_sample(diffusion):
    def model_fn(x, t):
        return torch.cat([0.5 * x, torch.tanh(x)], dim=1)

    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        return run_sampler(
            "ddpm", diffusion, model_fn, torch.randn(2, 3, 4, 4, generator=gen), 20, generator=gen
        )

    assert torch.equal(sample(7), sample(7))
    assert not torch.allclose(sample(7), sample(8))


def test_clip_denoised_clamps_pred_xstart(diffusion):
    x_t = torch.full((1, 1, 2, 2), 50.0, dtype=F64)
    out = torch.zeros(1, 2, 2, 2, dtype=F64)
    t = torch.tensor([10])
    clipped = diffusion.p_mean_variance(out, x_t, t, clip_denoised=True)
    free = diffusion.p_mean_variance(out, x_t, t, clip_denoised=False)
    assert clipped["pred_xstart"].max() == 1 and free["pred_xstart"].max() > 1
    assert torch.equal(free["variance"], clipped["variance"])


# Guidance ------------------------------------------------------------------------------------------------


class ToyModel(nn.Module):
    """(x, t, y) -> (N, 2C, H, W) depending on y, recording the labels it saw."""

    def __init__(self):
        super().__init__()
        self.labels = []

    def forward(self, x, t, y):
        self.labels.append(y.clone())
        scale = (y.to(x.dtype) + 1).view(-1, 1, 1, 1)
        return torch.cat([x * scale, x / scale + t.view(-1, 1, 1, 1)], dim=1)


def test_guidance():
    model, null_class = ToyModel(), 10
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 4, 2, 2, generator=gen, dtype=F64)
    t, y = torch.tensor([1, 2, 3]), torch.tensor([0, 4, 9])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, null_class))
    model.labels.clear()

    torch.testing.assert_close(cfg_model_fn(model, 1.0, null_class)(x, t, y), cond, rtol=0, atol=0)

    out = cfg_model_fn(model, 4.0, null_class)(x, t, y)
    assert torch.equal(model.labels[-1], torch.tensor([0, 4, 9, 10, 10, 10]))  # one doubled batch
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])

    out3 = cfg_model_fn(model, 4.0, null_class, guidance_channels=3)(x, t, y)
    torch.testing.assert_close(out3[:, :3], out[:, :3])
    torch.testing.assert_close(out3[:, 3:], cond[:, 3:])  # channel 3 and the variance stay conditional
    with pytest.raises(ValueError, match="guidance_channels"):
        cfg_model_fn(model, 4.0, null_class, guidance_channels=5)(x, t, y)


def test_guided_sampling_end_to_end(diffusion):
    model = ToyModel()
    guided = cfg_model_fn(model, 1.5, null_class=10, guidance_channels=3)
    y = torch.tensor([1, 2])
    x = run_sampler(
        "ddpm",
        diffusion,
        lambda x, t, y: 0.01 * guided(x, t, y),
        torch.randn(2, 4, 2, 2),
        5,
        model_kwargs={"y": y},
    )
    assert x.shape == (2, 4, 2, 2) and torch.isfinite(x).all() and len(model.labels) == 5


# Tables --------------------------------------------------------------------------------------------------


def test_tables_stay_float64_through_casts():
    parent = nn.Module()
    parent.net = nn.Linear(2, 2)
    parent.diffusion = create_diffusion("10")
    reference = parent.diffusion.alphas_cumprod.clone()
    names = [name for name, _ in parent.diffusion.named_buffers()]
    assert "alphas_cumprod" in names and "timestep_map" in names
    assert not any(k.startswith("diffusion") for k in parent.state_dict())  # non-persistent

    parent.to(torch.float32).half().to(torch.bfloat16)
    assert parent.net.weight.dtype == torch.bfloat16
    for name, buffer in parent.diffusion.named_buffers():
        assert buffer.dtype == (torch.long if name == "timestep_map" else F64), name
    assert torch.equal(parent.diffusion.alphas_cumprod, reference)

    parent.to("meta")
    assert all(b.device.type == "meta" for b in parent.diffusion.buffers())
    assert parent.diffusion.alphas_cumprod.dtype == F64


def test_extract_casts_to_input_dtype(diffusion):
    x = torch.zeros(2, 3, 4, 4, dtype=torch.bfloat16)
    value = diffusion._extract(diffusion.sqrt_alphas_cumprod, torch.tensor([0, 999]), x)
    assert value.dtype == torch.bfloat16 and value.shape == (2, 1, 1, 1)


def test_hot_paths_make_no_host_syncs():
    """On the meta device any read of a tensor value (.item(), bool(), data-dependent shapes) raises, so
    running the sampling loops and the loss there proves they never wait on the device."""
    gd = create_diffusion().to("meta")
    guided = cfg_model_fn(ToyModel(), 1.5, null_class=10)
    shape, kwargs = (2, 4, 2, 2), {"model_kwargs": {"y": torch.tensor([1, 2], device="meta")}}
    x = torch.zeros(shape, device="meta")
    assert run_sampler("ddpm", gd, guided, x, 10, **kwargs).device.type == "meta"
    assert run_sampler("ddim", gd, guided, x, 10, eta=0.5, **kwargs).shape == shape
    losses = gd.training_losses(guided, x, **kwargs)
    assert losses["loss"].shape == (2,) and losses["loss"].device.type == "meta"


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_step_with_given_noise_equals_the_step_drawing_it_from_the_generator(sampler):
    diffusion = create_diffusion("10")
    x, y = torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 2, 3])

    def model_fn(x, t, y):
        scale = (1 + t.float() / 1000 + y.float() / 10).view(-1, 1, 1, 1)
        return torch.cat([torch.tanh(x * scale), torch.sin(x)], dim=1)

    step = diffusion.p_sample if sampler == "ddpm" else functools.partial(diffusion.ddim_sample, eta=0.7)
    for i in (9, 4, 0):
        t = torch.full((4,), i)
        drawn = step(model_fn, x, t, model_kwargs={"y": y}, generator=torch.Generator().manual_seed(i))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        given = step(model_fn, x, t, model_kwargs={"y": y}, noise=noise)
        torch.testing.assert_close(given["sample"], drawn["sample"], rtol=0, atol=0)
        if i > 0:  # the noise matters
            other = step(model_fn, x, t, model_kwargs={"y": y}, noise=torch.zeros_like(x))
            assert not torch.allclose(other["sample"], given["sample"])
