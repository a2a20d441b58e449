"""Network evaluations (NFE) as a coordinate: counted by `sample()`, recorded and reported; the FID-vs-NFE
command (src/fid_nfe.py) end to end on tiny checkpoints with a stub feature network."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ditlab.diffusion import Interpolant, SamplingSpec, create_diffusion, sample
from ditlab.diffusion.sampling import Evaluations, image_generators
from ditlab.interop.checkpoints import load_dit
from ditlab.interop.generation import ImageSampler
from ditlab.models import DiT
from ditlab.report import fid_nfe, load_records, runs_markdown, table4_markdown
from ditlab.report.figures import plot_fid_vs_nfe
from test_metrics import StubFeatures, frechet_closed_form
from test_report import current_record, write_records
from test_sample_cli import TINY, write_tiny_ckpt
from test_train import needs_fashion_mnist, run_train

ROOT = Path(__file__).resolve().parents[1]


def stand_in(x, t, y):
    """A class-conditional stand-in for a DiT (2C output channels)."""
    out = torch.tanh(x) * 0.5 + 0.01 * y.to(x.dtype).view(-1, 1, 1, 1)
    return torch.cat([out, torch.zeros_like(out)], 1)


# The counter -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "objective", "steps", "cfg_scale", "interval", "nfe"),
    [
        ("ddim", "ddpm", 5, 1.0, None, 5),
        ("ddim", "ddpm", 5, 4.0, None, 10),  # a guided step runs the doubled batch: 2 evaluations
        ("ddpm", "ddpm", 10, 4.0, (0.0, 0.5), 10 + 5),  # guided only on the half nearest the noise
        ("dpmsolver++", "ddpm", 7, 2.0, None, 14),
        ("unipc", "ddpm", 7, 1.0, None, 7),
        ("euler", "sit", 6, 2.0, None, 12),
        ("heun", "sit", 6, 1.0, None, 12),  # two evaluations per step
        ("euler_maruyama", "sit", 6, 1.0, None, 7),  # and SiT's "Mean" last step
    ],
)
def test_sample_counts_network_evaluations_per_image(sampler, objective, steps, cfg_scale, interval, nfe):
    diffusion = create_diffusion() if objective == "ddpm" else Interpolant()
    spec = SamplingSpec(sampler, steps=steps, cfg_scale=cfg_scale, cfg_interval=interval)
    evaluations = Evaluations()
    for indices in (range(3), range(3, 5)):  # one counter over two batches: their mean
        gens = image_generators(0, indices, "cpu")
        sample(stand_in, diffusion, gens, (1, 2, 2), spec, num_classes=3, evaluations=evaluations)
    assert (evaluations.images, evaluations.per_image) == (5, nfe)


def test_dopri5_counts_what_it_took():
    evaluations, spec = Evaluations(), SamplingSpec("dopri5", {"rtol": 1e-6})
    sample(
        stand_in,
        Interpolant(),
        image_generators(0, range(2), "cpu"),
        (1, 2, 2),
        spec,
        num_classes=3,
        evaluations=evaluations,
    )
    assert evaluations.per_image > 6 and evaluations.per_image % 1 == 0  # at least one 6-stage step
    assert Evaluations().per_image is None


@needs_fashion_mnist
def test_a_run_samples_its_grids_and_fid_with_dpm_solver_and_records_the_nfe(tmp_path):
    fid = ["callbacks.fid.cfg_scale=2", "callbacks.fid.steps=3", f"callbacks.fid.cache_dir={tmp_path}/cache"]
    proc = run_train(tmp_path, "debug=tiny", "sampler=dpmsolver++", "sampler.options.solver_order=3", *fid)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["coordinates"]["sampler"] == "dpmsolver++" and record["fid_sampler"].startswith(
        "dpmsolver++ 3"
    )
    assert record["fid_nfe"] == record["fid_history"][-1]["nfe"] == 6  # 3 guided steps, 2 evaluations each
    assert "NFE 6" in proc.stdout and (tmp_path / "samples" / "final.png").is_file()
    with open(next(tmp_path.glob("csv/version_*/metrics.csv"))) as f:
        assert [float(r["fid_nfe"]) for r in csv.DictReader(f) if r.get("fid_nfe")] == [6.0]


def test_the_report_shows_the_nfe_where_records_have_it(tmp_path):
    docs = [current_record(120.0, 0, fid_nfe=10.0), current_record(130.0, 1, fid_nfe=10.0)]
    records = load_records(write_records(tmp_path / "runs", docs))
    assert [r.nfe for r in records] == [10.0, 10.0]
    runs = runs_markdown(records)
    assert "| FID | NFE | FID along the run" in runs and "| 120.00 | 10.0 |" in runs
    assert "NFE per image: 10.0" in table4_markdown(records)
    older = load_records(write_records(tmp_path / "older", [current_record(120.0, 0)]))
    assert "NFE" not in runs_markdown(older) + table4_markdown(older)  # nothing recorded: no column


def test_the_figure_has_one_line_per_sampler_through_its_nfe():
    points = [
        {"sampler": "ddim", "nfe": 10.0, "fid_per_seed": {"0": 50.0, "1": 54.0}},
        {"sampler": "ddim", "nfe": 5.0, "fid_per_seed": {"0": 80.0, "1": 84.0}},
        {"sampler": "unipc", "nfe": 5.0, "fid_per_seed": {"0": 60.0, "1": 62.0}},
    ]
    ax = plot_fid_vs_nfe(points, title="t").axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["ddim", "unipc"]
    assert list(lines["ddim"].get_xdata()) == [5.0, 10.0] and list(lines["ddim"].get_ydata()) == [82.0, 52.0]
    assert "2 sampling seeds" in ax.get_title()


# The command -------------------------------------------------------------------------------------------


def write_sit_ckpt(path: Path) -> Path:
    """A tiny pixel-space checkpoint of SiT's linear interpolant (random EMA weights)."""
    model = DiT(**TINY)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    state = {f"{prefix}.{k}": v for prefix in ("model", "ema") for k, v in model.state_dict().items()}
    header = {
        "version": 1,
        "model_config": model.config,
        "diffusion": {"_target_": "ditlab.diffusion.interpolant.Interpolant", "path": "linear"},
        "autoencoder": {"name": "identity", "pretrained": None, "scale_factor": 1.0},
        "data": {"name": "toy", "num_classes": 3, "image_size": 8, "channels": 1, "class_names": None},
    }
    torch.save({"state_dict": state, "ditlab": header}, path)
    return path


@pytest.fixture
def stub_features(monkeypatch):
    monkeypatch.setattr(fid_nfe, "InceptionFeatures", lambda *args, **kwargs: StubFeatures())


def reference_images(path: Path) -> Path:
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(path, arr_0=images)
    return path


def config(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("fid_nfe", overrides=["device=cpu", "batch_size=8", *overrides])


def test_fid_against_nfe_of_a_ddpm_checkpoint(tmp_path, stub_features, capsys):
    ckpt = write_tiny_ckpt(tmp_path / "tiny.ckpt")
    ref = reference_images(tmp_path / "ref.npz")
    cfg = config(
        f"ckpt={ckpt}",
        f"ref={ref}",
        f"cache_dir={tmp_path / 'cache'}",
        f"out={tmp_path / 'out'}",
        "samplers=[ddim,dpmsolver++,unipc,euler]",
        "steps=[2,5]",
        "seeds=[0,1]",
        "num_samples=16",
        "cfg_scale=2",
        "sampler_options={dpmsolver++: {solver_order: 3}}",
    )
    written = fid_nfe.run_fid_nfe(cfg)
    out = capsys.readouterr().out
    assert written == {"json": tmp_path / "out" / "fid_nfe.json", "png": tmp_path / "out" / "fid_vs_nfe.png"}
    assert written["png"].stat().st_size > 10_000
    document = json.loads(written["json"].read_text())
    nfe = {(p["sampler"], p["steps"]): p["nfe"] for p in document["points"]}
    assert nfe == {
        (s, n): 2.0 * n for s in ("ddim", "dpmsolver++", "unipc") for n in (2, 5)
    }  # guided: 2 per step
    # The interpolant's sampler does not fit: skipped in one line each, the sweep went on.
    assert [(p["sampler"], p["steps"]) for p in document["skipped"]] == [("euler", 2), ("euler", 5)]
    assert "skipped euler 2 steps: sampler=euler samples a Interpolant" in out
    assert "6 point(s), 2 skipped" in out
    assert document["points"][2]["options"] == {"solver_order": 3}
    assert document["seeds"] == [0, 1] and document["num_samples"] == 16
    assert document["git"]["commit"] is None or len(document["git"]["commit"]) == 40
    assert (
        document["versions"]["torch"] == torch.__version__
        and document["feature_network"] == StubFeatures.identity
    )

    # A point's FID is that of the images sample.py makes with its sampler, steps, guidance and seed.
    point = next(p for p in document["points"] if (p["sampler"], p["steps"]) == ("dpmsolver++", 5))
    loaded = load_dit(ckpt)
    reference = StubFeatures()(torch.from_numpy(np.load(ref)["arr_0"]).permute(0, 3, 1, 2)).numpy()
    for seed in (0, 1):
        spec = SamplingSpec("dpmsolver++", {"solver_order": 3}, 5, 2.0, seed=seed)
        images, _ = ImageSampler(loaded, spec)(range(16))
        features = StubFeatures()(images.permute(0, 3, 1, 2)).double().numpy()
        assert point["fid_per_seed"][str(seed)] == pytest.approx(
            frechet_closed_form(reference, features), rel=1e-4
        )
    assert point["fid"] == pytest.approx(np.mean(list(point["fid_per_seed"].values())))


def test_fid_against_nfe_of_a_sit_checkpoint_and_the_run_s_own_reference(tmp_path, stub_features):
    # A checkpoint in a run's folder, scored against the reference its FID callback names (ref=null).
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = write_sit_ckpt(run / "checkpoints" / "last.ckpt")
    ref = reference_images(tmp_path / "ref.npz")
    fid = {"reference": str(ref), "cache_dir": str(tmp_path / "cache"), "num_reference_images": 1000}
    (run / "results.json").write_text(json.dumps({"config": {"callbacks": {"fid": fid}}}))
    cfg = config(
        f"ckpt={ckpt}", "samplers=[euler,heun,dopri5,euler_maruyama,ddim]", "steps=[2,4]", "num_samples=8"
    )
    written = fid_nfe.run_fid_nfe(cfg)
    assert written["json"] == run / "fid_nfe" / "fid_nfe.json"
    document = json.loads(written["json"].read_text())
    nfe = {(p["sampler"], p["steps"]): p["nfe"] for p in document["points"]}
    assert {k: v for k, v in nfe.items() if k[0] != "dopri5"} == {
        ("euler", 2): 2,
        ("euler", 4): 4,
        ("heun", 2): 4,
        ("heun", 4): 8,
        ("euler_maruyama", 2): 3,
        ("euler_maruyama", 4): 5,
    }
    assert nfe[("dopri5", None)] > 0  # adaptive: one point, steps ignored
    assert [p["sampler"] for p in document["skipped"]] == ["ddim", "ddim"]
    assert document["reference"].endswith("ref.npz") and list((tmp_path / "cache").glob("*.npz"))


def test_bad_input_ends_in_one_line_before_the_checkpoint_is_read(tmp_path, monkeypatch):
    ckpt = write_tiny_ckpt(tmp_path / "tiny.ckpt")
    monkeypatch.setattr(fid_nfe, "load_dit", lambda *args, **kwargs: pytest.fail("the checkpoint was read"))
    for overrides, message in [
        (
            ("samplers=[unipc]", "sampler_options={unipc: {solver_order: 0}}"),
            "sampler_options.unipc: sampler.options.solver_order=0: unipc takes an integer ≥ 1",
        ),
        (("sampler_options={ddpm: {}}",), "sampler_options.ddpm: ddpm is not one of samplers="),
        (("steps=[0,5]",), "steps=[0, 5]: 0 is not an integer ≥ 1"),
        (("seeds=[]",), "seeds=[] is empty"),
        ((), f"ref=null scores against the checkpoint's own training run, but {ckpt} is not in a run's"),
    ]:
        cfg = config(f"ckpt={ckpt}", "samplers=[ddim,dpmsolver++]", *overrides)
        with pytest.raises(ValueError, match=f"^{re.escape(message)}") as error:
            fid_nfe.run_fid_nfe(cfg)
        assert "\n" not in str(error.value)
    # Through the command: one line, exit status 2, nothing written.
    run = subprocess.run(
        [sys.executable, str(ROOT / "src" / "fid_nfe.py"), f"ckpt={ckpt}", "samplers=[ddim,dpm]"],
        cwd=tmp_path,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    message = "error: samplers: dpm is not a sampler; valid: ddpm, ddim, dpmsolver++, unipc, euler"
    assert run.returncode == 2 and run.stderr.startswith(message) and run.stderr.count("\n") == 1, run.stderr
    assert not (tmp_path / "fid_nfe").exists()
