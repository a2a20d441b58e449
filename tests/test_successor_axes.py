"""The axes of the paper's successors through the command line: SiT's interpolant with its samplers,
LightningDiT's architecture options and REPA, trained, recorded as coordinates, sampled and swept."""

import json
import subprocess
import sys

import numpy as np

from ditlab.report.records import load_records
from test_train import ROOT, TINY, run_train

SUCCESSOR = [
    "diffusion=sit_linear",
    "block=adaln",
    "pos_embed=sincos_rope",
    "norm=rmsnorm",
    "qk_norm=true",
    "mlp=swiglu",
    "repa=random_vit",
]


def test_a_successor_point_trains_samples_and_records_its_coordinates(tmp_path):
    run_train(tmp_path, "debug=tiny", *SUCCESSOR, "trainer.max_steps=3")
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["coordinates"] == {
        "block": "adaln",
        "model": "DiT-Ti",
        "patch": 8,
        "objective": "sit_linear",
        "predict": "velocity",
        "time_sampling": "uniform",
        "time_shift": 1.0,
        "objective_args": "",
        "pos_embed": "sincos_rope",
        "norm": "rmsnorm",
        "qk_norm": True,
        "mlp": "swiglu",
        "long_skip": False,
        "repa": 0.5,
        "cosine_velocity": 0.0,
        "dispersive": 0.0,
        "loss_term_args": "",
        "mask_ratio": 0.0,
        "decoder_depth": 0,
        "recon_weight": 0.1,
        "finetune_steps": 0,
        "sampler": "euler",  # the FID's: the interpolant's default
        "sample_time_shift": 1.0,
    }
    assert record["fid"] is not None  # sampled with the interpolant's default sampler, Euler
    assert (tmp_path / "samples" / "final.png").is_file()
    (run,) = load_records([tmp_path])
    assert run.label.startswith("Ti/8 objective=sit_linear, predict=velocity, pos_embed=sincos_rope")
    assert "mlp=swiglu" in run.label and "repa=0.5" in run.label
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    for sampler in ("auto", "dopri5", "euler_maruyama"):
        out = tmp_path / f"samples-{sampler}.npz"
        args = [f"ckpt={ckpt}", f"out={out}", "num_samples=3", f"sampler={sampler}", "steps=3", "cfg_scale=2"]
        args += ["cfg_interval=[0.2,0.8]"]
        args += [f"hydra.run.dir={tmp_path}", "progress=false"]
        sample_py = str(ROOT / "src" / "sample.py")
        proc = subprocess.run([sys.executable, sample_py, *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert np.load(out)["arr_0"].shape[0] == 3


def test_a_ddim_sampler_on_an_interpolant_is_one_clear_line(tmp_path):
    proc = run_train(tmp_path, *TINY, "diffusion=sit_gvp", "sampler=ddim", check=False)
    assert proc.returncode != 0
    assert "use sampler=euler | heun | dopri5 | euler_maruyama" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_new_axes_sweep_with_multirun(tmp_path):
    run_train(
        tmp_path,
        "-m",
        *TINY,
        "diffusion=ddpm,sit_gvp",
        "pos_embed=sincos,rope",
        "trainer.max_steps=1",
        f"hydra.sweep.dir={tmp_path}/sweep",
    )
    coordinates = sorted(
        (c["objective"], c["pos_embed"])
        for c in (
            json.loads(p.read_text())["coordinates"] for p in (tmp_path / "sweep").glob("*/results.json")
        )
    )
    assert coordinates == [("ddpm", "rope"), ("ddpm", "sincos"), ("sit_gvp", "rope"), ("sit_gvp", "sincos")]
