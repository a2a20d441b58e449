"""The report's scaling measurements (ditlab.report.scaling) against closed forms and float64 references."""

import json
import math

import numpy as np
import pytest

from ditlab.report import group_points, load_records, write_report
from ditlab.report.scaling import (
    MAX_COMBINATIONS,
    PAPER_TABLE4,
    compute_to_reach,
    correlations,
    equal_gflops_pairs,
    reach_compute,
    scaling_summary,
    seed_spread,
)
from test_report import PAPER_TABLE4 as TEST_TABLE4
from test_report import record, write_records


def reference_pearson(x, y) -> float:
    """Pearson's r in float64 from its definition."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum()))


def test_the_paper_table_is_the_papers():
    assert {k: (g, f) for k, (_, g, f) in TEST_TABLE4.items()} == PAPER_TABLE4


def test_correlations_against_float64_definitions():
    gflops = [0.36, 1.41, 6.06, 1.42, 5.56, 23.01]
    fids = [153.6, 100.41, 68.4, 122.74, 68.38, 43.47]
    got = correlations(gflops, fids)
    log_g = [math.log10(g) for g in gflops]
    assert got["pearson"] == pytest.approx(reference_pearson(log_g, fids), abs=1e-12)
    # Spearman = Pearson of the ranks (no ties here)
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert got["spearman"] == pytest.approx(reference_pearson(ranks(log_g), ranks(fids)), abs=1e-12)


def test_fid_linear_in_log_gflops_correlates_minus_one():
    gflops = [0.01, 0.1, 1.0, 10.0]
    got = correlations(gflops, [200 - 30 * math.log10(g) for g in gflops])
    assert got == pytest.approx({"pearson": -1.0, "spearman": -1.0}, abs=1e-12)


def points_of(tmp_path, fids_by_point: dict[tuple[str, int, float], list[float]]):
    docs = [
        record("adaln_zero", model, patch, 1.0, gflops, fid, seed=seed)
        for (model, patch, gflops), fids in fids_by_point.items()
        for seed, fid in enumerate(fids)
    ]
    return group_points(load_records(write_records(tmp_path, docs)))


def test_seed_spread_enumerates_every_combination(tmp_path):
    fids = {("DiT-S", 8, 0.36): [150.0, 160.0], ("DiT-S", 4, 1.41): [100.0, 90.0], ("DiT-S", 2, 6.06): [70.0]}
    points = points_of(tmp_path, fids)
    spread = seed_spread(points)
    assert spread["enumerated"] and spread["draws"] == 4
    expected = sorted(
        correlations([0.36, 1.41, 6.06], [a, b, 70.0])["pearson"]
        for a in (150.0, 160.0)
        for b in (100.0, 90.0)
    )
    assert spread["pearson"]["min"] == pytest.approx(expected[0])
    assert spread["pearson"]["max"] == pytest.approx(expected[-1])
    assert spread["pearson"]["median"] == pytest.approx((expected[1] + expected[2]) / 2)


def test_seed_spread_is_nil_when_seeds_agree(tmp_path):
    points = points_of(
        tmp_path, {("DiT-S", p, g): [f, f] for p, g, f in ((8, 0.36, 150), (4, 1.41, 95), (2, 6.06, 70))}
    )
    spread = seed_spread(points)
    means = correlations([p.gflops for p in points], [p.fid.mean for p in points])
    assert spread["pearson"]["min"] == pytest.approx(spread["pearson"]["max"])
    assert spread["pearson"]["median"] == pytest.approx(means["pearson"])


def test_seed_spread_draws_at_random_beyond_the_enumeration_limit(tmp_path):
    n = math.ceil(math.log2(MAX_COMBINATIONS)) + 1  # 2 seeds per point: 2^n > the limit
    fids = {("DiT-S", i + 1, 0.1 * 2**i): [100.0 - i, 101.0 - i] for i in range(n)}
    spread = seed_spread(points_of(tmp_path, fids))
    assert not spread["enumerated"] and spread["draws"] == MAX_COMBINATIONS


def test_equal_gflops_pairs_take_the_bigger_model_with_the_larger_patch(tmp_path):
    points = points_of(
        tmp_path,
        {
            ("DiT-S", 2, 6.06): [68.4, 70.0],
            ("DiT-B", 4, 5.56): [68.38, 75.0],
            ("DiT-B", 2, 23.01): [43.47],
            ("DiT-S", 8, 0.36): [153.6],
        },
    )
    pairs = equal_gflops_pairs(points)
    assert [(p["bigger"], p["smaller"]) for p in pairs] == [("B/4", "S/2")]
    assert pairs[0]["fid"] == pytest.approx([(68.38 + 75.0) / 2, (68.4 + 70.0) / 2])
    assert pairs[0]["seed_ranges_overlap"]


class _Spread:
    def __init__(self, mean):
        self.mean = mean


def test_reach_compute_interpolates_in_log_compute():
    history = [
        {"train_compute_gflop": 1e2, "fid": _Spread(300.0)},
        {"train_compute_gflop": 1e4, "fid": _Spread(100.0)},
    ]
    assert reach_compute(history, 200.0) == pytest.approx(1e3)
    assert reach_compute(history, 300.0) == pytest.approx(1e2)
    assert reach_compute(history, 99.0) is None


def test_compute_to_reach_takes_each_sizes_cheapest_patch(tmp_path):
    # record(): FID falls to `fid` along four evaluations, at 1.75, 1.5, 1.25 and 1 × fid
    points = points_of(
        tmp_path, {("DiT-S", 8, 0.36): [100.0], ("DiT-S", 2, 6.06): [60.0], ("DiT-B", 8, 1.42): [80.0]}
    )
    reach = compute_to_reach(points, levels=2)
    assert reach["levels"] == pytest.approx([100.0, 60.0])  # the worst final FID, the lowest FID passed
    s8 = next(p for p in points if p.label == "S/8").fid_history
    assert reach["by_size"]["DiT-S"][0]["train_compute_gflop"] == pytest.approx(s8[-1]["train_compute_gflop"])
    assert reach["by_size"]["DiT-S"][1]["patch"] == 2
    assert reach["by_size"]["DiT-B"][1] is None  # B/8 ends at 80


def test_the_report_writes_the_scaling_files(tmp_path):
    docs = [
        record("adaln_zero", model, patch, params, gflops, fid, seed=seed)
        for (model, patch), (params, gflops, fid) in TEST_TABLE4.items()
        for seed in (0, 1)
    ]
    written = write_report(load_records(write_records(tmp_path / "runs", docs)), tmp_path / "report")
    summary = json.loads(written["scaling.json"].read_text())
    (group,) = summary["groups"]
    assert group["fid_vs_log_gflops"]["of_means"] == pytest.approx(summary["paper_table4"]["all_12"])
    assert summary["paper_table4"]["all_12"]["pearson"] == pytest.approx(-0.93, abs=0.005)
    assert "S/2" in written["scaling.md"].read_text()
    assert scaling_summary(load_records(write_records(tmp_path / "two", docs[:4]))) is None  # two Gflops


def test_equal_fids_have_no_correlation_and_the_files_stay_strict_json(tmp_path):
    fids = {("DiT-S", p, g): [100.0, 100.0] for p, g in ((8, 0.36), (4, 1.41), (2, 6.06))}
    points = points_of(tmp_path / "runs", fids)
    assert correlations([p.gflops for p in points], [100.0] * 3) == {"pearson": None, "spearman": None}
    assert seed_spread(points)["pearson"] is None
    docs = [record("adaln_zero", m, p, 1.0, g, 100.0, seed=s) for (m, p, g) in fids for s in (0, 1)]
    written = write_report(load_records(write_records(tmp_path / "w", docs)), tmp_path / "report")
    json.loads(written["scaling.json"].read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert "n/a" in written["scaling.md"].read_text()
