"""The paper's tables from run records: Table 4 (size × patch) and the conditioning-block comparison.

FIDs are means over a point's seeds; with more than one seed the markdown shows the range over seeds
and the CSV the per-seed minimum, maximum and count. Runs of one point that differ in their settings
(steps, model config, FID protocol, ...) are separate rows, labelled by those settings (`variant`).
"""

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

from ditlab.report.records import (
    BLOCK_NAMES,
    PointResult,
    RunResult,
    Spread,
    group_points,
    variant_suffix,
    variant_text,
)


def _spread_fields(spread: Spread | None, suffix: str = "") -> dict[str, Any]:
    if spread is None:
        return {
            f"fid{suffix}": None,
            f"fid_min{suffix}": None,
            f"fid_max{suffix}": None,
            f"seeds{suffix}": None,
        }
    return {
        f"fid{suffix}": spread.mean,
        f"fid_min{suffix}": spread.low,
        f"fid_max{suffix}": spread.high,
        f"seeds{suffix}": spread.n,
    }


def _fd_fields(spread: Spread | None, suffix: str = "") -> dict[str, Any]:
    """FD-DINOv2 beside the FID: its mean over the point's runs and their range (None: not computed)."""
    values = (None,) * 3 if spread is None else (spread.mean, spread.low, spread.high)
    keys = (f"fd_dinov2{suffix}", f"fd_dinov2_min{suffix}", f"fd_dinov2_max{suffix}")
    return dict(zip(keys, values, strict=True))


def _with_fd(points: Sequence[PointResult]) -> bool:
    """Whether FD-DINOv2 columns belong in a table: where some run computed it."""
    return any(p.fd_dinov2 is not None for p in points)


def table4_rows(records: Iterable[RunResult]) -> list[dict[str, Any]]:
    """Table 4: one row per (block, model size, axes, variant); per patch size (coarse to fine) the FID (mean
    over seeds) `fid_p8`, its range `fid_min_p8`/`fid_max_p8` and seed count `seeds_p8`, then `gflops_p8` and
    `params_m_p8`, .... A point that was not run, or has no FID yet, is None. Where some run has FD-DINOv2,
    `fd_dinov2_p8`, `fd_dinov2_min_p8`, `fd_dinov2_max_p8` follow the FID's."""
    points = group_points(records)
    patches = sorted({p.patch for p in points}, reverse=True)
    with_fd = _with_fd(points)
    fd = ("fd_dinov2", "fd_dinov2_min", "fd_dinov2_max") if with_fd else ()
    fields = ("fid", "fid_min", "fid_max", "seeds", *fd, "gflops", "params_m")
    rows: dict[tuple, dict[str, Any]] = {}
    for p in points:
        row = rows.setdefault(
            (p.block, p.model, p.axes, p.variant),
            {
                "block": p.block,
                "model": p.model,
                "axes": axes_text(p.axes),
                "variant": variant_text(p.variant),
            }
            | {f"{f}_p{patch}": None for f in fields for patch in patches},
        )
        row |= _spread_fields(p.fid, f"_p{p.patch}")
        row |= _fd_fields(p.fd_dinov2, f"_p{p.patch}") if with_fd else {}
        row[f"gflops_p{p.patch}"] = p.gflops
        row[f"params_m_p{p.patch}"] = p.params_m
    return list(rows.values())


def block_rows(records: Iterable[RunResult]) -> list[dict[str, Any]]:
    """The conditioning-block comparison: one row per point (per variant where runs of a point differ in
    their settings), blocks in the paper's order; FD-DINOv2 beside the FID where some run has it."""
    points = group_points(records)
    with_fd = _with_fd(points)
    return [
        {"block": p.block, "model": p.model, "patch": p.patch, "axes": axes_text(p.axes)}
        | {"variant": variant_text(p.variant), "gflops": p.gflops, "params_m": p.params_m}
        | _spread_fields(p.fid)
        | (_fd_fields(p.fd_dinov2) if with_fd else {})
        for p in points
    ]


def axes_text(axes: tuple[tuple[str, Any], ...]) -> str:
    """The coordinates off their defaults, "objective=sit_linear, mlp=swiglu" ("" for the paper's)."""
    return ", ".join(f"{k}={v}" for k, v in axes)


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def fid_cell(spread: Spread | None) -> str:
    """`mean` for one seed; `mean (min–max)` over several."""
    if spread is None:
        return "—"
    if spread.n == 1:
        return f"{spread.mean:.2f}"
    return f"{spread.mean:.2f} ({spread.low:.2f}–{spread.high:.2f})"


def run_fid_cell(value: float | None, std: float | None) -> str:
    """A run's FID (or FD-DINOv2): `value`, or `mean ± std` over its sampling seeds."""
    return _fmt(value, 2) if value is None or std is None else f"{value:.2f} ± {std:.2f}"


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    """A markdown table: the first column left-aligned, the others right-aligned (numbers)."""
    rows = [header, ["---" if i == 0 else "---:" for i in range(len(header))], *lines]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def fid_caption(records: Sequence[RunResult]) -> str:
    """What the FIDs are: how many samples, which feature network, which data, which training steps, seeds."""
    parts = []
    for name, values in (
        ("data", {r.data for r in records}),
        ("FID samples", {r.fid_num_samples for r in records}),
        ("FID labels", {dict(r.settings).get("fid_labels") for r in records}),
        ("NFE per image", {r.nfe for r in records}),
        ("feature network", {r.feature_network for r in records}),
        ("training steps", {r.step for r in records}),
        ("seeds", {r.seed for r in records}),
    ):
        values.discard(None)
        if values:
            parts.append(f"{name}: {', '.join(map(str, sorted(values)))}")
    points = group_points(records)
    if max(len(p.runs) for p in points) > 1:
        parts.append("FID: mean over seeds (min–max)")
    note = variant_note(points)
    return "; ".join([*parts, note] if note else parts)


def variant_note(points: Sequence[PointResult]) -> str:
    """Which settings split runs of one point into rows ("" when none did)."""
    differ = dict.fromkeys(k for p in points for k, _ in p.variant)
    if not differ:
        return ""
    return (
        f"[...]: runs of one point that differ in {', '.join(differ)} are separate rows (seeds are "
        "averaged only over runs alike in everything else)"
    )


def table4_markdown(records: Sequence[RunResult]) -> str:
    """Table 4 in markdown: a section per conditioning block; params as the range over patch sizes
    (they differ by the patch embedding and the final layer only)."""
    points = group_points(records)
    patches = sorted({p.patch for p in points}, reverse=True)
    fd = [f"FD-DINOv2 /{p}" for p in patches] if _with_fd(points) else []
    header = ["model", *[f"FID /{p}" for p in patches], *fd, *[f"Gflops /{p}" for p in patches], "params (M)"]
    text = []
    for block in dict.fromkeys(p.block for p in points):
        lines = []
        for row in dict.fromkeys((p.model, p.axes, p.variant) for p in points if p.block == block):
            model, axes, variant = row
            at: dict[int, PointResult] = {
                p.patch: p for p in points if (p.block, p.model, p.axes, p.variant) == (block, *row)
            }
            params = sorted(p.params_m for p in at.values())
            low, high = f"{params[0]:.1f}", f"{params[-1]:.1f}"
            lines.append(
                [f"{model} {axes_text(axes)}".strip() + variant_suffix(variant)]
                + [fid_cell(at[p].fid) if p in at else "—" for p in patches]
                + [fid_cell(at[p].fd_dinov2) if p in at else "—" for p in patches if fd]
                + [_fmt(at[p].gflops, 2) if p in at else "—" for p in patches]
                + [low if low == high else f"{low}–{high}"]
            )
        text.append(f"### {BLOCK_NAMES.get(block, block)}\n\n{markdown_table(header, lines)}")
    caption = fid_caption(records)
    return "\n".join(text) + (f"\n{caption}\n" if caption else "")


def block_markdown(records: Sequence[RunResult]) -> str:
    """The block comparison in markdown (the paper's conditioning ablation)."""
    points = group_points(records)
    with_fd = _with_fd(points)
    header = ["block", "model", "Gflops", "params (M)", "FID", *["FD-DINOv2"] * with_fd, "seeds"]
    lines = [
        [
            BLOCK_NAMES.get(p.block, p.block),
            p.label,
            _fmt(p.gflops, 2),
            _fmt(p.params_m, 1),
            fid_cell(p.fid),
            *[fid_cell(p.fd_dinov2)] * with_fd,
            str(len(p.runs)),
        ]
        for p in points
    ]
    note = variant_note(points)
    return markdown_table(header, lines) + (f"\n{note}\n" if note else "")


def runs_markdown(records: Sequence[RunResult]) -> str:
    """Every run: its point, seed, precision and device ("—" where its record predates them), steps, FID,
    the FID's network evaluations per image (NFE: a column where some record has it) and FID history (step:
    FID)."""
    with_nfe = any(r.nfe is not None for r in records)
    with_fd = any(r.fd_dinov2 is not None for r in records)  # FD-DINOv2 beside the FID where some run has it
    header = ["run", "seed", "precision", "device", "Gflops", "steps", "FID", *["FD-DINOv2"] * with_fd]
    header += ["NFE"] * with_nfe + ["FID along the run (step: FID)"]
    lines = [
        [
            f"{BLOCK_NAMES.get(r.block, r.block)} {r.label}",
            _fmt(r.seed, 0),
            _fmt(r.precision, 0),
            _fmt(r.device, 0),
            _fmt(r.gflops, 3),
            _fmt(r.step, 0),
            run_fid_cell(r.fid, r.fid_std),  # ± the spread over its sampling seeds, where it has several
            *[run_fid_cell(r.fd_dinov2, r.fd_dinov2_std)] * with_fd,
            *([_fmt(r.nfe, 1)] * with_nfe),
            ", ".join(f"{p.get('step')}: {p['fid']:.2f}" for p in r.fid_history) or "—",
        ]
        for r in records
    ]
    return markdown_table(header, lines)


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)  # None is written as an empty cell
    return buffer.getvalue()
