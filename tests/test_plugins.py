"""Extending ditlab from outside `src/ditlab`: a fifth block, a new size, a new sampler and a new dataset,
one class (or registered value) and one YAML each (`tests/plugins/`), found through Hydra's search path and
the Python path, trained and sampled without editing a ditlab file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab.diffusion import PATHS, SAMPLERS, create_diffusion
from ditlab.diffusion.interpolant import Interpolant
from ditlab.models import BLOCKS, DIT_SIZES
from ditlab.report import load_records, table4_rows

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "tests" / "plugins"


def test_a_users_block_size_sampler_and_dataset_train_and_sample(tmp_path):
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONPATH": f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    args = [
        sys.executable,
        str(ROOT / "src" / "train.py"),
        f"hydra.searchpath=[file://{PLUGINS / 'conf'}]",
        "block=film",
        "model=DiT-Pico",
        "sampler=ddim_noisy",
        "data=stripes",
        "patch=4",
        "debug=tiny",
        "~callbacks.fid",
        "logger=none",
        "optim.max_steps=2",
        "callbacks.sample_grid.steps=3",
        f"hydra.run.dir={tmp_path}",
    ]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    config = ckpt["ditlab"]["model_config"]
    assert ckpt["global_step"] == 2 and config["block"] == "film"
    assert (config["hidden_size"], config["num_heads"], config["input_size"], config["num_classes"]) == (
        48,
        2,
        16,
        4,
    )
    assert any(k.startswith("model.blocks.0.film.") for k in ckpt["state_dict"])
    assert (tmp_path / "samples" / "final.png").is_file()  # sampled with the plugin's sampler
    # ditlab's own registries are untouched in this process: the plugin lives outside it.
    assert "film" not in BLOCKS and "DiT-Pico" not in DIT_SIZES and "ddim_noisy" not in SAMPLERS


def test_a_users_interpolant_path_is_imported_by_its_module():
    # In a child process, so that this one's PATHS stay ditlab's own.
    code = (
        "import torch; from ditlab.diffusion.interpolant import Interpolant; "
        "i = Interpolant(path='quadratic', path_module='ditlab_plugins'); "
        "t = torch.tensor([0.0, 0.5, 1.0]); print([c.tolist() for c in i.path.coefficients(t)])"
    )
    env = {**os.environ, "PYTHONPATH": f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[[0.0, 0.25, 1.0], [1.0, 0.75, 0.0], [0.0, 1.0, 2.0], [-0.0, -1.0, -2.0]]"
    assert "quadratic" not in PATHS
    with pytest.raises(ValueError, match=r"^diffusion.path_module=no_such_plugin cannot be imported"):
        Interpolant(path="quadratic", path_module="no_such_plugin")


def test_a_users_objective_trains_is_named_and_samples_from_its_checkpoint(tmp_path):
    """An objective registered in the user's module (`register_objective`) and chosen by its YAML: the run's
    coordinates and name carry it, and sample.py and the safetensors export find it through the registry."""
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "PYTHONPATH": f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    run = tmp_path / "run"
    train = [sys.executable, str(ROOT / "src" / "train.py"), f"hydra.searchpath=[file://{PLUGINS / 'conf'}]"]
    train += ["diffusion=ddpm_x0_cosine", "data=stripes", "model=DiT-Pico", "debug=tiny", "~callbacks.fid"]
    train += ["logger=none", "optim.max_steps=2", "callbacks.sample_grid.steps=2", f"hydra.run.dir={run}"]
    proc = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run / "results.json").read_text())
    assert record["coordinates"]["objective"] == "ddpm_x0_cosine"
    assert record["run_name"] == "adaln_zero-DiT-Pico-p8+ddpm_x0_cosine"
    sample = [sys.executable, str(ROOT / "src" / "sample.py"), f"ckpt={run / 'checkpoints' / 'last.ckpt'}"]
    sample += ["sampler=ddim", "steps=2", "num_samples=2", "png=false", f"out={tmp_path / 'samples'}"]
    proc = subprocess.run(sample, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)  # ADM format: RGB
    # The objective is rebuilt from the checkpoint through the registry: cosine schedule, x0-prediction.
    code = (
        "from ditlab.interop import load_dit; from ditlab.diffusion import build_objective; "
        f"o = build_objective(load_dit({str(run / 'checkpoints' / 'last.ckpt')!r}).diffusion); "
        "print(o.predict, round(float(o.betas[-1]), 4))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [
        "x0",
        str(round(float(create_diffusion(noise_schedule="cosine").betas[-1]), 4)),
    ]


def test_a_users_whole_new_axis_is_swept_named_tagged_recorded_and_reported(tmp_path):
    """A new axis (label dropout) from tests/plugins alone: one `register_axis` in the user's module and one
    config group; swept with -m, it is in the run names, the W&B tags, results.json and the report's table."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONPATH": f"{PLUGINS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    sweep = tmp_path / "sweep"
    args = [
        sys.executable,
        str(ROOT / "src" / "train.py"),
        "-m",
        f"hydra.searchpath=[file://{PLUGINS / 'conf'}]",
    ]
    args += [
        "+label_dropout=no_label_drop,label_drop_10",
        "debug=tiny",
        "~callbacks.fid",
        "~callbacks.sample_grid",
    ]
    args += ["logger=wandb", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    off, paper = sweep / "0_adaln_zero-DiT-Ti-p8+no_label_drop", sweep / "1_adaln_zero-DiT-Ti-p8"  # run names
    records = {p: json.loads((p / "results.json").read_text()) for p in (off, paper)}
    assert records[off]["coordinates"]["label_dropout"] == "no_label_drop"
    assert records[off]["run_name"] == "adaln_zero-DiT-Ti-p8+no_label_drop"
    assert records[paper]["coordinates"]["label_dropout"] == "label_drop_10"
    assert records[off]["config"]["net"]["class_dropout_prob"] == 0.0  # the axis acted on the run
    for run, value in ((off, b"label_dropout=no_label_drop"), (paper, b"label_dropout=label_drop_10")):
        [wandb_run] = run.glob("wandb/offline-run-*/run-*.wandb")
        assert value in wandb_run.read_bytes()  # among the W&B run's tags
    rows = table4_rows(load_records(sweep))  # in this process, where the plugin was never imported
    assert sorted(row["axes"] for row in rows) == ["", "label_dropout=no_label_drop"]
