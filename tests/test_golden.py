"""Numbers that a refactor must not move: the loss, one AdamW step, and a guided DDPM and DDIM sample of a
fixed float64 model on fixed seeds, recorded (on this project's 2-core Xeon, torch 2.14.1) before the
"one home per concept" reshaping of the package."""

import pytest
import torch

from ditlab.diffusion import cfg_model_fn, create_diffusion
from ditlab.models import build_dit

LOSSES = [3.404080861992848, 1.010008864431278, 1.1443024095044518, 1.4010276416612073]
PARAMETER_SUM_AFTER_STEP = -50.161993638402784
SAMPLES = {
    "10": (-13222.168302511322, 26858.689715237004),
    "ddim10": (-3682.1114292491743, 9129.636476062851),
}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_dit("DiT-Ti/2", "adaln_zero", input_size=8, in_channels=1, num_classes=3, learn_sigma=True)
    model = model.double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero everywhere: the zero-initialised layers would hide changes
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x0 = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    return model, x0, noise


def test_loss_and_one_adamw_step_are_unchanged(setup):
    model, x0, noise = setup
    model = model.train()
    diffusion = create_diffusion()
    y, t = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 10, 500, 999])
    losses = diffusion.training_losses(model, x0, t=t, noise=noise, model_kwargs={"y": y})
    assert losses["loss"].tolist() == pytest.approx(LOSSES, rel=1e-10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    losses["loss"].mean().backward()
    opt.step()
    assert sum(p.sum() for p in model.parameters()).item() == pytest.approx(
        PARAMETER_SUM_AFTER_STEP, rel=1e-10
    )
    model.load_state_dict(state)


@pytest.mark.parametrize("respacing", list(SAMPLES))
def test_guided_ddpm_and_ddim_samples_are_unchanged(setup, respacing):
    model = setup[0].eval()
    process = create_diffusion().respace(respacing)
    loop = process.ddim_sample_loop if respacing.startswith("ddim") else process.p_sample_loop
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    out = loop(
        cfg_model_fn(model, 2.0, null_class=3),
        (3, 1, 8, 8),
        start,
        model_kwargs={"y": torch.tensor([0, 1, 2])},
        generator=gen,
        device="cpu",
    )
    assert (out.sum().item(), out.abs().sum().item()) == pytest.approx(SAMPLES[respacing], rel=1e-9)
