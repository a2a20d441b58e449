"""Run records (`results.json`, or a W&B run) and their aggregation over seeds into design-space points."""

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ditlab.design import default_axes
from ditlab.models import BLOCKS, DIT_SIZES
from ditlab.sweep import read_outcome

RECORD_FILE = "results.json"
# Paper order, from the registries: sizes from small to large (by depth × width²), blocks in the order the
# paper lists them (their registration order), patches from coarse to fine (Gflops increasing along a row).
MODEL_ORDER = tuple(
    sorted(DIT_SIZES, key=lambda name: DIT_SIZES[name].depth * DIT_SIZES[name].hidden_size ** 2)
)
BLOCK_ORDER = tuple(BLOCKS)
# What a record says about how its run was trained and scored besides its point and seed (the keys of
# results.json that RunRecord and FIDMonitor write; the model's config under its own keys: depth,
# hidden_size, num_heads, ...). Runs of one point are averaged as seeds only when these agree; a key that a
# record lacks (written before the key was, or a run without an FID yet) tells nothing either way.
SETTINGS = (
    "step",
    "images_seen",  # at equal steps: the batch size
    "precision",
    "lr",
    "ema_decay",
    "params_m",  # the size, for records from before `model_config`
    "model_config",
    "fid_num_samples",
    "fid_sampler",  # "<sampler> <steps> steps, cfg <scale>[, guide <w> <its file>]"
    "fid_reference",
    "fid_reference_images",
    "fid_labels",  # uniform | balanced: the label protocol
    "fid_seeds",  # the sampling seeds an FID averages
    "feature_network",
)
BLOCK_NAMES = {
    "in_context": "in-context",
    "cross_attention": "cross-attention",
    "adaln": "adaLN",
    "adaln_zero": "adaLN-Zero",
}


@dataclass(frozen=True)
class RunResult:
    """One training run: its point in the design space, its seed and what it measured.

    `fid_history` holds dicts with at least `train_compute_gflop` (forward Gflops × 3 × images seen)
    and `fid` (and, in newer records, `nfe`), in training order. `nfe`: the network evaluations per image
    its FID cost (a guided step counts 2).
    """

    run_name: str
    block: str
    model: str
    patch: int
    seed: int | None
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
    axes: tuple[
        tuple[str, Any], ...
    ] = ()  # the coordinates beyond (block, model, patch) off their paper values
    settings: tuple[tuple[str, Any], ...] = ()  # the SETTINGS it records (model_config's keys flattened)
    precision: str | None = None  # as trained ("bf16-mixed", "32-true"); None in records from before it
    device: str | None = None  # the GPU's or CPU's name; None in records from before it
    nfe: float | None = None  # network evaluations per image of its FID; None in records from before it
    fid_std: float | None = None  # the FID's spread over its sampling seeds (callbacks.fid.seeds); None: one
    fd_dinov2: float | None = None  # FD-DINOv2 of the FID's samples (mean over sampling seeds); None: none
    fd_dinov2_std: float | None = None

    @property
    def point(self) -> tuple:
        return (self.block, self.model, self.patch, self.axes)

    @property
    def label(self) -> str:
        """The paper's short name, e.g. "XL/2", then the axes off the paper's values, e.g.
        "XL/2 objective=sit_linear, mlp=swiglu"."""
        label = f"{self.model.removeprefix('DiT-')}/{self.patch}"
        return label + (" " + ", ".join(f"{k}={v}" for k, v in self.axes) if self.axes else "")


@dataclass(frozen=True)
class Spread:
    """A quantity over the seeds of one point: mean, min, max, and the per-seed values."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def n(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class PointResult:
    """One point of the design space (block, model, patch) over its runs (seeds), alike in their settings.

    `fid` is the spread of the runs' final FIDs (None when no run has one); `fid_history` holds one entry
    per training compute value that every run with a history reached: `train_compute_gflop`, `step` and
    the FID spread there. `variant` holds, when runs of the point differ in their settings, this row's
    values of the settings that differ (None: not recorded), e.g. (("step", 1000),).
    """

    runs: tuple[RunResult, ...]
    fid: Spread | None
    fid_history: tuple[dict[str, Any], ...]
    variant: tuple[tuple[str, Any], ...] = ()
    fd_dinov2: Spread | None = None  # the runs' FD-DINOv2, as `fid`

    block = property(lambda self: self.runs[0].block)
    model = property(lambda self: self.runs[0].model)
    patch = property(lambda self: self.runs[0].patch)
    axes = property(lambda self: self.runs[0].axes)
    gflops = property(lambda self: self.runs[0].gflops)
    params_m = property(lambda self: self.runs[0].params_m)

    @property
    def label(self) -> str:
        """The runs' label, then the settings that set this row apart, e.g. "Ti/4 [step=1000]"."""
        return self.runs[0].label + variant_suffix(self.variant)

    @property
    def seeds(self) -> tuple[int | None, ...]:
        return tuple(r.seed for r in self.runs)


def _number(value: Any, what: str, source: str, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{source}: {what} must be a finite number, got {value!r}")
    return float(value)


def variant_text(variant: tuple[tuple[str, Any], ...]) -> str:
    """ "step=1000, depth=2"; "—" for a value the record does not hold."""
    return ", ".join(f"{k}={'—' if v is None else v}" for k, v in variant)


def variant_suffix(variant: tuple[tuple[str, Any], ...]) -> str:
    """What a row's name gets: " [step=1000, depth=2]", or "" for the only row of its point."""
    return f" [{variant_text(variant)}]" if variant else ""


def _settings(data: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The SETTINGS a results.json document holds, model_config's keys in its place; lists as tuples."""
    found = []
    for key in SETTINGS:
        value = data.get(key)
        items = sorted(value.items()) if key == "model_config" and isinstance(value, dict) else [(key, value)]
        found += [(k, tuple(v) if isinstance(v, list) else v) for k, v in items if v is not None]
    return tuple(found)


def parse_record(data: dict[str, Any], source: str) -> RunResult:
    """Validates one `results.json` document (see `ditlab.report`) into a `RunResult`."""
    required = ("run_name", "coordinates", "gflops", "params_m")
    missing = [key for key in required if key not in data]
    coordinates = data.get("coordinates") or {}
    missing += [f"coordinates.{key}" for key in ("block", "model", "patch") if key not in coordinates]
    if missing:
        raise ValueError(
            f"{source}: missing {', '.join(missing)}; a run record is the results.json that src/train.py "
            "writes (run_name, coordinates {block, model, patch}, seed, gflops, params_m, fid, fid_history)"
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
    seed = data.get("seed")
    fid_sampler = data.get("fid_sampler")
    if "sampler" not in coordinates and isinstance(fid_sampler, str) and fid_sampler.split():
        # Records written before the FID's sampler became a coordinate name it in `fid_sampler`
        # ("euler 50 steps, cfg 1.0").
        coordinates = {**coordinates, "sampler": fid_sampler.split()[0]}
    # The axes' paper values as the run knew them (a user's axes included), else this process's.
    defaults = data.get("axis_defaults") or default_axes()
    axes = tuple(
        (key, coordinates[key])
        for key in defaults
        if key in coordinates and coordinates[key] != defaults[key]
    )
    return RunResult(
        run_name=str(data["run_name"]),
        block=str(coordinates["block"]),
        model=str(coordinates["model"]),
        patch=int(coordinates["patch"]),
        seed=None if seed is None else int(seed),
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
        axes=axes,
        settings=_settings(data),
        precision=data.get("precision"),
        device=data.get("device"),
        nfe=_number(data.get("fid_nfe"), "fid_nfe", source, optional=True),
        **{
            key: _number(data.get(key), key, source, optional=True)
            for key in ("fid_std", "fd_dinov2", "fd_dinov2_std")
        },
    )


def model_rank(model: str) -> tuple[int, str]:
    return (MODEL_ORDER.index(model), "") if model in MODEL_ORDER else (len(MODEL_ORDER), model)


def block_rank(block: str) -> tuple[int, str]:
    return (BLOCK_ORDER.index(block), "") if block in BLOCK_ORDER else (len(BLOCK_ORDER), block)


def paper_order(record: RunResult | PointResult) -> tuple:
    """Sort key: block, then model size small to large, then patch coarse to fine."""
    return (block_rank(record.block), model_rank(record.model), -record.patch)


def alike(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two runs' settings agree wherever both record them."""
    return all(a[key] == b[key] for key in a.keys() & b.keys())


def _check_consistent(records: list[RunResult]) -> list[RunResult]:
    seen: dict[tuple, list[RunResult]] = {}
    for record in records:
        same = seen.setdefault((*record.point, record.seed), [])
        twin = next((r for r in same if alike(dict(r.settings), dict(record.settings))), None)
        if twin is not None:
            seed = f" with seed {record.seed}" if record.seed is not None else ""
            raise ValueError(
                f"two runs of {record.run_name}{seed}: {twin.source} and {record.source}; a table holds one "
                "run per point, settings and seed, so pass the folders of one campaign only (runs=[folder,...])"
            )
        same.append(record)
    datasets = sorted({r.data for r in records if r.data})
    if len(datasets) > 1:
        raise ValueError(
            f"the runs were trained on different data ({', '.join(datasets)}); FIDs on different data do "
            "not share a table: report each campaign separately"
        )
    return sorted(records, key=lambda r: (paper_order(r), r.seed if r.seed is not None else -1))


def load_records(runs: str | Path | Sequence[str | Path]) -> list[RunResult]:
    """Reads every `results.json` under the given sweep folders (searched recursively; a path may also be
    a results.json itself), in paper order, skipping (and listing) the runs whose sweep job failed
    (`ditlab.sweep`). Raises FileNotFoundError when there are none."""
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
    failed = {file: read_outcome(file.parent) for file in files}
    failed = {file: o for file, o in failed.items() if o is not None and o.get("status") != "done"}
    if failed:  # a sweep's job that failed part-way may have left a results.json without its FID
        print(f"[ditlab] skipped {len(failed)} failed run(s) of the sweep:")
        for file, outcome in failed.items():
            print(f"  {file.parent}: {outcome.get('error') or outcome.get('status')}")
    for file in (f for f in files if f not in failed):
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{file} is not valid JSON ({error}); was it written by src/train.py?"
            ) from error
        records.append(parse_record(data, str(file)))
    return _check_consistent(records)


def wandb_document(
    config: dict[str, Any], summary: Any, history: list[dict[str, Any]], run: Any
) -> dict | None:
    """A results.json document from a W&B training run: its config is the composed training config
    (`block.name`, `model.name`, `patch`, `seed`, `data._target_`), its summary holds `gflops`,
    `params_m`, `fid`, `train_compute_gflop`; None for runs that are not training runs (a report run, or
    one that ended before it logged Gflops)."""
    block, model = (config.get("block") or {}).get("name"), (config.get("model") or {}).get("name")
    patch = config.get("patch")
    if isinstance(patch, dict):  # runs from before `patch` became a plain value (a config group then)
        patch = patch.get("size")
    if None in (block, model, patch) or summary.get("gflops") is None:
        return None
    if not history and summary.get("fid") is not None and summary.get("train_compute_gflop"):
        history = [{"train_compute_gflop": summary["train_compute_gflop"], "fid": summary["fid"]}]
    data_target = (config.get("data") or {}).get("_target_")
    return {
        "run_name": run.name,
        # all the axes when the run logged them (`coordinates`), else the paper's three from its config
        "coordinates": config.get("coordinates") or {"block": block, "model": model, "patch": patch},
        "seed": config.get("seed"),
        "gflops": summary.get("gflops"),
        "params_m": summary.get("params_m"),
        "fid": summary.get("fid"),
        "step": summary.get("trainer/global_step"),
        "train_compute_gflop": summary.get("train_compute_gflop"),
        "fid_num_samples": summary.get("fid_num_samples"),
        "fid_nfe": summary.get("fid_nfe"),
        **{key: summary.get(key) for key in ("fid_std", "fd_dinov2", "fd_dinov2_std", "fid_labels")},
        "feature_network": summary.get("feature_network"),
        "precision": (config.get("trainer") or {}).get("precision"),
        "lr": (config.get("optim") or {}).get("lr"),
        "ema_decay": (config.get("optim") or {}).get("ema_decay"),
        "data": data_target.rsplit(".", 1)[-1] if data_target else None,
        "wandb": {"project": run.project, "entity": run.entity, "id": run.id},
        "fid_history": history,
    }


def load_wandb_records(project: str, group: str | None = None) -> list[RunResult]:
    """Reads the training runs of the W&B project `entity/project` (optionally one group, i.e. one sweep):
    coordinates and seed from the run config, `gflops`, `params_m`, `fid`, `train_compute_gflop` from the
    summary, and the FID curve from the logged `train_compute_gflop` and `fid` history. Needs network access."""
    import wandb

    if project.count("/") != 1:
        raise ValueError(f"wandb={project}: give the project as entity/project, e.g. wandb=my-team/ditlab")
    runs = wandb.Api().runs(project, filters={"group": group} if group else None)
    records, skipped = [], []
    for run in runs:
        history = [
            {"train_compute_gflop": row["train_compute_gflop"], "fid": row["fid"]}
            for row in run.scan_history(keys=["train_compute_gflop", "fid"])
        ]
        document = wandb_document(run.config, run.summary, history, run)
        if document is None:
            skipped.append(run.name)
            continue
        records.append(parse_record(document, "/".join(run.path)))
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


def _alike_groups(records: list[RunResult]) -> list[tuple[dict[str, Any], list[RunResult]]]:
    """The runs of one point split into groups alike in their settings (`alike`), each with the settings
    its runs record; a run that records less joins the first group it agrees with. Runs in record order."""
    groups: list[tuple[dict[str, Any], list[tuple[int, RunResult]]]] = []
    for i, r in sorted(enumerate(records), key=lambda ir: -len(ir[1].settings)):
        settings = dict(r.settings)
        group = next((g for g in groups if alike(g[0], settings)), None)
        if group is None:
            groups.append((settings, [(i, r)]))
        else:
            group[0].update(settings)
            group[1].append((i, r))
    return [(settings, [r for _, r in sorted(runs, key=lambda ir: ir[0])]) for settings, runs in groups]


def group_points(records: Iterable[RunResult]) -> list[PointResult]:
    """The runs grouped by design-space point over seeds, in paper order: one group per point, or, where
    runs of a point differ in their settings (steps, model config, FID protocol, ...: SETTINGS), one per
    set of alike runs, with the settings that differ as its `variant`."""
    by_point: dict[tuple, list[RunResult]] = {}
    for r in records:
        by_point.setdefault(r.point, []).append(r)
    groups = []
    for point_runs in by_point.values():
        split = _alike_groups(point_runs)
        differ = [
            key
            for key in dict.fromkeys(k for settings, _ in split for k in settings)
            if len({settings[key] for settings, _ in split if key in settings}) > 1
        ]
        groups += [(tuple((k, settings.get(k)) for k in differ), runs) for settings, runs in split]
    points = []
    for variant, runs in groups:
        fids = tuple(r.fid for r in runs if r.fid is not None)
        with_history = [r for r in runs if r.fid_history]
        history = []
        if with_history:
            # The compute values every run reached (the seeds of a point share them: same steps, same batch).
            common = set.intersection(
                *({p["train_compute_gflop"] for p in r.fid_history} for r in with_history)
            )
            for compute in sorted(common):
                at = [
                    next(p for p in r.fid_history if p["train_compute_gflop"] == compute)
                    for r in with_history
                ]
                history.append(
                    {
                        "train_compute_gflop": compute,
                        "step": at[0].get("step"),
                        "fid": Spread(tuple(p["fid"] for p in at)),
                    }
                )
        fds = tuple(r.fd_dinov2 for r in runs if r.fd_dinov2 is not None)
        fid, fd = Spread(fids) if fids else None, Spread(fds) if fds else None
        points.append(PointResult(tuple(runs), fid, tuple(history), variant, fd))
    return sorted(points, key=paper_order)
