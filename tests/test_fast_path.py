"""The fast paths compute what the plain fp32 path computes, and the benchmark compares like with like."""

import functools
import importlib.util
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ditlab.diffusion import cfg_model_fn, create_diffusion
from ditlab.models import BLOCKS, build_dit
from ditlab.training.module import DiTModule

ROOT = Path(__file__).resolve().parents[1]


def load_experiment(name: str):
    """A script of experiments/ as a module (they are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench():
    return load_experiment("bench")


reference_recipe = load_experiment("reference_recipe")


def test_the_baseline_uses_nothing_of_ditlab():
    source = (ROOT / "experiments" / "reference_recipe.py").read_text()
    assert "ditlab" not in "".join(
        line for line in source.splitlines() if line.startswith(("import", "from"))
    )


def test_reference_space_timesteps_is_adms():
    from ditlab.diffusion import space_timesteps

    for counts in ("250", "ddim50", "10,15,20", "1000", "25"):
        assert reference_recipe.space_timesteps(1000, counts) == set(space_timesteps(1000, counts))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_dit(block: str = "adaln_zero", **kwargs) -> torch.nn.Module:
    """A small DiT whose zero-initialised layers (adaLN, final layer, biases) are filled with N(0, 0.02),
    so that every block and the output take part."""
    torch.manual_seed(0)
    model = build_dit("DiT-Ti/4", block, input_size=16, in_channels=4, num_classes=10, depth=2, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    return model.eval()  # no label dropout


def inputs(n: int = 6, t: list[int] | None = None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 16, 16, generator=g)
    t = torch.tensor(t) if t is not None else torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, t, y, torch.randn(x.shape, generator=g)


def test_bf16_autocast_matches_fp32():
    model, diffusion = random_dit().requires_grad_(False), create_diffusion()
    x, t, y, noise = inputs()
    out = model(x, t, y)
    assert out.abs().mean() > 1e-2  # the random weights make a non-trivial output
    loss = diffusion.training_losses(model, x, t=t, noise=noise, model_kwargs={"y": y})["loss"].mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = model(x, t, y)
        loss_bf16 = diffusion.training_losses(model, x, t=t, noise=noise, model_kwargs={"y": y})[
            "loss"
        ].mean()
    # bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 2e-3); a few roundings in a row stay near 1e-2.
    assert 1e-5 < rel_error(out_bf16, out) < 1e-2  # the lower bound: autocast really ran in bf16
    assert rel_error(loss_bf16, loss) < 1e-2


@pytest.mark.parametrize("block", list(BLOCKS))
def test_every_block_compiles_to_one_graph_that_matches_eager(block):
    """aot_eager runs the graphs Dynamo captured and AOTAutograd split into forward and backward, without
    Inductor's code generation: fullgraph=True fails on any graph break (each costs speed on a GPU)."""
    model = random_dit(block).train()
    model.y_embedder.class_dropout_prob = 0.0
    x, t, y, _ = inputs()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    eager_out = model(x, t, y)
    eager_grads = torch.autograd.grad(eager_out.square().mean(), list(model.parameters()))
    out = compiled(x, t, y)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_inductor_compiled_model_matches_eager():
    """Inductor's generated kernels (about two minutes of C++ compilation on two CPU cores)."""
    model = random_dit().train()
    model.y_embedder.class_dropout_prob = 0.0
    x, t, y, _ = inputs()
    eager_out = model(x, t, y)
    eager_grads = torch.autograd.grad(eager_out.square().mean(), list(model.parameters()))
    model.compile()
    out = model(x, t, y)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    # fp32 throughout: fused kernels only reorder sums, so the error stays at fp32 rounding (~1e-6).
    assert rel_error(out, eager_out) < 1e-5
    for g, e in zip(grads, eager_grads, strict=True):
        assert rel_error(g, e) < 1e-4


class LossTrace(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class PlainAdamWModule(DiTModule):
    """The eager baseline: torch's for-loop AdamW (the default on CPU) instead of the fused one."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.0, foreach=False)
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)  # the module logs its lr
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def train_losses(module_cls: type[DiTModule], precision: str, steps: int = 30) -> torch.Tensor:
    """Per-step losses of a tiny DiT trained on 16 fixed two-class images (gradients of opposite sign)."""
    y = torch.arange(16) % 2
    ramp = torch.linspace(-1, 1, 8)[None, None, :, None].expand(16, 1, 8, 8)
    x = (torch.where(y[:, None, None, None] == 0, 0.8, -0.8) * ramp).contiguous()
    torch.manual_seed(0)
    model = build_dit("DiT-Ti/4", input_size=8, in_channels=1, num_classes=2, depth=2)
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0, fused=True)
    module = module_cls(model, create_diffusion(), torch.nn.Identity(), optimizer=adamw)
    trace = LossTrace()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[trace],
    )
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16))
    return torch.tensor(trace.losses)


def test_fast_training_path_follows_the_eager_fp32_loss():
    """Both runs draw the same t and noise each step (the module seeds them per step), so the loss curves
    differ only by rounding: bf16 autocast (unit roundoff 2^-9) moves a step's loss by under 1% here
    (measured: 0.9% at worst, 0.3% over the last ten steps); we allow 3% and 2%. The loss must also fall
    to under a third of its start, so a fast path that does not train cannot pass."""
    eager = train_losses(PlainAdamWModule, "32-true")
    fast = train_losses(DiTModule, "bf16-mixed")
    assert eager[-10:].mean() < eager[:5].mean() / 3
    assert float(((fast - eager).abs() / eager).max()) < 3e-2
    assert abs(float(fast[-10:].mean() / eager[-10:].mean()) - 1) < 2e-2


def test_reference_recipe_computes_what_ditlab_computes():
    """The benchmark's baseline and ours run the same function: same weights, t, noise -> same loss,
    same guided output and the same sampler step."""
    model = random_dit()
    ref = reference_recipe.reference_dit("DiT-Ti/4", input_size=16, in_channels=4, num_classes=10, depth=2)
    ref.load_state_dict(model.state_dict())
    ref.eval()
    x, t, y, noise = inputs(t=[0, 1, 250, 500, 998, 999])  # t = 0: the decoder NLL branch
    ours = create_diffusion().training_losses(model, x, t=t, noise=noise, model_kwargs={"y": y})
    theirs = reference_recipe.ReferenceDiffusion().training_losses(ref, x, t, {"y": y}, noise=noise)
    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)

    # Guidance: the reference guides a doubled batch; its conditional half is ours.
    guided = cfg_model_fn(model, 4.0, null_class=10, guidance_channels=3)(x, t, y)
    doubled = ref.forward_with_cfg(
        torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]), 4.0
    )
    torch.testing.assert_close(doubled[: len(x)], guided, rtol=1e-5, atol=1e-5)

    # One step of the 250-step sampler: the same mean and variance for the same model output.
    step = torch.tensor([0, 1, 100, 200, 248, 249])
    ours_p = create_diffusion("250").p_mean_variance(guided, x, step, clip_denoised=False)
    theirs_p = reference_recipe.ReferenceDiffusion("250").p_mean_variance(lambda *a: guided, x, step, {})
    for key in ("mean", "log_variance"):
        torch.testing.assert_close(ours_p[key], theirs_p[key], rtol=1e-5, atol=1e-5)


def test_reference_train_step_is_adamw_and_ema_of_the_loss():
    """One reference step moves every trained weight by AdamW's first step, lr·g/(|g| + eps), then the EMA
    (1 − decay) of the way to the new weights, and returns the loss as a float."""
    model = reference_recipe.reference_dit("DiT-Ti/4", input_size=16, in_channels=4, num_classes=10, depth=2)
    model.load_state_dict(random_dit().state_dict())
    ema = reference_recipe.reference_dit("DiT-Ti/4", input_size=16, in_channels=4, num_classes=10, depth=2)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x, _, y, _ = inputs()
    loss = reference_recipe.train_step(model, ema, optimizer, reference_recipe.ReferenceDiffusion(), x, y)
    assert isinstance(loss, float) and loss > 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            step = 1e-4 * p.grad / (p.grad.abs() + 1e-8)
            torch.testing.assert_close(p.detach(), before[name] - step, rtol=1e-6, atol=1e-9)
        e = dict(ema.named_parameters())[name]
        torch.testing.assert_close(e, 0.9999 * before[name] + 1e-4 * p.detach(), rtol=1e-6, atol=1e-7)


def test_bench_modes_and_summary():
    bench = load_bench()
    assert bench.parse_mode("ours-bf16-compile") == bench.Mode("ours-bf16-compile", bf16=True, compile=True)
    for bad in ("reference-bf16", "ours-fp8", "ours-bf16-bf16", "fast"):
        with pytest.raises(ValueError, match="mode"):
            bench.parse_mode(bad)


def test_bench_summary_compares_blocks_by_gflops(tmp_path):
    bench = load_bench()
    paths = []
    for block, img_s, gflops in [("adaln_zero", 100.0, 2.0), ("cross_attention", 80.0, 2.4)]:
        row = {"kind": "train", "mode": "ours-bf16", "model": "DiT-XL/2", "block": block, "batch": 32}
        record = {"rows": [{**row, "img_s": img_s, "mfu": 0.3}], "fwd_gflops": gflops}
        paths.append(tmp_path / f"{block}.json")
        paths[-1].write_text(json.dumps(record))
    text = bench.summarize(paths)
    # 0.8× the throughput at 1.2× the Gflops: time per Gflop (1/0.8)/1.2 = 1.042×
    assert "img/s ×0.800   Gflops ×1.200   time per Gflop ×1.042" in text
    with pytest.raises(FileNotFoundError):
        bench.summarize([tmp_path / "missing.json"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_memory_probe_sees_an_allocation_on_cpu():
    bench = load_bench()
    with bench.MemoryProbe(torch.device("cpu")) as probe:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert 60 * 2**20 < probe.rise < 200 * 2**20
    assert bench.tensor_bytes(iter([block, block[10:], None])) == 64 * 2**20  # one storage, counted once


@pytest.mark.slow
def test_gpu_bench_smoke_runs_the_whole_plan(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "experiments" / "gpu_bench.sh"), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    tags = {record["config"]["tag"] for record in records}
    assert tags == {
        "train-xl2-b32",
        "train-xl2-best",
        "sample-xl2",
        "train-b2",
        "train-s2",
        "blocks-xl2-adaln",
        "blocks-xl2-in_context",
        "blocks-xl2-cross_attention",
    }
    rows = [r for record in records for r in record["rows"]]
    assert rows and all("error" not in r and r["img_s"] > 0 for r in rows)
    sample = next(r for r in rows if r["kind"] == "sample" and r["mode"] == "ours-bf16-compile")
    assert sample["img_s"] == pytest.approx(2 / (sample["ms_per_step"] / 1000 * 4))  # batch 2, 4 steps
    assert "relative to adaln_zero" in result.stdout  # the summary's comparison of the four blocks
