"""Faults and bad input, as a new user hits them: each ends in one line (exit 2) or a correct run, and
none loses more than the stated checkpoint interval. Through the command line, as a user runs it."""

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ditlab.autoencoders import IdentityAutoencoder
from ditlab.design import default_axes
from ditlab.diffusion import create_diffusion
from ditlab.models import build_dit
from ditlab.training.callbacks import Checkpointing
from ditlab.training.module import DiTModule

ROOT = Path(__file__).resolve().parents[1]
needs_fashion_mnist = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist"
)
TINY = ["debug=tiny", "~callbacks.fid", "logger=none"]
ONE_PROCESS = SimpleNamespace(barrier=lambda name=None: None, broadcast=lambda obj, src=0: obj)


def run(script: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train(tmp_path: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return run("train.py", *args, f"hydra.run.dir={tmp_path}", cwd=tmp_path, **kwargs)


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The run failed with status 2 and a single `error: ...` line holding every fragment."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    for fragment in fragments:
        assert fragment in line, line
    return line


def step_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


# ---- values -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=0", "optim.lr=0"),
        ("patch=0", "patch=0"),
        ("optim.global_batch_size=0", "optim.global_batch_size=0"),
        ("optim.global_batch_size=-4", "optim.global_batch_size=-4"),
        ("optim.max_steps=0", "optim.max_steps=0"),
        ("optim.ema_decay=1.0", "optim.ema_decay=1.0"),
        ("callbacks.sample_grid.cfg_scale=-1", "callbacks.sample_grid.cfg_scale=-1"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_range(tmp_path, override, key):
    proc = train(tmp_path, *TINY, override)
    line = one_line_error(proc, key)
    assert "must be" in line


@needs_fashion_mnist
def test_fid_sample_count_below_two_is_refused(tmp_path):
    one_line_error(
        train(tmp_path, "debug=tiny", "callbacks.fid.num_samples=1"), "callbacks.fid.num_samples=1", "≥ 2"
    )


# ---- what the end of a run needs, checked before its first step ---------------------------------------


@needs_fashion_mnist
@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        (
            "+callbacks.fid.inception=/nonexistent.pt",
            "Inception TorchScript file /nonexistent.pt does not exist",
        ),
        ("callbacks.fid.reference=/nonexistent.npz", "FID reference '/nonexistent.npz'"),
        ("callbacks.checkpointing.dirpath=/proc/ditlab", "cannot write checkpoints to /proc/ditlab"),
    ],
)
def test_missing_end_of_run_pieces_fail_before_training(tmp_path, override, fragment):
    start = time.monotonic()
    proc = train(tmp_path, "debug=tiny", "optim.max_steps=20", override)
    one_line_error(proc, fragment)
    assert time.monotonic() - start < 60
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # no step was trained
    assert "Epoch 0:" not in proc.stdout + proc.stderr


@needs_fashion_mnist
def test_a_failing_end_of_run_callback_keeps_the_final_checkpoint(tmp_path):
    """The grid's folder cannot be created (under /proc): the run ends with one line, and last.ckpt holds
    the final step, written before any end-of-run callback ran."""
    proc = train(tmp_path, *TINY, "optim.max_steps=4", "callbacks.sample_grid.output_dir=/proc/ditlab")
    one_line_error(proc, "/proc/ditlab")
    assert step_of(tmp_path / "checkpoints" / "last.ckpt") == 4


# ---- no work lost --------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_kill_9_after_a_time_based_checkpoint_loses_at_most_the_interval(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    args = [
        sys.executable,
        str(ROOT / "src" / "train.py"),
        *TINY,
        "optim.max_steps=1000000",
        "callbacks.checkpointing.every_minutes=0.02",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not last.is_file():
            time.sleep(0.2)
        first = step_of(last)
        time.sleep(3)  # a few more time-based saves (every 1.2 s of training)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert step_of(last) > first > 0  # saved by the clock, not by a step count or the end of training


@needs_fashion_mnist
def test_resume_in_place_twice_continues_one_loss_curve(tmp_path):
    common = [*TINY, "logger=csv", "callbacks.checkpointing.every_n_steps=100"]
    train(tmp_path / "straight", *common, "optim.max_steps=6")
    here = tmp_path / "in_place"
    last = here / "checkpoints" / "last.ckpt"
    for steps in (2, 4, 6):
        resume = [f"ckpt_path={last}"] if steps > 2 else []
        proc = train(here, *common, f"optim.max_steps={steps}", *resume)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert step_of(last) == steps
        assert f"checkpoint: {last}" in proc.stdout  # the report names the newest checkpoint
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no last-v1.ckpt
    from test_train import logged_losses

    straight, resumed = logged_losses(tmp_path / "straight"), logged_losses(here)
    assert sorted(resumed) == sorted(straight) == list(range(6))
    for step in range(6):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7)


@pytest.fixture(scope="module")
def paper_checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a one-step run of the paper's point: DDPM, no REPA."""
    run_dir = tmp_path_factory.mktemp("paper")
    proc = train(run_dir, *TINY, "optim.max_steps=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


@needs_fashion_mnist
@pytest.mark.parametrize(
    ("override", "difference"),
    [("diffusion=sit_linear", "objective: 'ddpm' vs 'sit_linear'"), ("repa=random_vit", "repa: 0.0 vs 0.5")],
)
def test_resuming_at_another_design_point_is_refused_before_any_step(
    tmp_path, paper_checkpoint, override, difference
):
    proc = train(tmp_path, *TINY, f"ckpt_path={paper_checkpoint}", "optim.max_steps=2", override)
    one_line_error(
        proc,
        f"cannot resume from {paper_checkpoint}",
        f"(checkpoint vs this run: {difference}",
        f"init_from={paper_checkpoint} rather than ckpt_path=",
    )
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # no step was trained


@needs_fashion_mnist
def test_a_resume_may_change_the_fid_sampler(tmp_path, paper_checkpoint):
    """The FID's sampler scores the model: it is no part of what a resume must keep."""
    proc = train(tmp_path, *TINY, f"ckpt_path={paper_checkpoint}", "optim.max_steps=2", "sampler=ddpm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert step_of(tmp_path / "checkpoints" / "last.ckpt") == 2


def test_a_checkpoint_from_before_an_axis_existed_resumes_at_its_paper_value():
    model = build_dit("DiT-Ti/8", input_size=32, in_channels=1, num_classes=10)
    point = {"block": "adaln_zero", "model": "DiT-Ti", "patch": 8}
    header = {"coordinates": point, "model_config": dict(model.config)}  # no objective, repa, ...
    paper = DiTModule(
        model, create_diffusion(), IdentityAutoencoder(), info={"coordinates": default_axes() | point}
    )
    paper.check_resumable(header, "old.ckpt")
    flow = DiTModule(
        model,
        create_diffusion(),
        IdentityAutoencoder(),
        info={"coordinates": default_axes() | point | {"objective": "sit_linear"}},
    )
    with pytest.raises(ValueError, match=r"objective: 'ddpm' vs 'sit_linear'\); resume with"):
        flow.check_resumable(header, "old.ckpt")


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, capsys):
    saved_steps = []

    class Trainer:
        global_step, is_global_zero, fast_dev_run = 10, True, False
        strategy = ONE_PROCESS

        def save_checkpoint(self, path, weights_only=False):
            if self.global_step == 20:
                raise OSError(errno.ENOSPC, "No space left on device")
            saved_steps.append((Path(path).name, self.global_step))

    callback, trainer = Checkpointing(str(tmp_path), every_n_steps=10, keep_last=1), Trainer()
    callback.on_train_batch_end(trainer, None)
    trainer.global_step = 20
    callback.on_train_batch_end(trainer, None)  # the disk is full: no exception, one line
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        f"[ditlab] disk full: could not write {tmp_path / 'last.ckpt'} at step 20; {tmp_path / 'last.ckpt'} "
        "(step 10) is kept. Free space to save again."
    ]
    assert callback.saved_step == 10 and saved_steps == [("last.ckpt", 10), ("step_0000010.ckpt", 10)]
    trainer.global_step = 30
    callback.on_train_batch_end(trainer, None)  # space again: saving resumes
    assert callback.saved_step == 30


def test_numbered_checkpoints_keep_only_the_newest(tmp_path):
    class Trainer:
        is_global_zero, fast_dev_run, global_step = True, False, 0
        strategy = ONE_PROCESS

        def save_checkpoint(self, path, weights_only=False):
            Path(path).write_bytes(b"x")

    callback, trainer = (
        Checkpointing(str(tmp_path), every_n_steps=5, every_minutes=None, keep_last=2),
        Trainer(),
    )
    for step in range(1, 21):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.ckpt",
        "step_0000015.ckpt",
        "step_0000020.ckpt",
    ]


# ---- files that are not what they should be ------------------------------------------------------------


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def bad_files(tmp_path: Path) -> dict[str, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes, not a checkpoint\n")
    json_file = tmp_path / "config.json"
    json_file.write_text('{"lr": 0.0001}')
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "global_step": 3}, whole)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[:2000])
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": RunsCode()}, protocol=2))
    return {"text": text, "json": json_file, "truncated": truncated, "pickle": evil}


FILE_MESSAGES = {
    "text": "is not a checkpoint: it is a text file",
    "json": "is not a checkpoint: it is a text file",
    "truncated": "is truncated or corrupt",
    "pickle": "refused to load",
}


@needs_fashion_mnist
@pytest.mark.parametrize("kind", list(FILE_MESSAGES))
def test_a_bad_ckpt_path_is_named_for_what_it_is(tmp_path, kind):
    path = bad_files(tmp_path / "files")[kind]
    one_line_error(train(tmp_path / "run", *TINY, f"ckpt_path={path}"), str(path), FILE_MESSAGES[kind])


@needs_fashion_mnist
def test_a_bad_init_from_file_is_named_for_what_it_is(tmp_path):
    path = bad_files(tmp_path / "files")["text"]
    one_line_error(train(tmp_path / "run", *TINY, f"init_from={path}"), str(path), FILE_MESSAGES["text"])


@pytest.mark.parametrize("kind", ["json", "truncated", "pickle"])
def test_sample_and_export_name_a_bad_file_for_what_it_is(tmp_path, kind):
    path = bad_files(tmp_path)[kind]
    one_line_error(run("sample.py", f"ckpt={path}", f"out={tmp_path}/s", cwd=tmp_path), FILE_MESSAGES[kind])
    proc = run("export.py", f"ckpt={path}", f"safetensors={tmp_path / 'w.st'}", cwd=tmp_path)
    one_line_error(proc, FILE_MESSAGES[kind])


def test_evaluate_and_report_use_the_same_one_line_handler(tmp_path):
    one_line_error(run("evaluate.py", f"samples={tmp_path}/none.npz", "ref=fashion_mnist_test", cwd=tmp_path))
    one_line_error(run("report.py", f"runs={tmp_path}/none", cwd=tmp_path), "does not exist")


# ---- images ------------------------------------------------------------------------------------------------


def image_folder_with_a_corrupt_png(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    bad = root / "dogs" / "3.png"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    return bad


@pytest.mark.parametrize("skip", [False, True])
def test_a_corrupt_image_is_named_or_skipped_and_counted(tmp_path, skip):
    bad = image_folder_with_a_corrupt_png(tmp_path / "images")
    args = [
        *TINY,
        "data=image_folder",
        f"data.root={tmp_path}/images",
        "data.image_size=32",
        "data.num_workers=0",
        "data.limit_train_samples=null",
        "optim.max_steps=3",
        "optim.global_batch_size=16",
        f"data.skip_corrupt_images={str(skip).lower()}",
    ]
    proc = train(tmp_path / "run", *args)
    if skip:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"[ditlab] skipped unreadable image {bad} (1 so far)" in proc.stdout
        assert step_of(tmp_path / "run" / "checkpoints" / "last.ckpt") == 3
    else:
        one_line_error(proc, f"cannot read image {bad}", "data.skip_corrupt_images=true")


# ---- export without a VAE ------------------------------------------------------------------------------------


def test_export_of_a_latent_model_without_its_vae(tmp_path):
    """A released-format (latent, 4-channel) state dict whose VAE is not at hand (offline): one line
    that offers include_vae=false; with it, the transformer and scheduler alone and a note on adding the VAE."""
    from ditlab.models import build_dit

    model = build_dit("DiT-S/8", input_size=8, in_channels=4, num_classes=1000, learn_sigma=True)
    path = tmp_path / "DiT-S-8-64x64.pt"
    torch.save(model.state_dict(), path)
    export = ["export.py", f"ckpt={path}", f"diffusers={tmp_path / 'd'}"]
    one_line_error(run(*export, f"vae={tmp_path / 'no-such-vae'}", cwd=tmp_path), "include_vae=false")
    proc = run(*export, "include_vae=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "README.md",
        "ditlab.json",
        "scheduler",
        "transformer",
    ]
    assert "AutoencoderKL.from_pretrained" in (tmp_path / "d" / "README.md").read_text()


# ---- sweeps in seconds ------------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_fast_dev_run_sweep_skips_fid_and_grids(tmp_path):
    """`-m patch=2,4,8 ++trainer.fast_dev_run=true` with the default callbacks (a 500-sample FID each):
    three jobs in well under 3 minutes, no FID, no grid."""
    start = time.monotonic()
    proc = run(
        "train.py",
        "-m",
        "patch=2,4,8",
        "++trainer.fast_dev_run=true",
        "logger=none",
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - start < 180
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(runs) == 3
    assert "FID" not in proc.stdout and not any((r / "samples").exists() for r in runs)


def test_debug_configs_compose():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        tiny = compose("train", overrides=["debug=tiny"])
        fdr = compose("train", overrides=["debug=fdr"])
    assert (tiny.model.name, tiny.patch, tiny.net.depth, tiny.callbacks.fid.num_samples) == (
        "DiT-Ti",
        8,
        2,
        20,
    )
    assert fdr.trainer.fast_dev_run is True and not fdr.logger


def test_full_disk_is_one_line_in_the_cli_handler():
    from ditlab.cli import error_line

    assert error_line(OSError(errno.ENOSPC, "No space left on device", "/out/x")) == (
        "No space left on device: /out/x (check the path, its permissions and the free space)"
    )
    wrapped = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback:\n  ...\nValueError: cannot read image a.png"
    assert error_line(ValueError(wrapped)) == "cannot read image a.png"


def test_device_auto_is_this_ranks_gpu_else_the_cpu_and_a_bad_device_is_one_line(monkeypatch):
    from ditlab.cli import resolve_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda:1")  # torchrun's second process on this node
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"^device=cuda:2 but this machine sees 2 CUDA GPU\(s\)"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^device=cuda but this machine sees 0 CUDA GPU\(s\)"):
        resolve_device("cuda")
    with pytest.raises(
        ValueError, match=r"^device=gpu0 is not a device; use auto, cpu, cuda or cuda:<index>$"
    ):
        resolve_device("gpu0")


def test_checkpointing_setup_checks_room_for_two_checkpoints(tmp_path, monkeypatch):
    import shutil

    module = torch.nn.Linear(1000, 1000)  # 4 MB of weights, 8 MB of AdamW moments
    callback = Checkpointing(str(tmp_path))
    trainer = SimpleNamespace(is_global_zero=True)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=10 * 2**20))
    with pytest.raises(ValueError, match=r"has 10 MiB free; a checkpoint of this run takes ~12 MiB"):
        callback.setup(trainer, module, "fit")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=100 * 2**20))
    callback.setup(trainer, module, "fit")
