"""The paper's scaling claims, measured on a sweep's points: `scaling.json` and `scaling.md`.

For each conditioning block (at one setting of the other axes) with at least three points of different
Gflops and a final FID:
- **FID against log Gflops** (Figure 8): Pearson's r and Spearman's ρ over the points' mean FIDs, and their
  spread over seeds: every way of taking one run (seed) per point gives one r and one ρ (enumerated when
  there are at most `MAX_COMBINATIONS` ways, else that many random draws); their median, 2.5 and 97.5
  percentiles and range.
- **Equal Gflops** (the paper: Gflops, not parameters, predict FID): every pair of points of different
  sizes whose Gflops lie within a factor `EQUAL_GFLOPS_RATIO` of each other, the bigger model with the
  larger patches, with both FIDs, their seeds' ranges and whether those ranges overlap.
- **Compute to reach an FID** (Figure 9): for a few FID levels, each size's least training compute over its
  patches at which its mean FID history reaches the level (log-linear between FID evaluations), or none.

The paper's own values, computed the same way from its Table 4 (FID-50K at 400K steps, no guidance), sit
beside ours: all twelve models and the nine of S, B and L (three sizes, as a CPU sweep has).
"""

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

from scipy import stats

from ditlab.report.records import BLOCK_NAMES, PointResult, RunResult, group_points, model_rank

# Paper Table 4 (adaLN-Zero): (size, patch) -> (forward Gflops, FID-50K after 400K steps).
PAPER_TABLE4: dict[tuple[str, int], tuple[float, float]] = {
    ("DiT-S", 8): (0.36, 153.60),
    ("DiT-S", 4): (1.41, 100.41),
    ("DiT-S", 2): (6.06, 68.40),
    ("DiT-B", 8): (1.42, 122.74),
    ("DiT-B", 4): (5.56, 68.38),
    ("DiT-B", 2): (23.01, 43.47),
    ("DiT-L", 8): (5.01, 118.87),
    ("DiT-L", 4): (19.70, 45.64),
    ("DiT-L", 2): (80.71, 23.33),
    ("DiT-XL", 8): (7.39, 106.41),
    ("DiT-XL", 4): (29.05, 43.01),
    ("DiT-XL", 2): (118.64, 19.47),
}
MAX_COMBINATIONS = 4096  # seed combinations enumerated; beyond, as many random draws (seeded)
EQUAL_GFLOPS_RATIO = 1.5
FID_LEVELS = 4  # levels for the compute-to-reach table, evenly spaced over the FIDs the curves pass


def correlations(gflops: Sequence[float], fids: Sequence[float]) -> dict[str, float | None]:
    """Pearson's r of FID with log10 Gflops and Spearman's ρ (rank: the log does not change it); None
    where the FIDs are all equal."""
    log_gflops = [math.log10(g) for g in gflops]
    if len(set(fids)) == 1:  # no spread in FID: no correlation to speak of (scipy would give NaN)
        return {"pearson": None, "spearman": None}
    return {
        "pearson": float(stats.pearsonr(log_gflops, fids).statistic),
        "spearman": float(stats.spearmanr(log_gflops, fids).statistic),
    }


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def percentile(q: float) -> float:  # linear interpolation between order statistics
        pos = q * (len(ordered) - 1)
        low = math.floor(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return {
        "median": percentile(0.5),
        "p2.5": percentile(0.025),
        "p97.5": percentile(0.975),
        "min": ordered[0],
        "max": ordered[-1],
    }


def seed_spread(points: Sequence[PointResult], seed: int = 0) -> dict[str, Any]:
    """r and ρ over the ways of taking one run per point (see the module's docstring)."""
    per_point = [[r.fid for r in p.runs if r.fid is not None] for p in points]
    gflops = [p.gflops for p in points]
    count = math.prod(len(f) for f in per_point)
    if count <= MAX_COMBINATIONS:
        draws = list(itertools.product(*per_point))
    else:
        rng = random.Random(seed)
        draws = [tuple(rng.choice(f) for f in per_point) for _ in range(MAX_COMBINATIONS)]
    values = [correlations(gflops, draw) for draw in draws]
    return {
        "draws": len(draws),
        "enumerated": count <= MAX_COMBINATIONS,
        "pearson": _summary([v["pearson"] for v in values if v["pearson"] is not None]),
        "spearman": _summary([v["spearman"] for v in values if v["spearman"] is not None]),
    }


def equal_gflops_pairs(points: Sequence[PointResult], ratio: float = EQUAL_GFLOPS_RATIO) -> list[dict]:
    """Pairs of points of different sizes within `ratio` in Gflops, the bigger model (more parameters) with
    the larger patches: its FID against the smaller model's with smaller patches."""
    pairs = []
    for a, b in itertools.combinations(points, 2):
        big, small = (a, b) if a.params_m > b.params_m else (b, a)
        if big.model == small.model or big.patch <= small.patch:
            continue
        if max(a.gflops, b.gflops) / min(a.gflops, b.gflops) > ratio:
            continue
        overlap = big.fid.low <= small.fid.high and small.fid.low <= big.fid.high
        pairs.append(
            {
                "bigger": big.label,
                "smaller": small.label,
                "gflops": [big.gflops, small.gflops],
                "params_m": [big.params_m, small.params_m],
                "fid": [big.fid.mean, small.fid.mean],
                "fid_range": [[big.fid.low, big.fid.high], [small.fid.low, small.fid.high]],
                "seed_ranges_overlap": overlap,
            }
        )
    return pairs


def reach_compute(history: Sequence[dict[str, Any]], level: float) -> float | None:
    """The training compute at which a mean FID curve first falls to `level`: log-linear in compute
    between the two evaluations around the crossing; None when it never does."""
    previous = None
    for point in history:
        compute, fid = point["train_compute_gflop"], point["fid"].mean
        if fid <= level:
            if previous is None:
                return compute
            c0, f0 = previous
            frac = (f0 - level) / (f0 - fid)
            return 10 ** (math.log10(c0) + frac * (math.log10(compute) - math.log10(c0)))
        previous = (compute, fid)
    return None


def compute_to_reach(points: Sequence[PointResult], levels: int = FID_LEVELS) -> dict[str, Any]:
    """For `levels` FIDs evenly spaced from the highest final FID down to the lowest FID any curve passes,
    each size's least training compute over its patches to reach it (and which patch), None where none
    of its points does."""
    curves = [p for p in points if p.fid_history]
    if not curves:
        return {"levels": [], "by_size": {}}
    high = max(p.fid_history[-1]["fid"].mean for p in curves)
    low = min(h["fid"].mean for p in curves for h in p.fid_history)
    values = [high - (high - low) * i / (levels - 1) for i in range(levels)] if levels > 1 else [low]
    by_size: dict[str, list[dict[str, Any] | None]] = {}
    for model in sorted({p.model for p in curves}, key=model_rank):
        row = []
        for level in values:
            reached = [
                (c, p.patch)
                for p in curves
                if p.model == model and (c := reach_compute(p.fid_history, level)) is not None
            ]
            best = min(reached, default=None)
            row.append(None if best is None else {"train_compute_gflop": best[0], "patch": best[1]})
        by_size[model] = row
    return {"levels": values, "by_size": by_size}


def _paper() -> dict[str, Any]:
    def of(sizes: tuple[str, ...]) -> dict[str, float]:
        rows = [v for (m, _), v in PAPER_TABLE4.items() if m in sizes]
        return correlations([g for g, _ in rows], [f for _, f in rows])

    return {
        "all_12": of(("DiT-S", "DiT-B", "DiT-L", "DiT-XL")),
        "S_B_L_9": of(("DiT-S", "DiT-B", "DiT-L")),
    }


def _groups(points: Sequence[PointResult]) -> dict[tuple, list[PointResult]]:
    groups: dict[tuple, list[PointResult]] = {}
    for p in points:
        if p.fid is not None:
            groups.setdefault((p.block, p.axes, p.variant), []).append(p)
    return {k: v for k, v in groups.items() if len({p.gflops for p in v}) >= 3}


def scaling_summary(records: Sequence[RunResult]) -> dict[str, Any] | None:
    """The measurements above per block (and setting of the other axes), with the paper's; None when no
    block has three points of different Gflops with an FID."""
    groups = _groups(group_points(records))
    if not groups:
        return None
    out = []
    for (block, axes, variant), points in groups.items():
        means = correlations([p.gflops for p in points], [p.fid.mean for p in points])
        out.append(
            {
                "block": block,
                "axes": dict(axes),
                "variant": dict(variant),
                "points": [
                    {
                        "label": p.label,
                        "gflops": p.gflops,
                        "params_m": p.params_m,
                        "fid": p.fid.mean,
                        "fid_range": [p.fid.low, p.fid.high],
                        "seeds": len(p.runs),
                    }
                    for p in points
                ],
                "fid_vs_log_gflops": {"of_means": means, "over_seeds": seed_spread(points)},
                "equal_gflops": equal_gflops_pairs(points),
                "compute_to_reach": compute_to_reach(points),
            }
        )
    return {"groups": out, "paper_table4": _paper(), "equal_gflops_ratio": EQUAL_GFLOPS_RATIO}


def _r(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _spread_text(s: dict[str, float] | None) -> str:
    if s is None:
        return "n/a (the FIDs are all equal)"
    return f"median {s['median']:.2f}, 95% {s['p2.5']:.2f} to {s['p97.5']:.2f}, range {s['min']:.2f} to {s['max']:.2f}"


def scaling_markdown(summary: dict[str, Any]) -> str:
    paper = summary["paper_table4"]
    lines = [
        "FID against log10 Gflops; the paper's Table 4 (FID-50K, 400K steps) computed the same way: "
        f"all 12 models r = {paper['all_12']['pearson']:.2f}, ρ = {paper['all_12']['spearman']:.2f}; "
        f"S, B, L (9) r = {paper['S_B_L_9']['pearson']:.2f}, ρ = {paper['S_B_L_9']['spearman']:.2f}.",
        "",
    ]
    for g in summary["groups"]:
        title = BLOCK_NAMES.get(g["block"], g["block"])
        extra = ", ".join(f"{k}={v}" for k, v in {**g["axes"], **g["variant"]}.items())
        lines += [f"### {title}" + (f" ({extra})" if extra else ""), ""]
        corr, spread = g["fid_vs_log_gflops"]["of_means"], g["fid_vs_log_gflops"]["over_seeds"]
        how = "every combination" if spread["enumerated"] else "random draws"
        lines += [
            f"- {len(g['points'])} points. Of the seed means: Pearson r = {_r(corr['pearson'])}, "
            f"Spearman ρ = {_r(corr['spearman'])}.",
            f"- One seed per point ({spread['draws']} draws, {how}): r {_spread_text(spread['pearson'])}; "
            f"ρ {_spread_text(spread['spearman'])}.",
            "",
        ]
        if g["equal_gflops"]:
            lines += [
                f"Equal Gflops (within ×{summary['equal_gflops_ratio']}): the bigger model with larger patches "
                "against the smaller with smaller patches",
                "",
                "| bigger | Gflops | params (M) | FID (range) | smaller | Gflops | params (M) | FID (range) "
                "| ranges overlap |",
                "|---|---:|---:|---:|---|---:|---:|---:|---|",
            ]
            for pair in g["equal_gflops"]:
                cells = []
                for i, name in enumerate((pair["bigger"], pair["smaller"])):
                    low, high = pair["fid_range"][i]
                    cells += [
                        name,
                        f"{pair['gflops'][i]:.3f}",
                        f"{pair['params_m'][i]:.2f}",
                        f"{pair['fid'][i]:.1f} ({low:.1f}–{high:.1f})",
                    ]
                lines.append(
                    "| " + " | ".join([*cells, "yes" if pair["seed_ranges_overlap"] else "no"]) + " |"
                )
            lines.append("")
        reach = g["compute_to_reach"]
        if reach["levels"]:
            lines += [
                "Training compute (Gflops) at which each size's best patch first reaches an FID (mean over "
                "seeds, log-linear between evaluations; — never)",
                "",
                "| size | " + " | ".join(f"FID {v:.1f}" for v in reach["levels"]) + " |",
                "|---|" + "---:|" * len(reach["levels"]),
            ]
            for model, row in reach["by_size"].items():
                cells = ["—" if c is None else f"{c['train_compute_gflop']:.3g} (/{c['patch']})" for c in row]
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)
