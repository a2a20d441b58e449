"""Numbers that a refactor must not move: the loss, one AdamW step, and a guided DDPM and DDIM sample of a
fixed float64 model on fixed seeds.

They hold on any CPU because nothing in them depends on the machine beyond float64 rounding: the weights
and inputs come from numpy's PCG64 (torch.randn's normal transform has a vectorised and a scalar path that
differ at ~1e-8), and a float64 model computes its timestep features in float64 (MKL's float32 cos/sin
differ between Intel and AMD CPUs at ~1e-5, which the float32 features carried into every output). The
tolerances follow float64 arithmetic: u = 1.1e-16 per operation, a forward pass ~10² operations deep with
sums of ≤ 10⁴ terms, so n·u ≈ 1e-12 is a worst-case bound; rel 1e-11 for a forward pass and the loss,
1e-10 for 10-step samplers (20 passes, divided by sqrt(ᾱ) ≥ 0.006 near t = 999). Measured: the values agree
to ≤ 3e-15 between MKL's Intel and AMD code paths (MKL_CBWR=COMPATIBLE, MKL_ENABLE_INSTRUCTIONS=AVX2) and
torch's AVX2 and AVX-512 kernels (ATEN_CPU_CAPABILITY=avx2|avx512|default). Recorded on an Intel Xeon (AMX), torch 2.14.1.
"""

import numpy as np
import pytest
import torch
from torch import nn

from ditlab.diffusion import cfg_model_fn, create_diffusion, get_sampler
from ditlab.models import build_dit

LOSSES = [3.952016080899359, 1.0992526480614218, 1.236459727490851, 0.9893934981433881]
PARAMETER_SUM_AFTER_STEP = 47.771685975235926
SAMPLES = {
    "10": (-6634.223097110156, 25407.87192019309),
    "ddim10": (-1859.2767755871496, 8661.233691374677),
}


def pcg64_normal(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    """float64 standard normal values that are the same on every machine."""
    return torch.from_numpy(rng.standard_normal(shape))


def fill_weights(model: nn.Module, seed: int, scale: float, bias_scale: float | None = None) -> nn.Module:
    """Every parameter set to scale·N(0, 1) (bias_scale for 1-D ones) from PCG64: non-zero everywhere (the
    zero-initialised layers would hide changes) and the same on every machine."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(pcg64_normal(rng, *p.shape) * (scale if p.ndim > 1 or bias_scale is None else bias_scale))
    return model


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)  # the class dropout of the training-mode loss
    model = build_dit("DiT-Ti/2", "adaln_zero", input_size=8, in_channels=1, num_classes=3, learn_sigma=True)
    model = fill_weights(model.double(), seed=1, scale=0.02)
    rng = np.random.default_rng(2)
    x0 = torch.from_numpy(rng.uniform(-1, 1, (4, 1, 8, 8)))
    return model, x0, pcg64_normal(rng, 4, 1, 8, 8)


def test_loss_and_one_adamw_step_are_unchanged(setup):
    model, x0, noise = setup
    model = model.train()
    diffusion = create_diffusion()
    y, t = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 10, 500, 999])
    losses = diffusion.training_losses(model, x0, t=t, noise=noise, model_kwargs={"y": y})
    assert losses["loss"].tolist() == pytest.approx(LOSSES, rel=1e-11)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    losses["loss"].mean().backward()
    opt.step()
    assert sum(p.sum() for p in model.parameters()).item() == pytest.approx(
        PARAMETER_SUM_AFTER_STEP, rel=1e-11
    )
    model.load_state_dict(state)


@pytest.mark.parametrize("respacing", list(SAMPLES))
def test_guided_ddpm_and_ddim_samples_are_unchanged(setup, respacing):
    """Through the one sampling API (the sampler registry), recorded through the diffusion's own loops
    before they were removed: "10" is DDPM on 10 respaced steps, "ddim10" DDIM on 10 strided steps."""
    model = setup[0].eval()
    solver = get_sampler("ddim" if respacing.startswith("ddim") else "ddpm")
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = solver.run(
            create_diffusion(),
            cfg_model_fn(model, 2.0, null_class=3),
            start,
            10,
            lambda: torch.randn(start.shape, generator=gen, dtype=torch.float64),
            {"y": torch.tensor([0, 1, 2])},
        )
    assert (out.sum().item(), out.abs().sum().item()) == pytest.approx(SAMPLES[respacing], rel=1e-10)
