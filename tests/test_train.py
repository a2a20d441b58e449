"""The training platform through its command line (subprocesses, as a user runs it) and in-process."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from ditlab.design import DesignPoint
from ditlab.diffusion import create_diffusion
from ditlab.models import BLOCKS, build_dit
from ditlab.training.checkpoint_io import AtomicCheckpointIO
from ditlab.training.module import DiTModule

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
needs_fashion_mnist = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist"
)

# A tiny, fast point (conf/debug/tiny.yaml: 2 blocks at patch 8, 256 images, 2-step grids), without FID.
TINY = ["debug=tiny", "~callbacks.fid"]


def run_train(tmp_path: Path, *overrides: str, env: dict | None = None, check: bool = True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", **(env or {})}
    args = [sys.executable, str(ROOT / "src" / "train.py"), *overrides]
    if not any(o.startswith("hydra.run.dir") or o == "-m" for o in overrides):
        args.append(f"hydra.run.dir={tmp_path}")
    proc = subprocess.run(args, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def logged_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss over every CSV log of the run folder (a run resumed in place adds a version)."""
    losses = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(path) as f:
            losses |= {
                int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")
            }
    return losses


def option_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group",
    [
        "block",
        "model",
        "pos_embed",
        "norm",
        "mlp",
        "repa",
        "sampler",
        "data",
        "autoencoder",
        "diffusion",
        "optim",
        "trainer",
        "logger",
        "callbacks",
    ],
)
def test_every_config_group_option_composes(group):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for option in option_names(group):
            cfg = compose("train", overrides=[f"{group}={option}"], return_hydra_config=False)
            assert cfg[group] is not None
    assert option_names("block") == sorted(BLOCKS)  # one YAML per registered block
    with initialize_config_dir(str(CONF), version_base="1.3"):
        assert (
            DesignPoint.from_config(compose("train", overrides=["patch=2"])).model_arguments()["patch_size"]
            == 2
        )


def test_experiment_presets_compose():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for option in option_names("experiment"):
            cfg = compose("train", overrides=[f"experiment={option}"])
            assert cfg.optim.lr > 0


def test_hydra_launchers_compose():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for launcher in ("basic", "slurm", "submitit_local", "submitit_slurm"):
            cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
            assert cfg.hydra.launcher._target_


@needs_fashion_mnist
def test_train_writes_checkpoint_samples_and_model_info(tmp_path):
    proc = run_train(tmp_path, *TINY, "trainer.max_steps=3", "logger=csv")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["ditlab"]["model_config"]["patch_size"] == 8
    coordinates = ckpt["ditlab"]["coordinates"]
    assert {k: coordinates[k] for k in ("block", "model", "patch")} == {
        "block": "adaln_zero",
        "model": "DiT-Ti",
        "patch": 8,
    }
    assert {k: coordinates[k] for k in ("objective", "pos_embed", "norm", "qk_norm", "mlp", "repa")} == {
        "objective": "ddpm",
        "pos_embed": "sincos",
        "norm": "layernorm",
        "qk_norm": False,
        "mlp": "gelu",
        "repa": 0.0,
    }
    assert any(k.startswith("ema.") for k in ckpt["state_dict"])
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])
    model_sd = {k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    ema_sd = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
    assert model_sd.keys() == ema_sd.keys()
    assert (tmp_path / "samples" / "final.png").is_file()
    assert "Gflops" in proc.stdout and "checkpoint" in proc.stdout
    losses = logged_losses(tmp_path)
    assert len(losses) == 3 and all(0 < v < 10 for v in losses.values())


@needs_fashion_mnist
def test_resume_reproduces_the_loss_curve(tmp_path):
    common = [*TINY, "logger=csv", "callbacks.checkpointing.every_n_steps=3"]
    full, first = tmp_path / "full", tmp_path / "first"
    full.mkdir(), first.mkdir()
    run_train(full, *common, "trainer.max_steps=6", f"hydra.run.dir={full}")
    run_train(first, *common, "trainer.max_steps=6", f"hydra.run.dir={first}")
    step3 = first / "checkpoints" / "step_0000003.ckpt"
    assert step3.is_file()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    run_train(resumed, *common, "trainer.max_steps=6", f"hydra.run.dir={resumed}", f"ckpt_path={step3}")
    reference, continued = logged_losses(full), logged_losses(resumed)
    # The wall time of training sums over the resume.
    before = torch.load(step3, weights_only=True)["callbacks"]["RunRecord"]["train_seconds"]
    assert json.loads((resumed / "results.json").read_text())["train_seconds"] > before > 0
    assert sorted(continued) == [3, 4, 5]  # Lightning logs 0-based step indices
    for step in (3, 4, 5):
        assert continued[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7)
    final_full = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    final_resumed = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=1e-5, atol=1e-6)


@needs_fashion_mnist
def test_patch_sweep_gives_one_run_per_point(tmp_path):
    proc = run_train(
        tmp_path,
        "-m",
        "patch=2,4,8",
        *TINY,
        "trainer.max_steps=1",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "logger=wandb",
        env={"WANDB_MODE": "offline", "HOME": str(tmp_path), "WANDB_API_KEY": ""},
    )
    runs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == ["0_adaln_zero-DiT-Ti-p2", "1_adaln_zero-DiT-Ti-p4", "2_adaln_zero-DiT-Ti-p8"]
    for run in runs:
        run_dir = tmp_path / "sweep" / run
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        offline = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, f"{run}: expected one offline W&B run, found {offline}"
    assert proc.stdout.count("wandb sync") == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["block=film"], "Could not find 'block/film'"),
        (["patch=8", "data.image_size=36"], "patch size 8 does not divide the input size 36"),
        (["data.root=/nonexistent", "data.download=false"], "Fashion-MNIST"),
        (["trainer.accelerator=gpu"], "no CUDA GPU is visible"),
        (["optim.global_batch_size=15", "trainer=ddp_cpu"], "not divisible by the 2 processes"),
    ],
)
def test_clear_errors(tmp_path, overrides, message):
    proc = run_train(tmp_path, *overrides, "trainer.max_steps=1", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    if "Could not find" not in message:
        assert "Traceback" not in proc.stderr


@needs_fashion_mnist
def test_resuming_with_another_model_is_refused_clearly(tmp_path):
    run_train(tmp_path / "a", *TINY, "trainer.max_steps=1", f"hydra.run.dir={tmp_path}/a", "logger=none")
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    proc = run_train(tmp_path, *TINY, "patch=4", f"ckpt_path={ckpt}", "trainer.max_steps=2", check=False)
    assert proc.returncode == 2
    assert (
        f"cannot resume from {ckpt}: it was trained at another design point or with another model"
        in proc.stderr
    )
    assert "patch_size: 8 vs 4" in proc.stderr


@needs_fashion_mnist
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    args = [
        sys.executable,
        str(ROOT / "src" / "train.py"),
        *TINY,
        "trainer.max_steps=100000",
        "logger=none",
        "callbacks.checkpointing.every_n_steps=100000",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and "Gflops" not in seen:
        seen += proc.stdout.readline()
    time.sleep(3)  # a few steps
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, seen + out
    assert "SIGTERM at step" in out
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] > 0


def test_atomic_checkpoint_write_never_leaves_a_corrupt_file(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": torch.tensor(2), "bad": Unpicklable()}, path)
    assert io.load_checkpoint(path)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class NaNImages(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.full((1, 8, 8), float("nan")), torch.tensor(i % 2)


def test_nonfinite_losses_are_skipped_then_abort():
    model = build_dit("DiT-Ti/4", input_size=8, in_channels=1, num_classes=2)
    model.blocks = model.blocks[:1]
    module = DiTModule(model, create_diffusion(), torch.nn.Identity(), max_nonfinite_steps=3)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = L.Trainer(
        max_steps=10,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with pytest.raises(RuntimeError, match="NaN/inf for 3 steps in a row"):
        trainer.fit(module, DataLoader(NaNImages(), batch_size=8))
    assert int(module.nonfinite_total) == 3  # aborted at the third bad step in a row
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, p0)  # every update was skipped


def test_ema_update_is_the_closed_form():
    model = build_dit("DiT-Ti/8", input_size=8, in_channels=1, num_classes=2)
    module = DiTModule(model, create_diffusion(), torch.nn.Identity(), ema_decay=0.9)
    ema0 = [p.detach().clone() for p in module.ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    module.update_ema()
    for e, e0, p in zip(module.ema.parameters(), ema0, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * e0 + 0.1 * p)


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("model.", "ema."))}


@needs_fashion_mnist
def test_two_process_ddp_matches_one_process(tmp_path):
    # Same global batch of 16: one process of 16, or two (gloo) of 8. Label dropout draws from each
    # rank's own RNG, so it is off here; examples, flips, timesteps and noise are shared by design.
    # fp32: bf16 autocast (the default on CPUs with native bf16) rounds a batch of 16 and two of 8 apart.
    common = [
        *TINY,
        "trainer.max_steps=3",
        "logger=none",
        "net.class_dropout_prob=0.0",
        "trainer.precision=32-true",
    ]
    run_train(tmp_path / "one", *common, f"hydra.run.dir={tmp_path}/one")
    run_train(tmp_path / "two", *common, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path}/two")
    one, two = model_weights(tmp_path / "one"), model_weights(tmp_path / "two")
    assert one.keys() == two.keys()
    moved = 0.0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
        moved = max(moved, (one[key] - two[key]).abs().max().item())
    assert moved < 1e-5


@needs_fashion_mnist
def test_multirun_with_two_process_ddp_gives_exactly_two_runs(tmp_path):
    sweep = tmp_path / "sweep"
    run_train(
        tmp_path,
        "-m",
        "patch=4,8",
        *TINY,
        "trainer=ddp_cpu",
        "trainer.max_steps=1",
        "logger=csv",
        f"hydra.sweep.dir={sweep}",
    )
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == ["0_adaln_zero-DiT-Ti-p4", "1_adaln_zero-DiT-Ti-p8"]  # no job re-launched the sweep
    for run in runs:
        ckpt = torch.load(sweep / run / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 1
        assert ckpt["ditlab"]["model_config"]["patch_size"] == int(run[-1])
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


@needs_fashion_mnist
def test_fid_is_logged_and_recorded_for_the_report(tmp_path):
    fid = [
        "callbacks.fid.num_samples=20",
        "callbacks.fid.num_reference_images=30",
        "callbacks.fid.steps=2",
        "callbacks.fid.batch_size=10",
        "callbacks.fid.every_n_steps=1",
        f"callbacks.fid.cache_dir={tmp_path}/cache",
    ]
    proc = run_train(tmp_path, "debug=tiny", *fid, "trainer.max_steps=2", "logger=csv")
    record = json.loads((tmp_path / "results.json").read_text())
    assert {k: record["coordinates"][k] for k in ("block", "model", "patch", "objective", "sampler")} == {
        "block": "adaln_zero",
        "model": "DiT-Ti",
        "patch": 8,
        "objective": "ddpm",
        "sampler": "ddim",
    }
    assert [p["step"] for p in record["fid_history"]] == [1, 2]
    assert record["fid"] == record["fid_history"][-1]["fid"] and 0 < record["fid"] < 1000
    assert record["images_seen"] == 2 * 16
    assert record["train_compute_gflop"] == pytest.approx(record["gflops"] * 3 * 32)
    assert record["fid_reference_images"] == 30 and "Inception" in record["feature_network"]
    # What the report needs to average only alike runs over seeds: debug=tiny's depth, not DiT-Ti's 4.
    assert (record["model_config"]["depth"], record["lr"], record["ema_decay"]) == (2, 2e-3, 0.995)
    assert record["precision"] in ("32-true", "bf16-mixed")
    # How it was made: the config as run ("auto" resolved), the source commit, the machine, the wall times.
    config = record["config"]
    assert config["trainer"]["precision"] == record["precision"] and config["patch"] == 8
    assert config["callbacks"]["fid"]["num_samples"] == record["fid_num_samples"] == 20
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert record["git"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert record["git"]["dirty"] in ((True, False) if head.returncode == 0 else (None,))
    assert record["device"] and record["world_size"] == 1
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["lightning"]
    assert record["train_seconds"] > 0 and record["fid_seconds"] == record["fid_history"][-1]["seconds"] > 0
    assert "FID" in proc.stdout
    assert list((tmp_path / "cache").glob("*.npz"))  # reference statistics cached for the next run
    with open(next(tmp_path.glob("csv/version_*/metrics.csv"))) as f:
        logged = [r for r in csv.DictReader(f) if r.get("fid")]
    assert [float(r["fid"]) for r in logged] == pytest.approx([p["fid"] for p in record["fid_history"]])


@needs_fashion_mnist
def test_sigterm_during_the_final_fid_skips_it_and_exits_cleanly(tmp_path):
    """Pre-emption must not wait for an FID: 100K samples would take hours here; the run ends at once."""
    fid = [
        "callbacks.fid.num_samples=100000",
        "callbacks.fid.num_reference_images=20",
        "callbacks.fid.steps=2",
        "callbacks.fid.batch_size=10",
        f"callbacks.fid.cache_dir={tmp_path}/cache",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    args = [
        sys.executable,
        str(ROOT / "src" / "train.py"),
        "debug=tiny",
        *fid,
        "trainer.max_steps=2",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and not last.is_file():  # written when training ends, before the FID
        time.sleep(0.2)
    time.sleep(5)  # into the FID (the reference statistics, then sampling)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "SIGTERM: the FID at step 2 is skipped" in out
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert "fid" not in json.loads((tmp_path / "results.json").read_text())


@needs_fashion_mnist
def test_init_from_starts_model_and_ema_from_the_checkpoint_weights(tmp_path):
    run_train(tmp_path / "a", *TINY, "trainer.max_steps=2", "logger=none", f"hydra.run.dir={tmp_path}/a")
    source = model_weights(tmp_path / "a")
    # lr 1e-30: the step leaves the weights where init_from put them (the source's EMA weights by default).
    run_train(
        tmp_path / "b",
        *TINY,
        "trainer.max_steps=1",
        "logger=none",
        "optim.lr=1e-30",
        "seed=7",
        f"init_from={tmp_path}/a/checkpoints/last.ckpt",
        f"hydra.run.dir={tmp_path}/b",
    )
    started = model_weights(tmp_path / "b")
    for key, value in source.items():
        if key.startswith("ema."):
            torch.testing.assert_close(started["model." + key[4:]], value)
            torch.testing.assert_close(started[key], value)


def test_fsdp_strategy_wraps_each_dit_block():
    from hydra.utils import instantiate
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from ditlab.models import DiTBlock

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=fsdp"])
    policy = instantiate(cfg.trainer.strategy).kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {DiTBlock}


def test_gradient_clipping_clips_the_global_norm_and_refuses_fp16_scaling():
    from types import SimpleNamespace

    from ditlab.autoencoders.base import IdentityAutoencoder

    model = build_dit("DiT-Ti/4", depth=1, input_size=8, in_channels=1, num_classes=3)
    module = DiTModule(model, create_diffusion(), IdentityAutoencoder())
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    module.trainer = SimpleNamespace(
        precision_plugin=SimpleNamespace(), strategy=None
    )  # bf16, fp32: no scaler
    module.configure_gradient_clipping(optimizer, gradient_clip_val=0.5)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(norm) == pytest.approx(0.5, rel=1e-4)
    module.trainer = SimpleNamespace(
        precision_plugin=SimpleNamespace(scaler=object()), strategy=None
    )  # 16-mixed
    with pytest.raises(ValueError, match="the fused AdamW unscales the gradients inside its step"):
        module.configure_gradient_clipping(optimizer, gradient_clip_val=0.5)


def test_bf16_mixed_trains_with_gradient_clipping(tmp_path):
    # Lightning's mixed-precision plugin refuses to clip with a fused optimizer; the CPU demo clips at 1.
    run_train(tmp_path, *TINY, "trainer.precision=bf16-mixed", "optim.grad_clip=1.0", "trainer.max_steps=2")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_cpu_precision_auto_is_bf16_only_with_native_bf16(tmp_path):
    from omegaconf import OmegaConf

    from ditlab.training.run import cpu_has_native_bf16, resolve_devices

    for flags, native in (
        ("fpu avx2 avx512f", False),
        ("fpu avx512f avx512_bf16", True),
        ("amx_bf16 amx_tile", True),
    ):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_has_native_bf16(str(tmp_path / "cpuinfo")) is native
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False
    if not torch.cuda.is_available():
        cfg = OmegaConf.create({"trainer": {"accelerator": "auto", "precision": "auto"}})
        resolve_devices(cfg)
        assert cfg.trainer.accelerator == "cpu"
        assert cfg.trainer.precision == ("bf16-mixed" if cpu_has_native_bf16() else "32-true")
