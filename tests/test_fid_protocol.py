"""The FID protocol's options: class-balanced labels beside uniform draws (the FID callback and sample.py),
several sampling seeds per FID with their mean and spread (the FID callback and evaluate.py), each recorded.

The FID callback runs here on a fake module (images a fixed function of seed, index and label) and a stub
feature network, so that every number is checked against float64 closed forms in a second."""

import contextlib
import json
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ditlab.diffusion.labels import balanced_labels, check_label_sampling, labels_for
from ditlab.interop.checkpoints import load_dit
from ditlab.interop.generation import generate, run_sample
from ditlab.metrics import evaluation
from ditlab.training.callbacks import FIDMonitor
from test_metrics import StubFeatures, frechet_closed_form, random_images, stub_features_of
from test_sample_cli import read_npz, write_tiny_ckpt
from test_train import CONF, needs_fashion_mnist, run_train

NUM_CLASSES = 3


class FakeModule:
    """Stands in for `DiTModule` in the FID callback: image i of seed s is a fixed function of (s, i) and its
    label; labels it is not given it draws, like the real one, from the image's own generator."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.model = SimpleNamespace(num_classes=NUM_CLASSES)
        self.calls: list[tuple[int, list[int], list[int] | None]] = []

    def draw_labels(self, seed: int, indices) -> torch.Tensor:
        return torch.tensor([(7 * seed + 5 * i) % NUM_CLASSES for i in indices])

    def images(self, seed: int, indices, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3, 8, 8) in [-1, 1]."""
        labels = self.draw_labels(seed, indices) if labels is None else labels
        noise = [
            torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1000 * seed + i)) for i in indices
        ]
        return (torch.stack(noise) * (0.4 + 0.3 * labels.view(-1, 1, 1, 1))) * 2 - 1

    def sample(self, labels, spec, *, indices, evaluations=None):
        self.calls.append((spec.seed, list(indices), None if labels is None else labels.tolist()))
        if evaluations is not None:  # one network evaluation per step and image, as unguided samplers
            evaluations.rows += spec.steps * len(indices)
            evaluations.images += len(indices)
        drawn = self.draw_labels(spec.seed, indices) if labels is None else labels
        return self.images(spec.seed, indices, drawn), drawn

    def complexity(self) -> dict[str, float]:
        return {"gflops": 1.0}

    def train_compute_gflop(self, steps: int, images_per_step: int) -> float:
        return self.complexity()["gflops"] * 3 * steps * images_per_step


def fake_trainer() -> SimpleNamespace:
    return SimpleNamespace(
        world_size=1,
        global_rank=0,
        is_global_zero=True,
        received_sigterm=False,
        precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext),
        loggers=[],
        global_step=7,
        datamodule=SimpleNamespace(batch_size=4),
        fast_dev_run=False,
    )


def stub_reference(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=random_images(20, seed=11, size=8))
    return tmp_path / "ref.npz"


def fid_monitor(tmp_path, **kwargs) -> FIDMonitor:
    fid = FIDMonitor(
        str(tmp_path),
        num_samples=10,
        batch_size=4,
        reference=str(stub_reference(tmp_path)),
        cache_dir=str(tmp_path / "cache"),
        fd_dinov2=False,
        **kwargs,
    )
    fid._net = StubFeatures()  # the Inception's stand-in: 12-d features, exact
    return fid


def expected_fid(tmp_path, module: FakeModule, seed: int, n: int, labels=None) -> float:
    fake = module.images(seed, range(n), labels)
    fake_pool = StubFeatures().features((fake + 1) / 2)["pool"].double().numpy()
    return frechet_closed_form(stub_features_of(np.load(tmp_path / "ref.npz")["arr_0"])["pool"], fake_pool)


# the label protocol ---------------------------------------------------------------------------------------


def test_balanced_labels_are_index_mod_classes():
    labels = balanced_labels(range(23), 10)
    assert labels.tolist() == [i % 10 for i in range(23)]
    counts = torch.bincount(labels, minlength=10).tolist()
    assert counts == [3, 3, 3] + [2] * 7  # the first N mod K classes get one more
    assert balanced_labels(range(20, 23), 10).tolist() == [0, 1, 2]  # by index alone: any share, any N
    assert labels_for("uniform", range(5), 10) is None
    with pytest.raises(ValueError, match=r"^callbacks\.fid\.labels=even: unknown label protocol"):
        check_label_sampling("even", "callbacks.fid.labels")


# the FID callback -------------------------------------------------------------------------------------------


def test_default_fid_is_one_seed_with_uniform_labels(tmp_path):
    fid, module = fid_monitor(tmp_path), FakeModule()
    fid.evaluate(fake_trainer(), module)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["fid"] == pytest.approx(expected_fid(tmp_path, module, 0, 10), rel=1e-6)
    assert (record["fid_labels"], record["fid_seeds"], record["fid_std"]) == ("uniform", [0], None)
    assert record["fid_per_seed"] == [record["fid"]] and "fd_dinov2" not in record
    assert set(record["fid_history"][-1]) == {
        "step",
        "images_seen",
        "train_compute_gflop",
        "fid",
        "nfe",
        "seconds",
    }
    assert [call[2] for call in module.calls] == [None] * 3  # labels drawn per image: uniform
    assert [call[1][0] for call in module.calls] == [0, 4, 8]


def test_balanced_labels_and_several_seeds(tmp_path, capsys):
    fid, module = fid_monitor(tmp_path, labels="balanced", seeds=[0, 1, 2], save_samples=True), FakeModule()
    fid.evaluate(fake_trainer(), module)
    record = json.loads((tmp_path / "results.json").read_text())
    balanced = torch.arange(10) % NUM_CLASSES
    per_seed = [expected_fid(tmp_path, module, s, 10, balanced) for s in (0, 1, 2)]
    assert record["fid_per_seed"] == pytest.approx(per_seed, rel=1e-6)
    assert record["fid"] == pytest.approx(statistics.fmean(per_seed), rel=1e-6)
    assert record["fid_std"] == pytest.approx(statistics.stdev(per_seed), rel=1e-6)
    assert (record["fid_labels"], record["fid_seeds"]) == ("balanced", [0, 1, 2])
    point = record["fid_history"][-1]
    assert point["fid_per_seed"] == record["fid_per_seed"] and point["fid_std"] == record["fid_std"]
    assert point["nfe"] == fid.sampling.steps  # over all seeds' images
    for seed in (0, 1, 2):  # each seed's samples, with image i of class i mod K
        calls = [c for c in module.calls if c[0] == seed]
        assert [label for c in calls for label in c[2]] == balanced.tolist()
        _, labels = read_npz(tmp_path / "samples" / f"fid_step0000007_seed{seed}.npz")
        assert labels.tolist() == balanced.tolist()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        f"FID {record['fid']:.2f} ± {record['fid_std']:.2f}" in line
        and "balanced labels, seeds [0, 1, 2]" in line
    )


def test_bad_protocol_options_fail_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"^callbacks\.fid\.labels=classwise: unknown label protocol"):
        fid_monitor(tmp_path, labels="classwise")
    for seeds in ([], [0, 0], [0.5]):
        with pytest.raises(
            ValueError, match=r"^callbacks\.fid\.seeds=.* must be a list of distinct integers"
        ):
            fid_monitor(tmp_path, seeds=seeds)


# sample.py --------------------------------------------------------------------------------------------------


def test_generate_balanced_labels_by_index(tmp_path):
    loaded = load_dit(write_tiny_ckpt(tmp_path / "tiny.ckpt"))
    from ditlab.diffusion import SamplingSpec

    common = dict(spec=SamplingSpec("ddim", steps=2, seed=1), num_samples=7, progress=False, png=False)
    generate(loaded, tmp_path / "a", batch_size=3, label_sampling="balanced", **common)
    images, labels = read_npz(tmp_path / "a.npz")
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert json.loads((tmp_path / "a.json").read_text())["labels"] == "balanced"
    generate(loaded, tmp_path / "b", batch_size=4, label_sampling="balanced", **common)
    np.testing.assert_array_equal(read_npz(tmp_path / "b.npz")[0], images)  # whatever the batches
    explicit = {k: v for k, v in common.items() if k != "num_samples"}
    generate(loaded, tmp_path / "c", labels=labels.tolist(), batch_size=7, **explicit)
    np.testing.assert_array_equal(read_npz(tmp_path / "c.npz")[0], images)  # the same as listing them
    with pytest.raises(ValueError, match=r"^labels=balanced chooses the labels of num_samples images"):
        generate(loaded, tmp_path / "d", labels=[0, 1], label_sampling="balanced", **explicit)


def test_sample_cli_option_labels_balanced(tmp_path):
    from hydra import compose, initialize_config_dir

    ckpt = write_tiny_ckpt(tmp_path / "tiny.ckpt")
    overrides = [f"ckpt={ckpt}", "labels=balanced", "num_samples=5", "steps=2", "sampler=ddim", "png=false"]
    overrides += [f"out={tmp_path / 'x'}", "progress=false", "device=cpu"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("sample", overrides=overrides)
    assert cfg.labels == "balanced"
    written = run_sample(cfg)
    assert read_npz(written["npz"])[1].tolist() == [0, 1, 2, 0, 1]


# evaluate.py ------------------------------------------------------------------------------------------------


def test_evaluate_several_sample_sets_reports_mean_and_spread(tmp_path, monkeypatch):
    files = []
    for seed in range(3):
        files.append(tmp_path / f"seed{seed}.npz")
        np.savez(files[-1], arr_0=random_images(15, seed=20 + seed, size=8, high=150 + 30 * seed))
    stub_reference(tmp_path)
    monkeypatch.setattr(evaluation, "InceptionFeatures", lambda *args, **kwargs: StubFeatures())
    cfg = OmegaConf.load(CONF / "evaluate.yaml")
    cfg.samples, cfg.ref, cfg.cache_dir = [str(f) for f in files], str(tmp_path / "ref.npz"), None
    cfg.device, cfg.fd_dinov2 = "cpu", False
    summary = evaluation.run_evaluate(cfg)
    reference = stub_features_of(np.load(tmp_path / "ref.npz")["arr_0"])["pool"]
    per_seed = [frechet_closed_form(reference, stub_features_of(np.load(f)["arr_0"])["pool"]) for f in files]
    assert summary["fid_per_seed"] == pytest.approx(per_seed, rel=1e-5)
    assert summary["fid"] == pytest.approx(statistics.fmean(per_seed), rel=1e-5)
    assert summary["fid_std"] == pytest.approx(statistics.stdev(per_seed), rel=1e-5)
    assert "inception_score" in summary and "sfid_std" in summary and "fd_dinov2" not in summary
    written = json.loads((tmp_path / "seed0.mean.metrics.json").read_text())
    assert written["samples"] == [str(f) for f in files] and written["fid"] == summary["fid"]
    assert all((tmp_path / f"seed{s}.metrics.json").is_file() for s in range(3))  # each set's own too


# a run, end to end ------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~70 s on 2 busy CPU cores: a training run and two FIDs with the TF Inception
@needs_fashion_mnist
def test_a_run_with_balanced_labels_two_seeds_and_no_dinov2_weights(tmp_path):
    proc = run_train(
        tmp_path,
        "debug=tiny",
        "logger=none",
        "trainer.max_steps=1",
        "callbacks.fid.labels=balanced",
        "callbacks.fid.seeds=[0,1]",
        "callbacks.fid.save_samples=true",
        "callbacks.fid.fd_dinov2=auto",  # debug=tiny turns it off
        f"callbacks.fid.fd_dinov2_encoder_path={tmp_path / 'absent.safetensors'}",
        f"callbacks.fid.cache_dir={tmp_path / 'cache'}",
    )
    lines = proc.stdout.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("[ditlab] FD-DINOv2 left out, FID alone:")]
    fid_line = next(i for i, line in enumerate(lines) if line.startswith("[ditlab] step 1: FID"))
    assert len(said) == 1 and said[0] < fid_line and "absent.safetensors does not exist" in lines[said[0]]
    assert not any("train/loss" in line for line in lines[: said[0]])  # before the first step
    record = json.loads((tmp_path / "results.json").read_text())
    assert (record["fid_labels"], record["fid_seeds"], len(record["fid_per_seed"])) == ("balanced", [0, 1], 2)
    assert record["fid"] == pytest.approx(statistics.fmean(record["fid_per_seed"]))
    assert record["fid_std"] == pytest.approx(statistics.stdev(record["fid_per_seed"]))
    assert "fd_dinov2" not in record  # FID alone
    for seed in (0, 1):
        _, labels = read_npz(tmp_path / "samples" / f"fid_step0000001_seed{seed}.npz")
        assert labels.tolist() == [i % 10 for i in range(20)]


# the report -------------------------------------------------------------------------------------------------


def test_report_shows_fd_dinov2_beside_fid_and_the_sampling_spread(tmp_path):
    from ditlab import report
    from ditlab.report import load_records, table4_rows
    from test_report import record, write_records

    docs = []
    for seed, (fid, fd) in enumerate([(20.0, 300.0), (22.0, 310.0)]):
        doc = record("adaln_zero", "DiT-XL", 2, 675.1, 118.64, fid, seed=seed)
        doc |= {"fid_std": 0.5, "fid_per_seed": [fid - 0.5, fid + 0.5], "fd_dinov2": fd, "fd_dinov2_std": 2.0}
        docs.append(doc | {"fid_labels": "balanced", "fid_seeds": [0, 1]})
    records = load_records(write_records(tmp_path / "runs", docs))
    assert {(r.fid_std, r.fd_dinov2) for r in records} == {(0.5, 300.0), (0.5, 310.0)}
    runs = report.runs_markdown(records)
    assert "| FID | FD-DINOv2 |" in runs and "| 20.00 ± 0.50 | 300.00 ± 2.00 |" in runs
    blocks = report.block_markdown(records)
    assert (
        "| FID | FD-DINOv2 | seeds |" in blocks
        and "| 21.00 (20.00–22.00) | 305.00 (300.00–310.00) | 2 |" in blocks
    )
    (row,) = table4_rows(records)
    assert (row["fid_p2"], row["fd_dinov2_p2"], row["fd_dinov2_min_p2"]) == (21.0, 305.0, 300.0)
    assert "FD-DINOv2 /2" in report.table4_markdown(records)
    assert "FID labels: balanced" in report.table4_markdown(records)
    # Runs of one point scored with other label protocols are not averaged as seeds.
    other = [docs[0], docs[1] | {"fid_labels": "uniform"}]
    assert len(report.group_points(load_records(write_records(tmp_path / "mixed", other)))) == 2
