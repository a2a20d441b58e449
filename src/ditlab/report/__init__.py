"""FID against Gflops for a sweep of runs: the paper's Table 4 and its scaling figures.

Each finished training run writes `<run folder>/results.json` (its design-space coordinates and seed,
Gflops, parameters, FID and the FID history against training compute). `load_records` gathers them from
sweep folders, `load_wandb_records` from a W&B project; runs of one point that differ only in their seed
are grouped (`group_points`: mean, min and max over seeds; runs that differ in steps, model config, FID
protocol, ... are separate rows, labelled by what differs); `write_report` turns them into

    table4.md / table4.csv   rows = model size, columns = patch size (paper order): FID, Gflops, params
    blocks.md / blocks.csv   one row per point, when the conditioning block varies
    runs.md                  one row per run: seed, precision, device, steps, FID and its history
    fid_by_axis.png          FID per point where points of one size and patch differ in other axes (those
                             leave Gflops unchanged: drawn by axis, not along Gflops)
    fid_vs_gflops.png        FID against forward Gflops (log x), one colour and marker per model size
    fid_vs_compute.png       FID against training compute (Gflops), one curve per point
    scaling.json / .md       per block with three or more Gflops: FID's correlation with log Gflops (Pearson,
                             Spearman, their spread over seeds), equal-Gflops pairs of sizes, the training
                             compute each size needs to reach an FID; the paper's Table 4 the same way

Modules: `records` (the record schema, loading, grouping), `tables`, `figures`, `scaling`, `wandb_report`
(a W&B report run), `build` (the report folder and the command line `src/report.py`). The notebook
`notebooks/fid_vs_gflops.ipynb` uses the same functions.
"""

from ditlab.report.build import ReportConfig, run_report, write_report
from ditlab.report.figures import DPI, FIGSIZE, plot_fid_by_axis, plot_fid_vs_compute, plot_fid_vs_gflops
from ditlab.report.records import (
    RECORD_FILE,
    PointResult,
    RunResult,
    Spread,
    group_points,
    load_records,
    load_wandb_records,
    parse_record,
    wandb_document,
)
from ditlab.report.tables import block_markdown, block_rows, runs_markdown, table4_markdown, table4_rows
from ditlab.report.wandb_report import log_to_wandb

__all__ = [
    "DPI",
    "FIGSIZE",
    "RECORD_FILE",
    "PointResult",
    "ReportConfig",
    "RunResult",
    "Spread",
    "block_markdown",
    "block_rows",
    "group_points",
    "load_records",
    "load_wandb_records",
    "log_to_wandb",
    "parse_record",
    "plot_fid_by_axis",
    "plot_fid_vs_compute",
    "plot_fid_vs_gflops",
    "run_report",
    "runs_markdown",
    "table4_markdown",
    "table4_rows",
    "wandb_document",
    "write_report",
]
