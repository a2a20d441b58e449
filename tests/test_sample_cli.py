import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ditlab.diffusion import SamplingSpec
from ditlab.grids import grid_image
from ditlab.interop.checkpoints import load_dit
from ditlab.interop.generation import generate
from ditlab.models import DiT

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "sample.py"
TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return write_tiny_ckpt(tmp_path / "tiny.ckpt")


def write_tiny_ckpt(path: Path, seed: int = 0) -> Path:
    """A ditlab checkpoint of a tiny pixel-space model with random (non-zero) EMA weights drawn from `seed`."""
    model = DiT(**TINY)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    state = {f"{prefix}.{k}": v for prefix in ("model", "ema") for k, v in model.state_dict().items()}
    header = {
        "version": 1,
        "model_config": model.config,
        "diffusion": {"learn_sigma": True, "noise_schedule": "linear", "diffusion_steps": 1000},
        "autoencoder": {"name": "identity", "pretrained": None, "scale_factor": 1.0},
        "data": {"name": "toy", "num_classes": 3, "image_size": 8, "channels": 1, "class_names": None},
    }
    torch.save({"state_dict": state, "ditlab": header}, path)
    return path


def sample_cli(tmp_path: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, str(SAMPLE), *overrides, f"hydra.run.dir={tmp_path}", "progress=false"]
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    return out


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return f["arr_0"], f["arr_1"]


def test_cli_class_grid_and_npz_match_the_library(tmp_path, ckpt):
    args = (
        f"ckpt={ckpt}",
        "classes=[0,2]",
        "per_class=3",
        "steps=3",
        "seed=5",
        "cfg_scale=2.0",
        "batch_size=4",
    )
    out = finish(sample_cli(tmp_path, *args, f"out={tmp_path / 'grid'}"))
    assert f"npz: {tmp_path / 'grid.npz'}" in out and f"png: {tmp_path / 'grid.png'}" in out
    images, labels = read_npz(tmp_path / "grid.npz")
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8  # the ADM evaluator's layout
    assert labels.tolist() == [0, 0, 0, 2, 2, 2]
    # A row per class, named by its index (the checkpoint names no classes), titled from the model config.
    title = "adaln_zero-DiT(depth=2, hidden=32)-p2 · EMA weights, ddpm 3 steps, cfg 2"
    expected_grid = grid_image(images, labels.tolist(), per_row=3, title=title)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid.png")), np.asarray(expected_grid))
    assert not (tmp_path / "grid.parts").exists()

    expected = generate(
        load_dit(ckpt),
        tmp_path / "lib",
        SamplingSpec("ddpm", steps=3, seed=5, cfg_scale=2.0),
        labels=labels.tolist(),
        batch_size=6,
        png=False,
        progress=False,
    )
    np.testing.assert_array_equal(read_npz(expected["npz"])[0], images)


@pytest.mark.slow
def test_cli_resumes_an_interrupted_job_on_two_ranks(tmp_path, ckpt):
    args = (
        f"ckpt={ckpt}",
        "num_samples=6",
        "steps=3",
        "batch_size=2",
        f"out={tmp_path / 'fid'}",
        "png=false",
    )
    finish(sample_cli(tmp_path, *args, "keep_parts=true"))
    images, labels = read_npz(tmp_path / "fid.npz")
    (tmp_path / "fid.npz").unlink()  # interrupted: the final file and two shards missing
    for shard in ("00000000-00000002.npz", "00000004-00000006.npz"):
        (tmp_path / "fid.parts" / shard).unlink()
    ranks = [
        sample_cli(tmp_path, *args, env={"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)})
        for r in (0, 1)
    ]
    outputs = [finish(p) for p in ranks]
    assert f"npz: {tmp_path / 'fid.npz'}" in outputs[0] and "npz:" not in outputs[1]
    resumed = read_npz(tmp_path / "fid.npz")
    np.testing.assert_array_equal(resumed[0], images)
    np.testing.assert_array_equal(resumed[1], labels)
