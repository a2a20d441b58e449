"""FID against Gflops for a sweep of runs: the paper's Table 4 and its scaling figures.

Each finished training run writes `<run folder>/results.json` (its design-space coordinates, Gflops,
parameters, FID and the FID history against training compute). `load_records` gathers them from sweep
folders, `load_wandb_records` from a W&B project; `write_report` turns them into

    table4.md / table4.csv   rows = model size, columns = patch size (paper order): FID, Gflops, params
    blocks.md / blocks.csv   one row per run, when the conditioning block varies
    fid_vs_gflops.png        FID against forward Gflops (log x), one colour and marker per model size
    fid_vs_compute.png       FID against training compute (Gflops), one curve per run

The command line is `src/report.py`; the notebook `notebooks/fid_vs_gflops.ipynb` uses the same functions.
"""

import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator
from omegaconf import DictConfig, OmegaConf

from ditlab.cli import run_cli

RECORD_FILE = "results.json"
# Paper order: sizes from small to large, patches from coarse to fine (Gflops increasing along a row).
# DiT-Ti is ours (CPU work), not in the paper.
MODEL_ORDER = ("DiT-Ti", "DiT-S", "DiT-B", "DiT-L", "DiT-XL")
BLOCK_ORDER = ("in_context", "cross_attention", "adaln", "adaln_zero")
BLOCK_NAMES = {
    "in_context": "in-context",
    "cross_attention": "cross-attention",
    "adaln": "adaLN",
    "adaln_zero": "adaLN-Zero",
}
COLOURS = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
MARKERS = ("v", "o", "s", "^", "D", "P", "X")
PATCH_LINESTYLES = {2: "-", 4: "--", 8: ":"}
FIGSIZE = (6.4, 4.8)  # inches; at DPI the PNGs are 960×720 pixels
DPI = 150


@dataclass(frozen=True)
class RunRecord:
    """One training run: its point in the design space and what it measured.

    `fid_history` holds dicts with at least `train_compute_gflop` (forward Gflops × 3 × images seen)
    and `fid`, in training order.
    """

    run_name: str
    block: str
    model: str
    patch: int
    gflops: float
    params_m: float
    fid: float | None
    step: int | None
    train_compute_gflop: float | None
    fid_num_samples: int | None
    feature_network: str | None
    data: str | None
    wandb: dict[str, Any] | None
    fid_history: tuple[dict[str, Any], ...]
    source: str  # the results.json path, or the W&B run path

    @property
    def label(self) -> str:
        """The paper's short name, e.g. "XL/2"."""
        return f"{self.model.removeprefix('DiT-')}/{self.patch}"


def _number(value: Any, what: str, source: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{source}: {what} must be a finite number, got {value!r}")
    return float(value)


def parse_record(data: dict[str, Any], source: str) -> RunRecord:
    """Validates one `results.json` document (see the module docstring) into a `RunRecord`."""
    required = ("run_name", "coordinates", "gflops", "params_m")
    missing = [key for key in required if key not in data]
    coordinates = data.get("coordinates") or {}
    missing += [f"coordinates.{key}" for key in ("block", "model", "patch") if key not in coordinates]
    if missing:
        raise ValueError(
            f"{source}: missing {', '.join(missing)}; a run record is the results.json that src/train.py "
            "writes (run_name, coordinates {block, model, patch}, gflops, params_m, fid, fid_history)"
        )
    history = []
    for i, point in enumerate(data.get("fid_history") or []):
        where = f"fid_history[{i}]"
        if not isinstance(point, dict):
            raise ValueError(f"{source}: {where} must be an object, got {point!r}")
        history.append(
            {
                **point,
                "train_compute_gflop": _number(point.get("train_compute_gflop"), where, source),
                "fid": _number(point.get("fid"), f"{where}.fid", source),
            }
        )
    history.sort(key=lambda point: point["train_compute_gflop"])
    return RunRecord(
        run_name=str(data["run_name"]),
        block=str(coordinates["block"]),
        model=str(coordinates["model"]),
        patch=int(coordinates["patch"]),
        gflops=_number(data["gflops"], "gflops", source),
        params_m=_number(data["params_m"], "params_m", source),
        fid=_number(data.get("fid"), "fid", source, optional=True),
        step=data.get("step"),
        train_compute_gflop=_number(
            data.get("train_compute_gflop"), "train_compute_gflop", source, optional=True
        ),
        fid_num_samples=data.get("fid_num_samples"),
        feature_network=data.get("feature_network"),
        data=data.get("data"),
        wandb=data.get("wandb"),
        fid_history=tuple(history),
        source=source,
    )


def model_rank(model: str) -> tuple[int, str]:
    return (MODEL_ORDER.index(model), "") if model in MODEL_ORDER else (len(MODEL_ORDER), model)


def block_rank(block: str) -> tuple[int, str]:
    return (BLOCK_ORDER.index(block), "") if block in BLOCK_ORDER else (len(BLOCK_ORDER), block)


def paper_order(record: RunRecord) -> tuple:
    """Sort key: block, then model size small to large, then patch coarse to fine."""
    return (block_rank(record.block), model_rank(record.model), -record.patch)


def _check_consistent(records: list[RunRecord]) -> list[RunRecord]:
    seen: dict[tuple[str, str, int], RunRecord] = {}
    for record in records:
        key = (record.block, record.model, record.patch)
        if key in seen:
            raise ValueError(
                f"two runs of {record.run_name}: {seen[key].source} and {record.source}; a table holds one "
                "run per point, so pass the folders of one campaign only (runs=[folder,...])"
            )
        seen[key] = record
    datasets = sorted({r.data for r in records if r.data})
    if len(datasets) > 1:
        raise ValueError(
            f"the runs were trained on different data ({', '.join(datasets)}); FIDs on different data do "
            "not share a table: report each campaign separately"
        )
    return sorted(records, key=paper_order)


def load_records(runs: str | Path | Sequence[str | Path]) -> list[RunRecord]:
    """Reads every `results.json` under the given sweep folders (searched recursively; a path may also be
    a results.json itself), in paper order. Raises FileNotFoundError when there are none."""
    folders = [Path(runs)] if isinstance(runs, str | Path) else [Path(r) for r in runs]
    if not folders:
        raise ValueError("no runs folder given; pass runs=multirun/<time> (or runs=[folder,...])")
    files: list[Path] = []
    for folder in folders:
        if not folder.exists():
            raise FileNotFoundError(
                f"runs folder {folder} does not exist; pass the folder a sweep wrote, e.g. "
                "runs=multirun/2026-01-31_12-00-00"
            )
        files += [folder] if folder.is_file() else sorted(folder.rglob(RECORD_FILE))
    if not files:
        raise FileNotFoundError(
            f"no {RECORD_FILE} under {', '.join(map(str, folders))} (searched recursively); every training "
            f"run writes <run folder>/{RECORD_FILE} when it finishes: are the runs finished, and is this "
            "the sweep folder (multirun/<time>)?"
        )
    records = []
    for file in files:
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{file} is not valid JSON ({error}); was it written by src/train.py?"
            ) from error
        records.append(parse_record(data, str(file)))
    return _check_consistent(records)


def load_wandb_records(project: str, group: str | None = None) -> list[RunRecord]:
    """Reads the training runs of the W&B project `entity/project` (optionally one group, i.e. one sweep):
    coordinates from the run config, `gflops`, `params_m`, `fid`, `train_compute_gflop` from the summary,
    and the FID curve from the logged `train_compute_gflop` and `fid` history. Needs network access."""
    import wandb

    if project.count("/") != 1:
        raise ValueError(f"wandb={project}: give the project as entity/project, e.g. wandb=my-team/ditlab")
    runs = wandb.Api().runs(project, filters={"group": group} if group else None)
    records, skipped = [], []
    for run in runs:
        config, summary = run.config, run.summary
        coordinates = {
            "block": (config.get("block") or {}).get("name"),
            "model": (config.get("model") or {}).get("name"),
            "patch": (config.get("patch") or {}).get("size"),
        }
        if None in coordinates.values() or summary.get("gflops") is None:
            skipped.append(run.name)  # not a training run, or one that ended before it logged Gflops
            continue
        source = "/".join(run.path)
        history = [
            {"train_compute_gflop": row["train_compute_gflop"], "fid": row["fid"]}
            for row in run.scan_history(keys=["train_compute_gflop", "fid"])
        ]
        if not history and summary.get("fid") is not None and summary.get("train_compute_gflop"):
            history = [{"train_compute_gflop": summary["train_compute_gflop"], "fid": summary["fid"]}]
        data_target = (config.get("data") or {}).get("_target_")
        document = {
            "run_name": run.name,
            "coordinates": coordinates,
            "gflops": summary.get("gflops"),
            "params_m": summary.get("params_m"),
            "fid": summary.get("fid"),
            "step": summary.get("trainer/global_step"),
            "train_compute_gflop": summary.get("train_compute_gflop"),
            "fid_num_samples": summary.get("fid_num_samples"),
            "feature_network": summary.get("feature_network"),
            "data": data_target.rsplit(".", 1)[-1] if data_target else None,
            "wandb": {"project": run.project, "entity": run.entity, "id": run.id},
            "fid_history": history,
        }
        records.append(parse_record(document, source))
    if skipped:
        print(
            f"[ditlab] skipped {len(skipped)} W&B run(s) without coordinates or Gflops: {', '.join(skipped)}"
        )
    if not records:
        where = f"{project}" + (f" (group {group})" if group else "")
        raise FileNotFoundError(
            f"no training runs with Gflops in W&B project {where}; check the entity/project and the group "
            "(a sweep's group is the name of its multirun folder)"
        )
    return _check_consistent(records)


# ---------------------------------------------------------------------------------------------- tables


def table4_rows(records: Iterable[RunRecord]) -> list[dict[str, Any]]:
    """Table 4: one row per (block, model size); FID, Gflops and params (M) per patch size, as
    `fid_p8`, `gflops_p8`, `params_m_p8`, ... for the patch sizes present (coarse to fine). A point
    that was not run, or has no FID yet, is None."""
    records = sorted(records, key=paper_order)
    patches = sorted({r.patch for r in records}, reverse=True)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault(
            (r.block, r.model),
            {"block": r.block, "model": r.model}
            | {f"{field}_p{p}": None for field in ("fid", "gflops", "params_m") for p in patches},
        )
        row[f"fid_p{r.patch}"] = r.fid
        row[f"gflops_p{r.patch}"] = r.gflops
        row[f"params_m_p{r.patch}"] = r.params_m
    return list(rows.values())


def block_rows(records: Iterable[RunRecord]) -> list[dict[str, Any]]:
    """The conditioning-block comparison: one row per run, blocks in the paper's order."""
    return [
        {
            "block": r.block,
            "model": r.model,
            "patch": r.patch,
            "gflops": r.gflops,
            "params_m": r.params_m,
            "fid": r.fid,
        }
        for r in sorted(records, key=lambda r: (block_rank(r.block), model_rank(r.model), -r.patch))
    ]


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _markdown(header: list[str], lines: list[list[str]]) -> str:
    rows = [header, ["---" if i == 0 else "---:" for i in range(len(header))], *lines]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows) + "\n"


def fid_caption(records: Sequence[RunRecord]) -> str:
    """What the FIDs are: how many samples, which feature network, which data, which training steps."""
    parts = []
    for name, values in (
        ("data", {r.data for r in records}),
        ("FID samples", {r.fid_num_samples for r in records}),
        ("feature network", {r.feature_network for r in records}),
        ("training steps", {r.step for r in records}),
    ):
        values.discard(None)
        if values:
            parts.append(f"{name}: {', '.join(map(str, sorted(values)))}")
    return "; ".join(parts)


def table4_markdown(records: Sequence[RunRecord]) -> str:
    """Table 4 in markdown: a section per conditioning block; params as the range over patch sizes
    (they differ by the patch embedding and the final layer only)."""
    rows = table4_rows(records)
    patches = sorted({r.patch for r in records}, reverse=True)
    header = ["model", *[f"FID /{p}" for p in patches], *[f"Gflops /{p}" for p in patches], "params (M)"]
    text = []
    for block in dict.fromkeys(row["block"] for row in rows):
        lines = []
        for row in (row for row in rows if row["block"] == block):
            params = sorted(p for p in (row[f"params_m_p{p}"] for p in patches) if p is not None)
            low, high = f"{params[0]:.1f}", f"{params[-1]:.1f}"
            lines.append(
                [row["model"]]
                + [_fmt(row[f"fid_p{p}"], 2) for p in patches]
                + [_fmt(row[f"gflops_p{p}"], 2) for p in patches]
                + [low if low == high else f"{low}–{high}"]
            )
        text.append(f"### {BLOCK_NAMES.get(block, block)}\n\n{_markdown(header, lines)}")
    caption = fid_caption(records)
    return "\n".join(text) + (f"\n{caption}\n" if caption else "")


def block_markdown(records: Sequence[RunRecord]) -> str:
    """The block comparison in markdown (the paper's conditioning ablation)."""
    header = ["block", "model", "Gflops", "params (M)", "FID"]
    lines = [
        [
            BLOCK_NAMES.get(row["block"], row["block"]),
            f"{row['model'].removeprefix('DiT-')}/{row['patch']}",
            _fmt(row["gflops"], 2),
            _fmt(row["params_m"], 1),
            _fmt(row["fid"], 2),
        ]
        for row in block_rows(records)
    ]
    return _markdown(header, lines)


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)  # None is written as an empty cell
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- figures


def _new_figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
    return fig, fig.add_subplot()


def _log_x(ax: Any, values: list[float]) -> None:
    ax.set_xscale("log")
    if max(values) < 10 * min(values):  # no decade tick would fall inside: label a few round values
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))


def _styler(records: Sequence[RunRecord]) -> Any:
    """record -> (colour, marker): one per model size (fixed for the known sizes), as in the paper; one
    per conditioning block instead when the block varies."""
    if len({r.block for r in records}) > 1:  # block ranks 0..4 take styles 1..5 of the 7
        return lambda r: (COLOURS[block_rank(r.block)[0] + 1], MARKERS[block_rank(r.block)[0] + 1])
    unknown = sorted({r.model for r in records} - set(MODEL_ORDER))
    rank = {m: i for i, m in enumerate([*MODEL_ORDER, *unknown])}
    return lambda r: (COLOURS[rank[r.model] % len(COLOURS)], MARKERS[rank[r.model] % len(MARKERS)])


def _block_suffix(r: RunRecord, records: Sequence[RunRecord]) -> str:
    return f" {BLOCK_NAMES.get(r.block, r.block)}" if len({x.block for x in records}) > 1 else ""


def plot_fid_vs_gflops(records: Sequence[RunRecord]) -> Figure:
    """FID against forward Gflops (log x), as in the paper: one colour and marker per model size and a
    line through its patch sizes. When the block varies, one colour and marker per block."""
    scored = [r for r in records if r.fid is not None]
    if not scored:
        raise ValueError("no run has an FID yet, so there is nothing to plot against Gflops")
    style = _styler(scored)
    fig, ax = _new_figure()
    lines: dict[tuple[str, str], list[RunRecord]] = {}
    for r in sorted(scored, key=paper_order):
        lines.setdefault((r.block, r.model), []).append(r)
    for line in lines.values():
        line.sort(key=lambda r: r.gflops)
        colour, marker = style(line[0])
        label = line[0].model + _block_suffix(line[0], scored)
        ax.plot([r.gflops for r in line], [r.fid for r in line], color=colour, marker=marker, label=label)
        for r in line:
            ax.annotate(f"/{r.patch}", (r.gflops, r.fid), textcoords="offset points", xytext=(4, 4))
    _log_x(ax, [r.gflops for r in scored])
    ax.set_xlabel("Transformer Gflops (forward pass)")
    ax.set_ylabel(_fid_label(scored))
    ax.set_title("FID vs. Gflops")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def plot_fid_vs_compute(records: Sequence[RunRecord]) -> Figure:
    """FID against training compute (`train_compute_gflop` = Gflops × 3 × images seen, log x) along
    each run's FID history: one curve per run, colour by model size (or block), line style by patch."""
    curves = [r for r in records if r.fid_history]
    if not curves:
        raise ValueError("no run has an FID history (fid_history), so there is nothing to plot")
    style = _styler(curves)
    fig, ax = _new_figure()
    for r in sorted(curves, key=paper_order):
        colour, marker = style(r)
        ax.plot(
            [p["train_compute_gflop"] for p in r.fid_history],
            [p["fid"] for p in r.fid_history],
            color=colour,
            marker=marker,
            markersize=3,
            linestyle=PATCH_LINESTYLES.get(r.patch, "-."),
            label=r.label + _block_suffix(r, curves),
        )
    _log_x(ax, [p["train_compute_gflop"] for r in curves for p in r.fid_history])
    ax.set_xlabel("Training compute (Gflops)")
    ax.set_ylabel(_fid_label(curves))
    ax.set_title("FID vs. training compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncols=2)
    return fig


def _fid_label(records: Sequence[RunRecord]) -> str:
    counts = {r.fid_num_samples for r in records}
    if len(counts) == 1 and (n := counts.pop()):
        return f"FID-{n // 1000}K" if n % 1000 == 0 else f"FID ({n} samples)"
    return "FID"


# ---------------------------------------------------------------------------------------------- report


def _write_atomic(path: Path, write: Any) -> Path:
    """`write(file)` into a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_text(path: Path, text: str) -> Path:
    return _write_atomic(path, lambda f: f.write(text.encode()))


def _write_png(path: Path, fig: Figure) -> Path:
    return _write_atomic(path, lambda f: fig.savefig(f, format="png"))


def write_report(records: Sequence[RunRecord], out: str | Path) -> dict[str, Path]:
    """Writes the tables and figures (see the module docstring) into `out`; returns them by name. A
    figure that has nothing to show (no FID yet) is left out, and said so."""
    if not records:
        raise ValueError("no run records to report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "table4.md": _write_text(out / "table4.md", table4_markdown(records)),
        "table4.csv": _write_text(out / "table4.csv", _csv(table4_rows(records))),
    }
    if len({r.block for r in records}) > 1:
        written["blocks.md"] = _write_text(out / "blocks.md", block_markdown(records))
        written["blocks.csv"] = _write_text(out / "blocks.csv", _csv(block_rows(records)))
    if any(r.fid is not None for r in records):
        written["fid_vs_gflops.png"] = _write_png(out / "fid_vs_gflops.png", plot_fid_vs_gflops(records))
    else:
        print("[ditlab] no run has an FID yet: fid_vs_gflops.png left out")
    if any(r.fid_history for r in records):
        written["fid_vs_compute.png"] = _write_png(out / "fid_vs_compute.png", plot_fid_vs_compute(records))
    else:
        print("[ditlab] no run has an FID history: fid_vs_compute.png left out")
    return written


def log_to_wandb(records: Sequence[RunRecord], written: dict[str, Path], *, group: str | None = None) -> str:
    """Logs a report run to W&B: a `wandb.Table` of the runs, a scatter of FID against Gflops and the
    figures. The project and entity are those of the training runs (else `ditlab`); offline without a
    W&B login (then `wandb sync` it later). Returns the run's folder."""
    import wandb

    projects = {(r.wandb or {}).get("project") for r in records} - {None}
    entities = {(r.wandb or {}).get("entity") for r in records} - {None}
    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        from ditlab.training.run import wandb_logged_in  # torch and Lightning: only when needed

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
    columns = ["run_name", "block", "model", "patch", "gflops", "params_m", "fid", "train_compute_gflop"]
    table = wandb.Table(columns=columns, data=[[getattr(r, c) for c in columns] for r in records])
    logged: dict[str, Any] = {
        "runs": table,
        "fid_vs_gflops_scatter": wandb.plot.scatter(table, "gflops", "fid", title="FID vs. Gflops"),
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


# ------------------------------------------------------------------------------------------ command line


@dataclass
class ReportConfig:
    runs: Any = None  # sweep folder(s), searched recursively: runs=multirun/<time> or runs=[a,b]
    wandb: str | None = None  # entity/project: read the runs from W&B instead (network)
    wandb_group: str | None = None  # with wandb=: one sweep (its group is the multirun folder's name)
    out: str | None = None  # the report folder; default reports/<time>
    log_wandb: bool = False  # also log a report run (table, scatter, figures) to W&B; offline without login


def run_report(args: DictConfig) -> dict[str, Path]:
    """The body of `src/report.py`: `args` are its key=value arguments (see `ReportConfig`)."""
    cfg: ReportConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ReportConfig), args))
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
        log_to_wandb(records, written, group=group)
    return written


def main(argv: list[str]) -> None:
    """`src/report.py key=value ...`: bad arguments end with one line and exit status 2."""
    try:
        args = OmegaConf.from_cli(argv)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or error  # the YAML parser's one-line reason
        print(f"error: cannot parse the arguments {argv}: {problem}", file=sys.stderr)
        sys.exit(2)
    run_cli(run_report, args)
