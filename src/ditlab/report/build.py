"""Writes a sweep's report folder; `run_report` is the body of `src/report.py`."""

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from ditlab.cli import error_line, wandb_logged_in
from ditlab.io import atomic_write, atomic_write_text
from ditlab.report.figures import plot_fid_by_axis, plot_fid_vs_compute, plot_fid_vs_gflops
from ditlab.report.records import RunResult, load_records, load_wandb_records
from ditlab.report.scaling import scaling_markdown, scaling_summary
from ditlab.report.tables import (
    block_markdown,
    block_rows,
    runs_markdown,
    table4_markdown,
    table4_rows,
    to_csv,
)


def _write_text(path: Path, text: str) -> Path:
    return atomic_write_text(path, text)


def _write_png(path: Path, fig: Figure) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def write_report(records: Sequence[RunResult], out: str | Path) -> dict[str, Path]:
    """Writes the tables and figures (see `ditlab.report`) into `out`; returns them by name. A figure
    that has nothing to show (no FID yet) is left out, and said so."""
    if not records:
        raise ValueError("no run records to report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "table4.md": _write_text(out / "table4.md", table4_markdown(records)),
        "table4.csv": _write_text(out / "table4.csv", to_csv(table4_rows(records))),
        "runs.md": _write_text(out / "runs.md", runs_markdown(records)),
    }
    if len({r.block for r in records}) > 1:
        written["blocks.md"] = _write_text(out / "blocks.md", block_markdown(records))
        written["blocks.csv"] = _write_text(out / "blocks.csv", to_csv(block_rows(records)))
    if any(r.fid is not None for r in records):
        written["fid_vs_gflops.png"] = _write_png(out / "fid_vs_gflops.png", plot_fid_vs_gflops(records))
        if (by_axis := plot_fid_by_axis(records)) is not None:
            written["fid_by_axis.png"] = _write_png(out / "fid_by_axis.png", by_axis)
    else:
        print("[ditlab] no run has an FID yet: fid_vs_gflops.png left out")
    if (scaling := scaling_summary(records)) is not None:
        written["scaling.json"] = _write_text(out / "scaling.json", json.dumps(scaling, indent=2) + "\n")
        written["scaling.md"] = _write_text(out / "scaling.md", scaling_markdown(scaling))
    if any(r.fid_history for r in records):
        written["fid_vs_compute.png"] = _write_png(out / "fid_vs_compute.png", plot_fid_vs_compute(records))
    else:
        print("[ditlab] no run has an FID history: fid_vs_compute.png left out")
    return written


@dataclass
class ReportConfig:
    runs: Any = None  # sweep folder(s), searched recursively: runs=multirun/<time> or runs=[a,b]
    wandb: str | None = None  # entity/project: read the runs from W&B instead (network)
    wandb_group: str | None = None  # with wandb=: one sweep (its group is the multirun folder's name)
    out: str | None = None  # the report folder; default reports/<time>
    log_wandb: bool = False  # also log a report run (tables, scatter, figures) to W&B; offline without login


def run_report(args: DictConfig) -> dict[str, Path]:
    """The body of `src/report.py`: `args` are its key=value arguments (see `ReportConfig`). W&B's failures
    (no API key, no network, an unknown project) are one ValueError line."""
    cfg: ReportConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ReportConfig), args))
    if cfg.wandb and not wandb_logged_in():  # else wandb fails with a traceback, or after its retries
        raise ValueError(
            f"wandb={cfg.wandb}: reading runs from W&B needs an API key; run `wandb login` or set "
            "WANDB_API_KEY, or report from the run folders with runs=<sweep folder>"
        )
    if not (cfg.wandb or cfg.log_wandb):
        return _report(cfg)
    import wandb.errors  # slow: only when W&B is used

    try:
        return _report(cfg)
    except wandb.errors.Error as err:
        key = f"wandb={cfg.wandb}" if cfg.wandb else "log_wandb=true"
        raise ValueError(
            f"{key}: W&B failed ({error_line(err)}); check the network, the API key (`wandb login`) and "
            "the entity/project, or report from the run folders with runs=<sweep folder>"
        ) from None


def _report(cfg: ReportConfig) -> dict[str, Path]:
    """`run_report` without its W&B error handling."""
    if (cfg.runs is None) == (cfg.wandb is None):
        raise ValueError(
            "give either runs=<sweep folder> (e.g. runs=multirun/2026-01-31_12-00-00) or "
            "wandb=<entity/project> [wandb_group=<sweep>], not both"
        )
    if cfg.runs is not None:
        runs = [str(r) for r in cfg.runs] if isinstance(cfg.runs, list) else str(cfg.runs).split(",")
        records = load_records(runs)
        group = cfg.wandb_group or (Path(runs[0]).name if len(runs) == 1 else None)
    else:
        records = load_wandb_records(cfg.wandb, cfg.wandb_group)
        group = cfg.wandb_group
    out = Path(cfg.out or f"reports/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    written = write_report(records, out)
    print(f"[ditlab] {len(records)} runs; report in {out}:")
    for name in written:
        print(f"  {name}")
    print(block_markdown(records) if "blocks.md" in written else table4_markdown(records))
    if cfg.log_wandb:
        from ditlab.report.wandb_report import log_to_wandb

        log_to_wandb(records, written, group=group)
    return written
