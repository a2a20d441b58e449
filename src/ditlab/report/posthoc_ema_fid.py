"""FID against σ_rel of post-hoc EMA reconstructions: the `fid=true` part of `src/posthoc_ema.py`.

Each reconstructed checkpoint, and the run's classic EMA (`<run>/checkpoints/last.ckpt`, the baseline), is
scored as the run's FID callback (`callbacks.fid`) scored it: its sampler with its options and steps, its
guidance (cfg_scale, cfg_interval, autoguidance), its label sampling and num_samples (or `num_samples`),
against its own reference (`callbacks.fid.reference`, else `num_reference_images` of its datamodule's
validation images, cached as in training), once per sampling seed of `seeds`. The scoring is
`src/fid_nfe.py`'s (`ditlab.report.fid_nfe`: sample.py's `ImageSampler`, the TF Inception, the NFE counted as
the network runs). A point that fails is skipped with one line and the others go on. Writes into the
output folder `posthoc_ema_fid.json` (every point's FID per seed, NFE, checkpoint and its sha256; the
settings; how it was made), `posthoc_ema_fid.md` (the table) and `fid_vs_sigma_rel.png`, and with
`save_samples=true` each point's samples, `samples/<checkpoint name>_seed<s>.npz` (`arr_0` images, `arr_1`
labels, as the FID callback's `save_samples` writes them: `experiments/class_accuracy.py --samples` reads
them).
"""

import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ditlab.cli import error_line, resolve_device
from ditlab.diffusion.labels import check_label_sampling
from ditlab.diffusion.sampling import SamplingSpec, guide_options
from ditlab.interop.checkpoints import load_dit, load_guide
from ditlab.interop.formats import describe
from ditlab.io import atomic_write, atomic_write_text, content_sha256
from ditlab.metrics.features import InceptionFeatures
from ditlab.provenance import describe_device, git_state, versions
from ditlab.report.fid_nfe import fid_callback, fid_point, run_config, run_reference, summarize
from ditlab.report.figures import plot_fid_vs_sigma_rel
from ditlab.report.records import Spread
from ditlab.report.tables import fid_cell, markdown_table
from ditlab.training.posthoc_ema import run_posthoc_ema

JSON_FILE, TABLE_FILE, FIGURE_FILE = "posthoc_ema_fid.json", "posthoc_ema_fid.md", "fid_vs_sigma_rel.png"


def run_posthoc_ema_command(cfg: DictConfig) -> dict[float, Path]:
    """The body of `src/posthoc_ema.py` (options: conf/posthoc_ema.yaml): the reconstructions
    (`ditlab.training.posthoc_ema.run_posthoc_ema`), and with `cfg.fid` each scored beside the run's classic
    EMA, FID against σ_rel written into the same folder. Returns {σ_rel: the checkpoint's path}."""
    if not isinstance(cfg.fid, bool):
        raise ValueError(f"fid={cfg.fid} must be true or false")
    if cfg.save_samples is True and not cfg.fid:
        raise ValueError("save_samples=true keeps the samples of the FID: set fid=true too")
    scoring = check_fid(cfg) if cfg.fid else None  # before any checkpoint is written
    written = run_posthoc_ema(cfg)
    if scoring is not None:
        first = load_dit(next(iter(written.values())))
        out = next(iter(written.values())).parent
        score_posthoc_ema(scoring, written, out, first.step, first.model.config)
    return written


@dataclass(frozen=True)
class FIDScoring:
    """What `fid=true` scores with (`check_fid`): the run's FID settings (`fid`, its `callbacks.fid` node)
    as a sampling spec, the seeds, the images per seed, the classic EMA's checkpoint and its decay."""

    run: Path
    fid: dict[str, Any]
    spec: SamplingSpec
    seeds: list[int]
    num_samples: int
    save_samples: bool
    device: torch.device
    baseline: Path
    ema_decay: float | None


def check_fid(cfg: DictConfig) -> FIDScoring:
    """The scoring `fid=true` asks for: the run's FID settings with `cfg`'s seeds, num_samples,
    save_samples, precision and device. ValueError naming the key, before any checkpoint is written."""
    run = Path(cfg.run)
    seeds = OmegaConf.to_container(cfg.seeds) if isinstance(cfg.seeds, ListConfig) else [cfg.seeds]
    # Distinct: each seed's FID is kept under its name.
    if (
        not seeds
        or len(set(seeds)) != len(seeds)
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)
    ):
        raise ValueError(f"seeds={seeds} must be a list of distinct integers ≥ 0, e.g. seeds=[0,1]")
    if not isinstance(cfg.save_samples, bool):
        raise ValueError(f"save_samples={cfg.save_samples} must be true or false")
    if not any((run / name).is_file() for name in ("results.json", ".hydra/config.yaml")):
        raise ValueError(
            f"fid=true scores with the run's FID settings, but run={run} has neither results.json nor "
            ".hydra/config.yaml (the training run's output folder)"
        )
    config = run_config(run)
    fid = fid_callback(config)
    if not fid:
        raise ValueError(
            f"fid=true scores with the run's FID settings, but run={run} trained without them "
            "(~callbacks.fid): score its checkpoints with src/fid_nfe.py and ref=<reference images>"
        )
    baseline = run / "checkpoints" / "last.ckpt"
    if not baseline.is_file():
        raise ValueError(f"fid=true scores the run's classic EMA beside, but {baseline} does not exist")
    num_samples = fid.get("num_samples", 1000) if cfg.num_samples is None else cfg.num_samples
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(
            f"num_samples={num_samples} must be an integer ≥ 2 (null: the run's callbacks.fid.num_samples)"
        )
    spec = SamplingSpec(
        fid.get("sampler", "ddim"),
        fid.get("sampler_options"),
        fid.get("steps", 50),
        fid.get("cfg_scale", 1.0),
        fid.get("cfg_interval"),
        **guide_options(fid.get("guide"), "callbacks.fid.guide"),
        key="callbacks.fid.",
    )
    check_label_sampling(fid.get("labels", "uniform"), "callbacks.fid.labels")
    return FIDScoring(
        run=run,
        fid=fid,
        spec=replace(spec, precision=cfg.precision, key=""),  # a bad precision names `precision`
        seeds=seeds,
        num_samples=num_samples,
        save_samples=cfg.save_samples,
        device=resolve_device(cfg.device),
        baseline=baseline,
        ema_decay=(config.get("optim") or {}).get("ema_decay"),
    )


def samples_file(out: Path, stem: str, seed: int) -> Path:
    """Where the samples of the checkpoint `<stem>.ckpt` and sampling seed `seed` go (`save_samples=true`)."""
    return out / "samples" / f"{stem}_seed{seed}.npz"


def score_posthoc_ema(
    scoring: FIDScoring, checkpoints: dict[float, Path], out: Path, step: int, model_config: dict[str, Any]
) -> dict[str, Path]:
    """The FID of the classic EMA and of each reconstruction (`checkpoints`: σ_rel -> checkpoint of step
    `step`); writes the table, the figure and the JSON into `out`. Returns the paths written (`json`, `md`,
    and `png` when a reconstruction was scored)."""
    fid, spec, device = scoring.fid, scoring.spec, scoring.device
    batch_size, labels = fid.get("batch_size", 100), fid.get("labels", "uniform")
    net = InceptionFeatures(fid.get("inception")).to(device)
    reference, cache_dir = run_reference(scoring.run, net, device, batch_size)
    decay = "" if scoring.ema_decay is None else f" (ema_decay={scoring.ema_decay:g})"
    targets = [(f"classic EMA{decay}", None, scoring.baseline)]
    targets += [(f"σ_rel={sigma_rel:g}", sigma_rel, path) for sigma_rel, path in checkpoints.items()]
    print(
        f"FID of {scoring.num_samples} samples × {len(scoring.seeds)} seed(s), {spec.summary()}, against "
        f"{reference.source}; {device}"
    )

    points: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    autoencoder, guide = None, None  # one run: built once, from the first checkpoint
    for label, sigma_rel, path in targets:
        where = {"label": label, "sigma_rel": sigma_rel, "checkpoint": str(path)}
        kept = partial(samples_file, out, path.stem) if scoring.save_samples else None
        try:
            loaded = load_dit(path)
            if autoencoder is None:
                autoencoder = loaded.build_autoencoder().to(device)
            if spec.guide is not None and guide is None:
                guide = load_guide(
                    spec.guide,
                    loaded.model.config,
                    loaded.diffusion,
                    map_location=device,
                    key="callbacks.fid.guide.ckpt",
                    autoencoder=loaded.autoencoder,
                )
            point = (
                where
                | {"checkpoint_sha256": content_sha256(path), "step": loaded.step}
                | fid_point(
                    loaded,
                    spec,
                    scoring.seeds,
                    scoring.num_samples,
                    batch_size,
                    net,
                    reference,
                    device,
                    autoencoder,
                    guide,
                    labels=labels,
                    samples=kept,
                )
            )
        except Exception as error:  # a failing point is reported and skipped: the others go on
            line = error_line(error)
            print(f"skipped {label}: {line}")
            skipped.append(where | {"error": line})
            continue
        if kept is not None:
            point["samples"] = [str(kept(seed)) for seed in scoring.seeds]
        points.append(point)
        spread = f" ± {point['fid_std']:.2f}" if point["fid_std"] is not None else ""
        print(
            f"{label} (step {point['step']}): FID {point['fid']:.2f}{spread}, NFE {point['nfe']:g} "
            f"({point['seconds']:.0f} s)",
            flush=True,
        )

    document = {
        "run": str(scoring.run),
        "step": step,  # the reconstructions'; each point records its checkpoint's
        "model": describe(model_config),
        **{k: v for k, v in spec.as_record().items() if k != "seed"},  # the run's FID sampling
        "labels": labels,
        "batch_size": batch_size,
        "num_samples": scoring.num_samples,
        "seeds": scoring.seeds,
        "reference": reference.source,
        "reference_images": reference.num_images,
        "reference_cache": str(cache_dir),
        "feature_network": net.identity,
        "points": points,
        "skipped": skipped,
        "device": describe_device(device),
        "git": git_state(),
        "versions": versions(),
    }
    title = f"{describe(model_config)}, step {step}, {spec.summary()}"
    written = {
        "json": atomic_write_text(out / JSON_FILE, json.dumps(document, indent=1) + "\n"),
        "md": atomic_write_text(out / TABLE_FILE, fid_markdown(document, title)),
    }
    reconstructions = [p for p in points if p["sigma_rel"] is not None]
    if reconstructions:
        baseline = next((p for p in points if p["sigma_rel"] is None), None)
        label = f"FID ({scoring.num_samples} samples)"
        figure = plot_fid_vs_sigma_rel(reconstructions, baseline, title=title, fid_label=label)
        written["png"] = atomic_write(out / FIGURE_FILE, lambda f: figure.savefig(f, format="png"))
    return summarize(points, skipped, written, lambda p: f"{p['label']:<32}")


def fid_markdown(document: dict[str, Any], title: str) -> str:
    """`posthoc_ema_fid.md`: one row per point (the classic EMA first), FID as mean (min–max) over the seeds."""
    header = ["EMA", "FID", "FID std", "NFE", "step", "checkpoint"]
    lines = [
        [
            p["label"],
            fid_cell(Spread(tuple(p["fid_per_seed"].values()))),
            "—" if p["fid_std"] is None else f"{p['fid_std']:.2f}",
            f"{p['nfe']:g}",
            str(p["step"]),
            Path(p["checkpoint"]).name,
        ]
        for p in document["points"]
    ]
    seeds = ", ".join(map(str, document["seeds"]))
    text = [
        f"# FID against σ_rel: {title}\n",
        f"{document['num_samples']} samples per point and sampling seed (seeds {seeds}; {document['labels']} "
        f"labels) against {document['reference']}, {document['feature_network']}.\n",
        markdown_table(header, lines),
    ]
    text += [f"Skipped {p['label']}: {p['error']}\n" for p in document["skipped"]]
    return "\n".join(text)
