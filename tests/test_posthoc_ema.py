"""Post-hoc EMA (EDM2): the closed forms against numerics, the reconstruction on a synthetic trajectory against
an EMA tracked directly, the callback in a tiny training run and its exact resume, and the command's
checkpoints through the project's loader and their FID against σ_rel (fid=true) with the run's FID settings."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from scipy.integrate import quad

from ditlab.interop.checkpoints import load_dit
from ditlab.io import content_sha256
from ditlab.report import fid_nfe, posthoc_ema_fid
from ditlab.training.callbacks import PostHocEMA
from ditlab.training.posthoc_ema import (
    SIGMA_REL_MAX,
    PowerFunctionEMA,
    find_snapshots,
    gamma_to_sigma_rel,
    power_profile,
    profile_dot,
    reconstruct,
    run_posthoc_ema,
    sigma_rel_to_gamma,
    solve_weights,
    write_snapshot,
)
from test_class_accuracy import class_accuracy
from test_fid_nfe import config as fid_nfe_config
from test_metrics import StubFeatures
from test_train import TINY, needs_fashion_mnist, run_train

ROOT = Path(__file__).resolve().parents[1]
SIGMA_RELS = [0.001, 0.01, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3, SIGMA_REL_MAX]


# ---- the closed forms --------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", SIGMA_RELS)
def test_gamma_is_the_largest_root_of_the_cubic_and_round_trips(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    s = sigma_rel**-2
    numerical = max(r.real for r in np.roots([1, 7, 16 - s, 12 - s]) if abs(r.imag) < 1e-6)
    # np.roots (eigenvalues of the companion matrix) loses digits at the double root of SIGMA_REL_MAX.
    tolerance = 1e-6 if sigma_rel == SIGMA_REL_MAX else 1e-9
    assert gamma == pytest.approx(numerical, rel=tolerance, abs=tolerance)
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert gamma >= (math.sqrt(5) - 3) / 2 - 1e-9  # the branch whose weight grows with τ


def test_edm2_s_profiles():
    # EDM2 (Karras et al. 2024) quotes γ = 16.97 for σ_rel = 0.05 and 6.94 for σ_rel = 0.10.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize("bad", [0, -0.1, 0.31, 1.0, "0.1", None, True])
def test_sigma_rel_out_of_range_names_its_key(bad):
    with pytest.raises(
        ValueError, match=rf"^callbacks\.posthoc_ema\.sigma_rels={re.escape(str(bad))} is out of"
    ):
        sigma_rel_to_gamma(bad, "callbacks.posthoc_ema.sigma_rels")


@pytest.mark.parametrize(("gamma", "t"), [(-0.38, 1.0), (0.0, 7.0), (6.94, 300.0), (16.97, 4e5), (97.0, 1e6)])
def test_the_profile_integrates_to_one_with_its_sigma_rel(gamma, t):
    def moment(k: int) -> float:
        return quad(lambda tau: (tau / t) ** k * power_profile(tau, gamma, t), 0, t, limit=200, epsabs=0)[0]

    assert moment(0) == pytest.approx(1.0, rel=1e-9)
    mean = moment(1)
    assert math.sqrt(moment(2) - mean**2) == pytest.approx(gamma_to_sigma_rel(gamma), rel=1e-7)
    assert power_profile(np.array([0.0, -1.0, t * 1.5]), gamma, t).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ((100.0, 6.94), (100.0, 6.94)),
        ((100.0, 6.94), (250.0, 16.97)),
        ((250.0, 16.97), (100.0, 6.94)),
        ((3.0, -0.3), (5.0, 0.0)),
        ((4e5, 97.0), (3.5e5, 16.97)),  # t^(γ+1) overflows float64: the closed form works in ratios
    ],
)
def test_the_inner_product_closed_form_against_numerical_integration(a, b):
    m = min(a[0], b[0])
    numerical = quad(
        lambda tau: power_profile(tau, a[1], a[0]) * power_profile(tau, b[1], b[0]),
        0,
        m,
        limit=200,
        epsabs=0,
        epsrel=1e-12,
    )[0]
    assert profile_dot(*a, *b) == pytest.approx(numerical, rel=1e-9)
    assert profile_dot(*a, *b) == profile_dot(*b, *a)


def step_weights(gamma: float, t: int) -> np.ndarray:
    """The profile's integral over each step's interval (τ − 1, τ], τ = 1..t."""
    edges = (np.arange(t + 1) / t) ** (gamma + 1)
    return np.diff(edges)


def test_the_ema_recursion_is_the_profile_on_the_piecewise_constant_trajectory():
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.2)]
    trajectory = torch.randn(40, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ema = PowerFunctionEMA([torch.zeros(5, dtype=torch.float64)], gammas)
    for t in range(1, 41):
        ema.update([trajectory[t - 1]])
        if t == 1:  # β_1 = 0: the EMA of the first step is that step's weights, exactly
            assert all(torch.equal(a[0], trajectory[0]) for a in ema.averages)
        for gamma, averages in zip(gammas, ema.averages, strict=True):
            expected = torch.from_numpy(step_weights(gamma, t)) @ trajectory[:t]
            torch.testing.assert_close(averages[0], expected, rtol=1e-12, atol=1e-12)
    assert ema.step == 40


def test_averages_of_bf16_weights_are_kept_in_float32():
    ema = PowerFunctionEMA([torch.ones(3, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64)], [1.0])
    assert [a.dtype for a in ema.averages[0]] == [torch.float32, torch.float64]


# ---- the reconstruction on a synthetic trajectory --------------------------------------------------------


def test_reconstruction_matches_a_profile_tracked_directly(tmp_path):
    """Random-walk weights for 300 steps, two profiles (σ_rel 0.05, 0.10) saved every 10 steps; σ_rel 0.07
    reconstructed at three steps against the same profile tracked step by step.

    The tolerance follows from the approximation, not from this machine: every EMA is the integral of its
    profile against the piecewise-constant trajectory θ (see the module docstring), so the reconstruction's
    error in a coordinate is exactly −∫ e(τ) θ(τ) dτ with e = p_target − Σ x_i p_i the least-squares
    residual, bounded by Cauchy-Schwarz by ‖e‖₂ ‖θ‖₂ over (0, t] (‖e‖ from `solve_weights`; ‖θ‖₂² = Σ θ_τ²).
    The test asserts that bound, and that the error equals its exact value Σ_τ e_τ θ_τ (e_τ: e's integral
    over step τ, negated) up to float64 rounding: 1e-9 is orders above the rounding of a few hundred float64
    updates of values ~10 and below any error of the method.
    """
    steps, every, coordinates = 300, 10, 1000
    generator = torch.Generator().manual_seed(0)
    walk = torch.cumsum(torch.randn(steps, coordinates, dtype=torch.float64, generator=generator), 0)
    walk += 3.0  # not centred on 0: the weights' sum matters too
    tracked, target = [0.05, 0.10], 0.07
    gammas = [sigma_rel_to_gamma(s) for s in tracked]
    gamma_target = sigma_rel_to_gamma(target)
    ema = PowerFunctionEMA([walk[0]], [*gammas, gamma_target])
    direct = {}
    for t in range(1, steps + 1):
        ema.update([walk[t - 1]])
        direct[t] = ema.averages[2][0].clone()
        if t % every == 0:
            for sigma_rel, gamma, averages in zip(tracked, gammas, ema.averages[:2], strict=True):
                write_snapshot(tmp_path / "posthoc_ema", t, sigma_rel, gamma, {"w": averages[0]}, [], {})
    snapshots = find_snapshots(tmp_path)
    assert len(snapshots) == 2 * steps // every
    for t in (300, 250, 255):  # 255: between snapshots, from those up to it
        used = [s for s in snapshots if s.step <= t]
        weights, relative_error = solve_weights([(s.step, s.gamma) for s in used], (t, gamma_target))
        rebuilt = reconstruct(used, weights)["w"]
        error = rebuilt - direct[t]
        residual_norm = relative_error * math.sqrt(profile_dot(t, gamma_target, t, gamma_target))
        bound = residual_norm * walk[:t].square().sum(0).sqrt()
        assert (error.abs() <= bound * (1 + 1e-9)).all()
        residual_steps = torch.from_numpy(
            step_weights(gamma_target, t)
            - sum(
                x * np.pad(step_weights(s.gamma, s.step), (0, t - s.step))
                for s, x in zip(used, weights, strict=True)
            )
        )
        torch.testing.assert_close(error, -(residual_steps @ walk[:t]), rtol=0, atol=1e-9)
        scale = direct[t].abs().max()
        print(
            f"step {t}: profile error {relative_error:.2e}, max error / max |θ̂| {error.abs().max() / scale:.2e}"
        )
        if t % every == 0:  # a target at a snapshot's step, between the tracked profiles: a close fit
            assert relative_error < 0.01
            assert error.abs().max() < 1e-3 * scale


def test_reconstructing_a_tracked_profile_gives_its_snapshot(tmp_path):
    values = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ema = PowerFunctionEMA([values[0]], [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.1)])
    for t in range(1, 51):
        ema.update([values[t - 1]])
        if t % 5 == 0:
            for sigma_rel, averages in zip([0.05, 0.1], ema.averages, strict=True):
                gamma = sigma_rel_to_gamma(sigma_rel)
                write_snapshot(tmp_path / "posthoc_ema", t, sigma_rel, gamma, {"w": averages[0]}, [], {})
    snapshots = find_snapshots(tmp_path)
    weights, error = solve_weights([(s.step, s.gamma) for s in snapshots], (50, sigma_rel_to_gamma(0.1)))
    assert error < 1e-6
    torch.testing.assert_close(reconstruct(snapshots, weights)["w"], ema.averages[1][0], rtol=1e-7, atol=1e-9)


# ---- the callback in training, resume, the command ------------------------------------------------------

PHEMA = ["callbacks.posthoc_ema.enabled=true", "callbacks.posthoc_ema.every_n_steps=3", "logger=csv"]


def callback_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["callbacks"]["PostHocEMA"]


def snapshot_files(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted((run / "posthoc_ema").glob("*.safetensors"))}


def assert_same_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@needs_fashion_mnist
def test_snapshots_and_profiles_survive_resume_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    every_3 = "callbacks.checkpointing.every_n_steps=3"
    run_train(full, *TINY, *PHEMA, every_3, "trainer.max_steps=6")
    snapshots = snapshot_files(full)
    assert sorted(snapshots) == [
        f"step_000000{t}-sigma_rel_{s}.safetensors" for t in (3, 6) for s in ("0.05", "0.1")
    ]
    # Checkpointing writes step_0000003.ckpt and last.ckpt in its on_train_batch_end, before this callback's
    # update of that step: the averages are brought to the checkpoint's step for it, and equal the snapshot
    # of that step; the snapshot's other entries are the model's buffers.
    for ckpt, step in (("step_0000003.ckpt", 3), ("last.ckpt", 6)):
        state = callback_state(full / "checkpoints" / ckpt)
        assert state["step"] == step and state["sigma_rels"] == [0.05, 0.1]
        for sigma_rel, averages in zip(["0.05", "0.1"], state["averages"], strict=True):
            snapshot = snapshots[f"step_000000{step}-sigma_rel_{sigma_rel}.safetensors"]
            assert all(torch.equal(snapshot[name], value) for name, value in averages.items())
            assert snapshot.keys() - averages.keys() == {"pos_embed"}
    # A run that ended at step 3 (last.ckpt written at the end of training), resumed in place to step 6:
    # the same snapshots and averages, bit for bit, and the first leg's snapshots kept.
    run_train(resumed, *TINY, *PHEMA, "trainer.max_steps=3")
    last = resumed / "checkpoints" / "last.ckpt"
    assert callback_state(last)["step"] == 3
    run_train(resumed, *TINY, *PHEMA, every_3, "trainer.max_steps=6", f"ckpt_path={last}")
    again = snapshot_files(resumed)
    assert again.keys() == snapshots.keys()
    for name in snapshots:
        assert_same_states(again[name], snapshots[name])
    final = callback_state(full / "checkpoints" / "last.ckpt")
    for averages, expected in zip(callback_state(last)["averages"], final["averages"], strict=True):
        assert_same_states(averages, expected)
    # The snapshots stay out of the checkpoints' weights.
    ckpt = torch.load(last, weights_only=True)
    assert not any("posthoc" in key for key in ckpt["state_dict"])


@pytest.fixture(scope="module")
def phema_run(tmp_path_factory) -> Path:
    """A tiny run with snapshots at steps 3, 6 and the last, 7, and its FID callback (debug=tiny's: 20 samples of
    2 DDIM steps against 30 validation images), whose settings `fid=true` scores with."""
    run = tmp_path_factory.mktemp("phema") / "run"
    cache = f"callbacks.fid.cache_dir={run.parent / 'cache'}"
    run_train(run, "debug=tiny", *PHEMA, "trainer.max_steps=7", cache)
    return run


@needs_fashion_mnist
def test_the_command_writes_checkpoints_the_loader_reads(phema_run, tmp_path):
    run = phema_run
    assert sorted({s.step for s in find_snapshots(run)}) == [3, 6, 7]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "posthoc_ema.py"), f"run={run}", "sigma_rel=[0.07,0.2]"],
        cwd=tmp_path,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    snapshots = find_snapshots(run)
    for sigma_rel in (0.07, 0.2):
        path = run / "checkpoints" / f"posthoc_ema-sigma_rel_{sigma_rel:g}-step_0000007.ckpt"
        assert str(path) in proc.stdout
        loaded = load_dit(path)
        assert loaded.source_format == "ditlab" and loaded.weights == "ema" and loaded.step == 7
        header = torch.load(path, weights_only=True)["ditlab"]
        record = header["posthoc_ema"]
        assert record["sigma_rel"] == sigma_rel and record["step"] == 7
        assert record["gamma"] == sigma_rel_to_gamma(sigma_rel)
        assert [s["file"] for s in record["snapshots"]] == [s.path.name for s in snapshots]
        weights = [s["weight"] for s in record["snapshots"]]
        expected = reconstruct(snapshots, weights)
        for name, value in loaded.model.state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    # A snapshot is itself a checkpoint of its profile's EMA (a safetensors export).
    assert load_dit(snapshots[-1].path).model.config == loaded.model.config
    # An earlier step: only the snapshots up to it.
    cfg = command_config(f"run={run}", "sigma_rel=0.1", "step=6", f"out={tmp_path / 'out'}")
    (path,) = run_posthoc_ema(cfg).values()
    assert path == tmp_path / "out" / "posthoc_ema-sigma_rel_0.1-step_0000006.ckpt"
    record = torch.load(path, weights_only=True)["ditlab"]["posthoc_ema"]
    assert {s["step"] for s in record["snapshots"]} == {3, 6}
    assert load_dit(path).step == 6


def command_config(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("posthoc_ema", overrides=list(overrides))


@pytest.fixture
def stub_features(monkeypatch):
    for module in (posthoc_ema_fid, fid_nfe):
        monkeypatch.setattr(module, "InceptionFeatures", lambda *args, **kwargs: StubFeatures())


@needs_fashion_mnist
def test_fid_against_sigma_rel_with_the_run_s_fid_settings(phema_run, tmp_path, stub_features, monkeypatch):
    out = tmp_path / "out"
    overrides = [
        f"run={phema_run}",
        "sigma_rel=[0.05,0.2]",
        "fid=true",
        "num_samples=16",
        f"out={out}",
        "device=cpu",
    ]
    written = posthoc_ema_fid.run_posthoc_ema_command(
        command_config(*overrides, "seeds=[0,1]", "save_samples=true")
    )
    document = json.loads((out / "posthoc_ema_fid.json").read_text())
    points, last = document["points"], phema_run / "checkpoints" / "last.ckpt"
    assert [(p["label"], p["sigma_rel"]) for p in points] == [
        ("classic EMA (ema_decay=0.995)", None),
        ("σ_rel=0.05", 0.05),
        ("σ_rel=0.2", 0.2),
    ]
    assert [p["checkpoint"] for p in points] == [str(last), *map(str, written.values())]
    assert all(p["checkpoint_sha256"] == content_sha256(p["checkpoint"]) for p in points)
    for p in points:
        assert math.isfinite(p["fid"]) and p["step"] == 7 and p["nfe"] == 2  # 2 unguided DDIM steps
        assert sorted(p["fid_per_seed"]) == ["0", "1"] and p["fid_std"] > 0
    # The run's FID settings (debug=tiny's callbacks.fid), its own reference, how it was made.
    assert (document["sampler"], document["steps"], document["cfg_scale"]) == ("ddim", 2, 1.0)
    assert document["num_samples"] == 16 and document["seeds"] == [0, 1] and not document["skipped"]
    assert document["reference"].startswith("FashionMNISTDataModule val (30 images")
    assert document["feature_network"] == StubFeatures.identity and "torch_threads" in document["device"]
    assert document["git"]["commit"] is None or len(document["git"]["commit"]) == 40
    table = (out / "posthoc_ema_fid.md").read_text()
    assert "| classic EMA (ema_decay=0.995) |" in table and "| σ_rel=0.2 |" in table
    assert (out / "fid_vs_sigma_rel.png").stat().st_size > 10_000
    # The samples, as experiments/class_accuracy.py --samples reads them.
    images, labels = class_accuracy.saved_samples(points[1]["samples"][1])
    assert points[1]["samples"][1] == str(out / "samples" / f"{written[0.05].stem}_seed1.npz")
    assert images.shape == (16, 1, 32, 32) and labels.shape == (16,)

    # The classic EMA's FID is fid_nfe.py's of last.ckpt with the same settings.
    nfe = fid_nfe_config(
        f"ckpt={last}", "samplers=[ddim]", "steps=[2]", "seeds=[0,1]", "num_samples=16", "batch_size=10"
    )
    (point,) = json.loads(fid_nfe.run_fid_nfe(nfe)["json"].read_text())["points"]
    assert point["fid_per_seed"] == pytest.approx(points[0]["fid_per_seed"], rel=1e-9, abs=0)

    # A point that fails is skipped in one line; the others are scored.
    real = posthoc_ema_fid.load_dit

    def failing(path, **kwargs):
        if "sigma_rel_0.2" in str(path):
            raise ValueError("a checkpoint that does not load")
        return real(path, **kwargs)

    monkeypatch.setattr(posthoc_ema_fid, "load_dit", failing)
    posthoc_ema_fid.run_posthoc_ema_command(command_config(*overrides, "seeds=[0]"))
    document = json.loads((out / "posthoc_ema_fid.json").read_text())
    assert [p["label"] for p in document["points"]] == ["classic EMA (ema_decay=0.995)", "σ_rel=0.05"]
    assert document["skipped"] == [
        {
            "label": "σ_rel=0.2",
            "sigma_rel": 0.2,
            "checkpoint": str(written[0.2]),
            "error": "a checkpoint that does not load",
        }
    ]
    assert all(len(p["fid_per_seed"]) == 1 and p["fid_std"] is None for p in document["points"])
    assert "Skipped σ_rel=0.2: a checkpoint that does not load" in (out / "posthoc_ema_fid.md").read_text()


def test_the_command_s_bad_input_ends_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    write_snapshot(
        tmp_path / "run" / "posthoc_ema", 5, 0.05, sigma_rel_to_gamma(0.05), {"w": torch.ones(2)}, [], {}
    )
    for overrides, message in [
        (
            (f"run={tmp_path / 'empty'}", "sigma_rel=0.1"),
            f"run={tmp_path / 'empty'} has no post-hoc EMA snapshots",
        ),
        ((f"run={tmp_path / 'none'}", "sigma_rel=0.1"), f"run={tmp_path / 'none'} is not a folder"),
        ((f"run={tmp_path / 'run'}", "sigma_rel=[0.1,0.5]"), "sigma_rel=0.5 is out of range"),
        ((f"run={tmp_path / 'run'}", "sigma_rel=[]"), "sigma_rel=[] is empty"),
        (
            (f"run={tmp_path / 'run'}", "sigma_rel=0.1", "step=6"),
            "step=6 is out of range: it must be a step from 1 to 5",
        ),
        (
            (f"run={tmp_path / 'run'}", "sigma_rel=0.1", "step=4"),
            "step=4 is before the first snapshot (step 5)",
        ),
        ((f"run={tmp_path / 'run'}", "sigma_rel=0.1", "fid=1"), "fid=1 must be true or false"),
        (
            (f"run={tmp_path / 'run'}", "sigma_rel=0.1", "save_samples=true"),
            "save_samples=true keeps the samples of the FID: set fid=true too",
        ),
        (
            (f"run={tmp_path / 'run'}", "sigma_rel=0.1", "fid=true", "seeds=[0,0]"),
            "seeds=[0, 0] must be a list of distinct integers ≥ 0",
        ),
        (
            (f"run={tmp_path / 'run'}", "sigma_rel=0.1", "fid=true"),
            f"fid=true scores with the run's FID settings, but run={tmp_path / 'run'} has neither results.json",
        ),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=f"^{re.escape(message)}") as error:
            posthoc_ema_fid.run_posthoc_ema_command(command_config(*overrides))
        assert "\n" not in str(error.value)
    # fid=true takes the run's FID settings and its classic EMA, checked before any checkpoint is written.
    record = tmp_path / "run" / "results.json"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    for config, overrides, message in [
        (
            {"callbacks": {}},
            (),
            "but run=" + str(tmp_path / "run") + " trained without them (~callbacks.fid)",
        ),
        (
            {"callbacks": {"fid": {"steps": 2}}},
            (),
            f"fid=true scores the run's classic EMA beside, but {last}",
        ),
        ({"callbacks": {"fid": {"steps": 2}}}, ("num_samples=1",), "num_samples=1 must be an integer ≥ 2"),
        ({"callbacks": {"fid": {"steps": 0}}}, (), "callbacks.fid.steps=0 is out of range"),
        ({"callbacks": {"fid": {"steps": 2}}}, ("precision=fp8",), "precision=fp8: unknown"),
    ]:
        record.write_text(json.dumps({"config": config}))
        if "classic EMA" not in message:
            last.parent.mkdir(exist_ok=True)
            last.touch()
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            posthoc_ema_fid.run_posthoc_ema_command(
                command_config(f"run={tmp_path / 'run'}", "sigma_rel=0.1", "fid=true", *overrides)
            )
        assert "\n" not in str(error.value)
        last.unlink(missing_ok=True)
    assert not list((tmp_path / "run").glob("checkpoints/posthoc_ema-*"))
    (tmp_path / "run" / "posthoc_ema" / "stray.safetensors").write_bytes(b"not a tensor file")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "src" / "posthoc_ema.py"), f"run={tmp_path / 'run'}", "sigma_rel=0.1"],
        cwd=tmp_path,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"error: {tmp_path / 'run' / 'posthoc_ema' / 'stray.safetensors'} is not")


def test_the_callback_s_bad_values_name_their_keys(tmp_path):
    for kwargs, message in [
        ({"sigma_rels": [0.05, 0.4]}, "callbacks.posthoc_ema.sigma_rels=0.4 is out of range"),
        ({"sigma_rels": [0.05, 0.05]}, "callbacks.posthoc_ema.sigma_rels=[0.05, 0.05] must be distinct"),
        ({"sigma_rels": []}, "callbacks.posthoc_ema.sigma_rels=[] must be distinct values"),
        ({"every_n_steps": 0}, "callbacks.posthoc_ema.every_n_steps=0 must be ≥ 1"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            PostHocEMA(str(tmp_path), enabled=True, **kwargs)
    callback = PostHocEMA(str(tmp_path), enabled=True, sigma_rels=[0.05, 0.2])
    with pytest.raises(
        ValueError, match=re.escape("resume with callbacks.posthoc_ema.sigma_rels=[0.05,0.1]")
    ):
        callback.load_state_dict({"sigma_rels": [0.05, 0.1], "step": 3, "names": [], "averages": [{}, {}]})


def test_it_is_off_by_default_and_the_classic_ema_stays():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train")
    assert cfg.callbacks.posthoc_ema.enabled is False
    assert list(cfg.callbacks.posthoc_ema.sigma_rels) == [0.05, 0.1]
    assert cfg.optim.ema_decay == 0.995  # the CPU demo's classic EMA, unchanged


@needs_fashion_mnist
def test_turning_it_on_in_a_resumed_run_is_refused(tmp_path):
    run_train(tmp_path, *TINY, "logger=csv", "trainer.max_steps=2")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    proc = run_train(tmp_path, *TINY, *PHEMA, "trainer.max_steps=3", f"ckpt_path={ckpt}", check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: callbacks.posthoc_ema.enabled=true on a run resumed at step 2 whose checkpoint has no post-hoc EMA"
        )
    )
