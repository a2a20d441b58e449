"""The paper's figures from run records: FID against forward Gflops, and against training compute.

Each design-space point is one marker at the mean over its seeds, with an error bar spanning the seeds'
minimum to maximum when there are several.
"""

import math
import textwrap
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

from ditlab.report.records import (
    BLOCK_NAMES,
    MODEL_ORDER,
    PointResult,
    RunResult,
    Spread,
    block_rank,
    group_points,
    paper_order,
    variant_suffix,
)

COLOURS = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
MARKERS = ("v", "o", "s", "^", "D", "P", "X")
PATCH_LINESTYLES = {2: "-", 4: "--", 8: ":"}
FIGSIZE = (6.4, 4.8)  # inches; at DPI the PNGs are 960×720 pixels
DPI = 150


def new_figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    return fig, fig.add_subplot()


def log_x(ax: Any, values: list[float]) -> None:
    """A log x axis whose labels never collide: within one decade a few round values; over one to two
    decades the decades and their 2× and 5× multiples; wider, the decades alone."""
    ax.set_xscale("log")
    plain = FuncFormatter(lambda x, _: f"{x:g}")
    decades = math.log10(max(values) / min(values))
    if decades < 1:  # no decade tick would fall inside: label a few round values
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(plain)
        return
    ax.xaxis.set_major_locator(LogLocator(base=10))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=range(2, 10)))
    ax.xaxis.set_major_formatter(plain)
    if decades <= 2:
        two_and_five = {2.0, 5.0}
        ax.xaxis.set_minor_formatter(
            FuncFormatter(
                lambda x, _: f"{x:g}" if round(x / 10 ** math.floor(math.log10(x)), 6) in two_and_five else ""
            )
        )
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())


def _styler(points: Sequence[PointResult | RunResult]) -> Any:
    """point -> (colour, marker): one per model size (fixed for the known sizes), as in the paper; one
    per conditioning block instead when the block varies."""
    if len({p.block for p in points}) > 1:  # block ranks 0..4 take styles 1..5 of the 7
        return lambda p: (COLOURS[block_rank(p.block)[0] + 1], MARKERS[block_rank(p.block)[0] + 1])
    unknown = sorted({p.model for p in points} - set(MODEL_ORDER))
    rank = {m: i for i, m in enumerate([*MODEL_ORDER, *unknown])}
    return lambda p: (COLOURS[rank[p.model] % len(COLOURS)], MARKERS[rank[p.model] % len(MARKERS)])


def _block_suffix(p: PointResult, points: Sequence[PointResult]) -> str:
    return f" {BLOCK_NAMES.get(p.block, p.block)}" if len({x.block for x in points}) > 1 else ""


def _error_bars(ax: Any, x: list[float], spreads: list[Spread], colour: str) -> None:
    """Vertical bars from each spread's minimum to its maximum (only where there are several seeds)."""
    several = [(xi, s) for xi, s in zip(x, spreads, strict=True) if s.n > 1]
    if several:
        ax.errorbar(
            [xi for xi, _ in several],
            [s.mean for _, s in several],
            yerr=[[s.mean - s.low for _, s in several], [s.high - s.mean for _, s in several]],
            fmt="none",
            ecolor=colour,
            elinewidth=1.2,
            capsize=0,
        )


def plot_fid_vs_gflops(records: Sequence[RunResult]) -> Figure:
    """FID against forward Gflops (log x), as in the paper: one colour and marker per model size and a
    line through its patch sizes (one per variant where runs of a point differ in their settings). When
    the block varies, one colour and marker per block. Markers at the mean over seeds, bars over the
    seeds' range."""
    scored = [p for p in group_points(records) if p.fid is not None]
    if not scored:
        raise ValueError("no run has an FID yet, so there is nothing to plot against Gflops")
    style = _styler(scored)
    fig, ax = new_figure()
    lines: dict[tuple, list[PointResult]] = {}
    for p in sorted(scored, key=paper_order):  # a line joins patch sizes only: its other axes are equal
        lines.setdefault((p.block, p.model, p.axes, p.variant), []).append(p)
    labelled: set[str] = set()
    for line in lines.values():
        line.sort(key=lambda p: p.gflops)
        colour, marker = style(line[0])
        label = line[0].model + _block_suffix(line[0], scored) + variant_suffix(line[0].variant)
        if label in labelled:  # points off the paper's axes: one legend entry (fid_by_axis.png names them)
            label = "_nolegend_"
        labelled.add(label)
        x = [p.gflops for p in line]
        ax.plot(x, [p.fid.mean for p in line], color=colour, marker=marker, label=label)
        _error_bars(ax, x, [p.fid for p in line], colour)
        for p in line:
            ax.annotate(f"/{p.patch}", (p.gflops, p.fid.mean), textcoords="offset points", xytext=(4, 4))
    log_x(ax, [p.gflops for p in scored])
    ax.set_xlabel("Transformer Gflops (forward pass)")
    ax.set_ylabel(_fid_label(records))
    ax.set_title("FID vs. Gflops" + _seed_note(scored))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def plot_fid_by_axis(records: Sequence[RunResult]) -> Figure | None:
    """FID per point where points of one size and patch differ in axes that leave Gflops unchanged (the
    successors' objective, layers, REPA, ...): one marker per point at its seeds' mean, bars over their
    range, labelled by its axes; such a sweep is drawn by its axis, not as a line along Gflops. None when
    no two points of one (block, size, patch) differ in their axes."""
    scored = [p for p in group_points(records) if p.fid is not None]
    by_shape: dict[tuple, list[PointResult]] = {}
    for p in sorted(scored, key=paper_order):
        by_shape.setdefault((p.block, p.model, p.patch), []).append(p)
    shown = [p for group in by_shape.values() if len({q.axes for q in group}) > 1 for p in group]
    if not shown:
        return None
    fig = Figure(figsize=(FIGSIZE[0] * 1.4, 1.2 + 0.55 * len(shown)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = list(range(len(shown)))  # one row per point, its axes as the row's label
    fids = [p.fid for p in shown]
    ax.errorbar(
        [f.mean for f in fids],
        y,
        xerr=[[f.mean - f.low for f in fids], [f.high - f.mean for f in fids]],
        fmt="o",
        color=COLOURS[1],
        capsize=3,
    )
    ax.set_yticks(y, [textwrap.fill(p.label, 48) for p in shown], fontsize="small")
    ax.invert_yaxis()  # paper order from the top
    ax.set_xlabel(_fid_label(records))
    ax.set_title("FID by the axes that leave Gflops unchanged" + _seed_note(shown), fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def plot_fid_vs_compute(records: Sequence[RunResult]) -> Figure:
    """FID against training compute (`train_compute_gflop` = Gflops × 3 × images seen, log x) along
    each point's FID history: one curve per point (mean over seeds, bars over their range), colour by
    model size (or block), line style by patch."""
    curves = [p for p in group_points(records) if p.fid_history]
    if not curves:
        raise ValueError("no run has an FID history (fid_history), so there is nothing to plot")
    style = _styler(curves)
    fig, ax = new_figure()
    for p in curves:
        colour, marker = style(p)
        x = [h["train_compute_gflop"] for h in p.fid_history]
        spreads = [h["fid"] for h in p.fid_history]
        ax.plot(
            x,
            [s.mean for s in spreads],
            color=colour,
            marker=marker,
            markersize=3,
            linestyle=PATCH_LINESTYLES.get(p.patch, "-."),
            label=p.label + _block_suffix(p, curves),
        )
        _error_bars(ax, x, spreads, colour)
    log_x(ax, [h["train_compute_gflop"] for p in curves for h in p.fid_history])
    ax.set_xlabel("Training compute (Gflops)")
    ax.set_ylabel(_fid_label(records))
    ax.set_title("FID vs. training compute" + _seed_note(curves))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncols=2)
    return fig


def _seed_note(points: Sequence[PointResult]) -> str:
    seeds = {len(p.runs) for p in points}
    return f" (mean and range over {'/'.join(map(str, sorted(seeds)))} seeds)" if max(seeds) > 1 else ""


def _fid_label(records: Sequence[RunResult]) -> str:
    counts = {r.fid_num_samples for r in records if r.fid is not None or r.fid_history}
    if len(counts) == 1 and (n := counts.pop()):
        return f"FID-{n // 1000}K" if n % 1000 == 0 else f"FID ({n} samples)"
    return "FID"


def plot_fid_vs_nfe(points: Sequence[dict[str, Any]], title: str = "", fid_label: str = "FID") -> Figure:
    """FID against the network evaluations per image (NFE, log x) of one checkpoint's samples: one colour,
    marker and line per sampler, through its step counts. `points` are `src/fid_nfe.py`'s: `sampler`,
    `nfe` and `fid_per_seed` (sampling seed -> FID); markers at the mean over the seeds, bars over their
    range."""
    if not points:
        raise ValueError("no point has an FID, so there is nothing to plot against NFE")
    fig, ax = new_figure()
    lines: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        lines.setdefault(p["sampler"], []).append(p)
    for i, (sampler, line) in enumerate(lines.items()):
        line = sorted(line, key=lambda p: p["nfe"])
        colour, marker = COLOURS[(i + 1) % len(COLOURS)], MARKERS[(i + 1) % len(MARKERS)]
        x = [p["nfe"] for p in line]
        spreads = [Spread(tuple(p["fid_per_seed"].values())) for p in line]
        ax.plot(x, [s.mean for s in spreads], color=colour, marker=marker, label=sampler)
        _error_bars(ax, x, spreads, colour)
    log_x(ax, [p["nfe"] for p in points])
    note = _seeds_note(points)
    ax.set_xlabel("network evaluations per image (NFE; a guided step counts 2)")
    ax.set_ylabel(fid_label)
    ax.set_title(textwrap.fill((title or "FID vs. NFE") + note, 70), fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def _seeds_note(points: Sequence[dict[str, Any]]) -> str:
    """A title's note on the sampling seeds behind each marker ("" when every point has one)."""
    seeds = sorted({len(p["fid_per_seed"]) for p in points})
    return f" (mean and range over {'/'.join(map(str, seeds))} sampling seeds)" if seeds[-1] > 1 else ""


def plot_fid_vs_sigma_rel(
    points: Sequence[dict[str, Any]],
    baseline: dict[str, Any] | None = None,
    title: str = "",
    fid_label: str = "FID",
) -> Figure:
    """FID against the relative standard deviation σ_rel (log x) of post-hoc EMA reconstructions
    (`src/posthoc_ema.py fid=true`): `points` have `sigma_rel` and `fid_per_seed` (sampling seed -> FID),
    markers at the mean over the seeds, bars over their range. `baseline` (the run's classic EMA, with
    `label` and `fid_per_seed`) is a horizontal line at its mean, with a band over its seeds' range."""
    if not points:
        raise ValueError("no σ_rel has an FID, so there is nothing to plot against σ_rel")
    fig, ax = new_figure()
    line = sorted(points, key=lambda p: p["sigma_rel"])
    x = [p["sigma_rel"] for p in line]
    spreads = [Spread(tuple(p["fid_per_seed"].values())) for p in line]
    ax.plot(x, [s.mean for s in spreads], color=COLOURS[1], marker=MARKERS[1], label="post-hoc EMA")
    _error_bars(ax, x, spreads, COLOURS[1])
    log_x(ax, x)
    if len(x) <= 8:  # the few σ_rel a sweep picks, labelled as given (log_x's round values can miss them)
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.xaxis.set_minor_locator(NullLocator())
    if baseline is not None:
        spread = Spread(tuple(baseline["fid_per_seed"].values()))
        ax.axhline(spread.mean, color=COLOURS[0], linestyle="--", label=baseline["label"])
        if spread.n > 1:
            ax.axhspan(spread.low, spread.high, color=COLOURS[0], alpha=0.2, linewidth=0)
    note = _seeds_note([*points, *([baseline] if baseline else [])])
    ax.set_xlabel("σ_rel of the EMA profile (relative standard deviation)")
    ax.set_ylabel(fid_label)
    ax.set_title(textwrap.fill((title or "FID vs. σ_rel") + note, 70), fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig
