"""A user's mistakes and a machine's faults at the command line (issue 19): one `error: ...` line with
exit status 2 and nothing half-written, and a training log holding only lines a user can act on."""

import errno
import os
import resource
import subprocess
import sys

import numpy as np
import pytest

from ditlab.io import atomic_path
from test_failures import ROOT, one_line_error, run
from test_sample_cli import write_tiny_ckpt
from test_train import TINY, needs_fashion_mnist, run_train

# ---- evaluate.py -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["png", "truncated npz"])
def test_evaluate_names_a_samples_file_that_is_no_npz(tmp_path, kind):
    if kind == "png":
        samples = tmp_path / "grid.png"
        samples.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    else:
        samples = tmp_path / "samples.npz"
        np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
        samples.write_bytes(samples.read_bytes()[:300])
    proc = run("evaluate.py", f"samples={samples}", "device=cpu", cwd=tmp_path)
    one_line_error(
        proc, "samples:", str(samples), "is not an .npz archive", "ADM-format .npz", "N×H×W×3 uint8"
    )
    assert not list(tmp_path.glob("*.metrics.json"))


# ---- report.py and W&B -------------------------------------------------------------------------------------


def test_report_from_wandb_without_an_api_key_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env |= {"HOME": str(tmp_path), "NETRC": str(tmp_path / "none"), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "report.py"), "wandb=team/ditlab", f"out={tmp_path / 'r'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    one_line_error(proc, "wandb=team/ditlab", "needs an API key", "wandb login", "WANDB_API_KEY")
    assert not (tmp_path / "r").exists()


def test_report_turns_a_wandb_failure_into_one_line(monkeypatch):
    import wandb.errors
    from omegaconf import OmegaConf

    from ditlab.report import build

    def unreachable(project, group):
        raise wandb.errors.CommError("Could not connect to api.wandb.ai")

    monkeypatch.setattr(build, "wandb_logged_in", lambda: True)
    monkeypatch.setattr(build, "load_wandb_records", unreachable)
    with pytest.raises(
        ValueError, match=r"^wandb=team/ditlab: W&B failed \(Could not connect to api\.wandb\.ai\)"
    ):
        build.run_report(OmegaConf.create({"wandb": "team/ditlab"}))


# ---- export.py ---------------------------------------------------------------------------------------------


def test_atomic_write_errors_name_the_users_path(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(OSError) as caught, atomic_path(target) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "part"))
    assert caught.value.filename == str(target / "part")
    with pytest.raises(OSError) as caught, atomic_path(target):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert (caught.value.errno, caught.value.filename) == (errno.ENOSPC, str(target))
    assert list(tmp_path.iterdir()) == []


def test_export_onto_a_folder_names_that_folder(tmp_path):
    ckpt, folder = write_tiny_ckpt(tmp_path / "tiny.ckpt"), tmp_path / "existing"
    folder.mkdir()
    line = one_line_error(run("export.py", f"ckpt={ckpt}", f"safetensors={folder}", cwd=tmp_path))
    assert line == f"error: Is a directory: {folder} (check the path, its permissions and the free space)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "tiny.ckpt"]


@pytest.mark.parametrize("target", ["safetensors=w.safetensors", "diffusers=pipe"])
def test_export_onto_a_full_disk_names_the_users_path(tmp_path, target):
    ckpt = write_tiny_ckpt(tmp_path / "tiny.ckpt")

    def small_disk() -> None:  # writes past 20 kB fail with EFBIG, as on a full disk (ENOSPC)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "export.py"), f"ckpt={ckpt}", target],
        cwd=tmp_path,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_disk,
    )
    one_line_error(proc, f"File too large: {target.split('=')[1]} (check the path")  # as the user wrote it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.ckpt"]  # no temporary file left


def test_the_old_export_command_line_points_to_the_new_one(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ditlab.interop.export", "--ckpt", "last.ckpt", "--safetensors=w.st", "--raw"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    one_line_error(proc, "python src/export.py ckpt=last.ckpt safetensors=w.st use_ema=false")
    assert list(tmp_path.iterdir()) == []


# ---- sample.py ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (
            ["sampler=ddim", "+sampler.options.etaa=1"],
            ["sampler.options.etaa", "etaa is not an option of sampler ddim", "its options: eta"],
        ),
        (["classes=[]"], ["classes=[] is empty", "classes=[0,1,2]", "classes=null for num_samples=2"]),
        (["batch_size=0"], ["batch_size=0 is out of range: it must be ≥ 1"]),
    ],
)
def test_sample_names_the_bad_option(tmp_path, overrides, fragments):
    ckpt = write_tiny_ckpt(tmp_path / "tiny.ckpt")
    proc = run("sample.py", f"ckpt={ckpt}", "num_samples=2", "steps=2", "out=s", *overrides, cwd=tmp_path)
    one_line_error(proc, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.ckpt"]


def test_sample_refuses_to_resume_from_a_changed_checkpoint(tmp_path):
    ckpt = write_tiny_ckpt(tmp_path / "last.ckpt", seed=0)
    args = (
        f"ckpt={ckpt}",
        "num_samples=4",
        "batch_size=2",
        "steps=2",
        "png=false",
        "out=s",
        "progress=false",
    )
    assert run("sample.py", *args, "keep_parts=true", cwd=tmp_path).returncode == 0
    for finished in ("s.npz", "s.json"):  # killed before the end: only the shards are there
        (tmp_path / finished).unlink()
    write_tiny_ckpt(ckpt, seed=1)  # training went on and overwrote it
    one_line_error(
        run("sample.py", *args, cwd=tmp_path),
        "the checkpoint (ckpt=) changed since the shards in",
        "delete s.parts to sample anew",
    )
    assert not (tmp_path / "s.npz").exists()


# ---- train.py ----------------------------------------------------------------------------------------------

LIBRARY_NOISE = (
    "litlogger",  # Lightning's advertisement
    "validation_step",  # a val_dataloader without a validation loop
    "LeafSpec",  # torch's deprecation, from Lightning's code
    "module(s) in eval mode",  # the EMA copy
)


@needs_fashion_mnist
def test_a_training_log_holds_whole_lines_and_no_library_noise(tmp_path):
    proc = run_train(tmp_path, *TINY)  # stdout and stderr are pipes: no terminal, as in a log file
    text = proc.stdout + proc.stderr
    assert [noise for noise in LIBRARY_NOISE if noise in text] == []
    assert max(len(line) for line in text.splitlines()) < 1000 and "\r" not in text
    assert "step 3/3 [" in text  # the progress, as a line
