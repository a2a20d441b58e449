"""A W&B report run for a sweep: the runs and points as tables, a scatter of FID against Gflops, the figures."""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ditlab.report.records import RunResult, group_points


def log_to_wandb(records: Sequence[RunResult], written: dict[str, Path], *, group: str | None = None) -> str:
    """Logs a report run to W&B: `runs` (one row per run, with its seed), `points` (one row per point:
    FID mean, min, max over seeds), a scatter of the points' mean FID against Gflops and the figures.
    The project and entity are those of the training runs (else `ditlab`); offline without a W&B login
    (then `wandb sync` it later). Returns the run's folder."""
    import wandb

    projects = {(r.wandb or {}).get("project") for r in records} - {None}
    entities = {(r.wandb or {}).get("entity") for r in records} - {None}
    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        from ditlab.cli import wandb_logged_in

        mode = "online" if wandb_logged_in() else "offline"
    out = next(iter(written.values())).parent
    run = wandb.init(
        project=projects.pop() if len(projects) == 1 else "ditlab",
        entity=entities.pop() if len(entities) == 1 else None,
        group=group,
        job_type="report",
        name=f"report-{out.name}",
        dir=str(out),
        mode=mode,
    )
    columns = [
        "run_name",
        "block",
        "model",
        "patch",
        "seed",
        "gflops",
        "params_m",
        "fid",
        "train_compute_gflop",
    ]
    runs = wandb.Table(columns=columns, data=[[getattr(r, c) for c in columns] for r in records])
    point_columns = [
        "point",
        "block",
        "model",
        "patch",
        "gflops",
        "params_m",
        "fid",
        "fid_min",
        "fid_max",
        "seeds",
    ]
    points = wandb.Table(
        columns=point_columns,
        data=[
            [f"{p.block} {p.label}", p.block, p.model, p.patch, p.gflops, p.params_m]
            + ([p.fid.mean, p.fid.low, p.fid.high] if p.fid else [None, None, None])
            + [len(p.runs)]
            for p in group_points(records)
        ],
    )
    logged: dict[str, Any] = {
        "runs": runs,
        "points": points,
        "fid_vs_gflops_scatter": wandb.plot.scatter(
            points, "gflops", "fid", title="FID vs. Gflops (mean over seeds)"
        ),
    }
    logged |= {
        name.removesuffix(".png"): wandb.Image(str(p)) for name, p in written.items() if p.suffix == ".png"
    }
    run.log(logged)
    run_dir = str(Path(run.dir).parent) if mode != "disabled" else ""
    run.finish()
    if mode == "offline":
        print(f"[ditlab] W&B report logged offline; upload it with: wandb sync {run_dir}")
    return run_dir
