"""All sample metrics of the paper (FID, sFID, Inception Score, precision, recall) for an `.npz` of samples,
and FD-DINOv2 beside FID.

The samples go through the feature network once; the pool features feed FID, precision/recall and the
Inception Score logits, the spatial features sFID; with a DINOv2 network (`ditlab.metrics.dinov2`) the same
batches give FD-DINOv2. `evaluate_samples` returns a flat dict, `format_metrics` prints it as a table and
`write_metrics_json` stores it next to the samples; several sample sets of one model (one per sampling
seed) give their mean, standard deviation and per-set values (`summarize_sample_sets`). `run_evaluate` is
the body of `src/evaluate.py`.
"""

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from ditlab.cli import resolve_device
from ditlab.io import atomic_write_text
from ditlab.metrics.dinov2 import DINOV2_ENCODER, fd_dinov2_network, parse_fd_dinov2
from ditlab.metrics.features import FC_WEIGHTS_FILE, InceptionFeatures
from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric
from ditlab.metrics.image_sources import iter_npz_images, npz_image_shape
from ditlab.metrics.inception_score import inception_score
from ditlab.metrics.precision_recall import precision_recall
from ditlab.metrics.reference import ReferenceStats, load_reference

METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def sampling_record(samples: str | Path) -> dict[str, Any]:
    """How `samples` were made, from the `<stem>.json` that `sample.py` writes beside them: `nfe` (network
    evaluations per image) and `sampling` (sampler, steps, guidance, seed); {} for other files."""
    path = Path(samples).with_suffix(".json")
    try:
        job = json.loads(path.read_text())
    except (OSError, ValueError):  # no job record (samples made elsewhere), or not one
        return {}
    if not isinstance(job, dict):
        return {}
    keys = ("sampler", "sampler_options", "steps", "cfg_scale", "cfg_interval", "guidance_channels", "seed")
    keys += ("precision", "guide", "guide_scale")
    return {"nfe": job.get("nfe"), "sampling": {k: job[k] for k in keys if k in job}}


@torch.no_grad()
def evaluate_samples(
    samples: str | Path,
    reference: ReferenceStats,
    net: nn.Module,
    *,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    k: int = 3,
    dinov2: nn.Module | None = None,
    dinov2_reference: ReferenceStats | None = None,
) -> dict[str, Any]:
    """FID, sFID, IS, precision and recall of the uint8 images `arr_0` (N×H×W×3) of `samples` against `reference`.

    `net` (moved to `device`) is an `InceptionFeatures` or anything with its `features` and `identity`.
    A metric the inputs cannot give (IS without classifier weights, sFID or precision/recall without
    spatial statistics or reference features) is None, with the reason in `notes`. With `dinov2` (a
    `DINOv2Features`) and its `dinov2_reference`, `fd_dinov2` is computed in the same pass over the images.
    """
    samples = Path(samples)
    num_samples = npz_image_shape(samples)[0]
    if num_samples < 2:
        raise ValueError(f"{samples} holds {num_samples} image(s); FID needs at least 2.")
    net.to(device)
    ref = reference
    fid = frechet_metric(PrecomputedFeatures(len(ref.mu)), ref.mu, ref.sigma, ref.num_images).to(device)
    sfid = None
    if ref.mu_s is not None and ref.sigma_s is not None:
        spatial = PrecomputedFeatures(len(ref.mu_s))
        sfid = frechet_metric(spatial, ref.mu_s, ref.sigma_s, ref.num_images).to(device)
    fd = None
    if dinov2 is not None:
        if dinov2_reference is None:
            raise ValueError(
                "FD-DINOv2 needs the reference statistics of the DINOv2 network (dinov2_reference)"
            )
        dinov2.to(device)
        dref = dinov2_reference
        fd = frechet_metric(PrecomputedFeatures(len(dref.mu)), dref.mu, dref.sigma, dref.num_images).to(
            device
        )
    pool, logits = [], []
    num_batches = math.ceil(num_samples / batch_size)
    for images in tqdm(iter_npz_images(samples, batch_size), "sample features", num_batches, disable=None):
        if fd is not None:
            fd.update(dinov2.features(images.to(device))["pool"], real=False)
        features = net.features(images.to(device))
        fid.update(features["pool"], real=False)
        if sfid is not None:
            sfid.update(features["spatial"], real=False)
        pool.append(features["pool"])
        if "logits" in features:
            logits.append(features["logits"])

    results: dict[str, Any] = {
        "samples": str(samples),
        "num_samples": num_samples,
        "reference": reference.source,
        "num_reference_images": reference.num_images,
        "feature_network": net.identity,
        "reference_network": reference.network,
        **dict.fromkeys(METRICS),
        "notes": [],
    }
    results |= sampling_record(samples)
    results["fid"] = fid.compute().item()
    if fd is not None:
        results |= {
            "fd_dinov2": fd.compute().item(),
            "fd_dinov2_network": dinov2.identity,
            "fd_dinov2_reference": dinov2_reference.source,
            "fd_dinov2_reference_images": dinov2_reference.num_images,
        }
    if sfid is not None:
        results["sfid"] = sfid.compute().item()
    else:
        results["notes"].append("sFID: the reference has no spatial statistics (mu_s, sigma_s).")
    if logits:
        results["inception_score"] = inception_score(torch.cat(logits))
    else:
        results["notes"].append(
            f"Inception Score: needs the Inception classifier weights {FC_WEIGHTS_FILE} "
            "(InceptionFeatures(fc_weights_path=...), or inception_fc_weights=... on the command line)."
        )
    if reference.pool_features is not None:
        real = torch.from_numpy(reference.pool_features).to(device)
        results["precision"], results["recall"] = precision_recall(real, torch.cat(pool).float(), k=k)
    else:
        results["notes"].append(
            "Precision/recall: the reference has no images (arr_0) to build its manifold from."
        )
    return results


def format_metrics(results: dict[str, Any]) -> str:
    """A plain-text table of `evaluate_samples`' results."""
    names = {"fid": "FID", "sfid": "sFID", "inception_score": "Inception Score", "precision": "precision"}
    lines = [
        f"samples          {results['samples']} ({results['num_samples']} images)",
        f"reference        {results['reference']} ({results['num_reference_images'] or 'unknown number of'} images)",
        f"feature network  {results['feature_network']}",
    ]
    if results["reference_network"] != results["feature_network"]:
        lines.append(f"reference stats  {results['reference_network']}")
    if "fd_dinov2_network" in results:
        lines.append(f"FD-DINOv2 network {results['fd_dinov2_network']}")
    lines.append("-" * 40)
    for key in METRICS:
        value = results[key]
        lines.append(f"{names.get(key, key):<16} {'n/a' if value is None else f'{value:.4f}'}")
        if key == "fid" and "fd_dinov2" in results:
            lines.append(f"{'FD-DINOv2':<16} {results['fd_dinov2']:.4f}")
    if results.get("nfe") is not None:  # from sample.py's job record
        lines.append(f"{'NFE':<16} {results['nfe']:.1f} network evaluations per image")
    lines += [f"note: {note}" for note in results["notes"]]
    return "\n".join(lines)


def write_metrics_json(results: dict[str, Any], samples: str | Path) -> Path:
    """Write `results` atomically to `<samples without .npz>.metrics.json`; non-finite numbers become null."""
    return write_json(results, Path(samples).with_suffix(".metrics.json"))


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    """Write `results` atomically to `path`; non-finite numbers become null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in results.items()}
    return atomic_write_text(path, json.dumps(clean, indent=2, allow_nan=False) + "\n")


SPREAD_METRICS = ("fid", "fd_dinov2", *METRICS[1:])  # what `summarize_sample_sets` averages


def summarize_sample_sets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several sample sets of one model (one per sampling seed) → for each metric every set has, its mean
    (`fid`), standard deviation over the sets (`fid_std`, n − 1) and the values (`fid_per_seed`), in the
    sets' order; EDM2 reports FID over three seeds this way."""
    if len(runs) < 2:
        raise ValueError(f"a spread over sample sets needs at least 2 of them, got {len(runs)}")
    summary: dict[str, Any] = {
        "samples": [r["samples"] for r in runs],
        "num_samples": [r["num_samples"] for r in runs],
        "reference": runs[0]["reference"],
        "feature_network": runs[0]["feature_network"],
    }
    if all(isinstance(r.get("nfe"), float) for r in runs):
        summary["nfe"] = statistics.fmean(r["nfe"] for r in runs)
    for key in SPREAD_METRICS:
        values = [r.get(key) for r in runs]
        if all(isinstance(v, float) and math.isfinite(v) for v in values):
            summary |= {
                key: statistics.fmean(values),
                f"{key}_std": statistics.stdev(values),
                f"{key}_per_seed": values,
            }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """`summarize_sample_sets`' mean ± std per metric, one line each."""
    names = {"fid": "FID", "fd_dinov2": "FD-DINOv2", "sfid": "sFID", "inception_score": "Inception Score"}
    lines = [f"over {len(summary['samples'])} sample sets (mean ± standard deviation; per set)", "-" * 40]
    for key in SPREAD_METRICS:
        if key in summary:
            each = ", ".join(f"{v:.4f}" for v in summary[f"{key}_per_seed"])
            lines.append(
                f"{names.get(key, key):<16} {summary[key]:.4f} ± {summary[f'{key}_std']:.4f}  ({each})"
            )
    return "\n".join(lines)


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """The body of `src/evaluate.py` (options: conf/evaluate.yaml): the metrics of `cfg.samples` (one `.npz`,
    or a list of them: one per sampling seed) against `cfg.ref`, printed and written to
    `<samples>.metrics.json`; returns them. With several files their mean ± std is printed too and written to
    `cfg.summary` (default `<first samples>.mean.metrics.json`), and returned."""
    files = list(cfg.samples) if OmegaConf.is_list(cfg.samples) else [cfg.samples]
    if not files:
        raise ValueError("samples=[] is empty: give one .npz or a list of them, e.g. samples=[a.npz,b.npz]")
    for file in files:
        try:  # a bad samples file fails now, not after the reference statistics
            npz_image_shape(file)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"samples: {err}") from None
    device = resolve_device(cfg.device)
    net = InceptionFeatures(cfg.inception, fc_weights_path=cfg.inception_fc_weights)
    dinov2, why = fd_dinov2_network(  # before the references: no weights at hand fails (or says so) first
        parse_fd_dinov2(cfg.get("fd_dinov2", "auto"), "fd_dinov2"),
        cfg.get("fd_dinov2_encoder") or DINOV2_ENCODER,
        cfg.get("fd_dinov2_encoder_path"),
        key="fd_dinov2",
        device=device,
    )
    if why:
        print(why)
    reference = load_reference(
        cfg.ref,
        net,
        cache_dir=cfg.cache_dir,
        batch_size=cfg.batch_size,
        num_pr_images=cfg.num_pr_images,
        device=device,
    )
    dinov2_reference = None
    if (
        dinov2 is not None
    ):  # the reference's images in DINOv2's space (an ADM .npz's stats are the Inception's)
        dinov2_reference = load_reference(
            cfg.ref,
            dinov2,
            cache_dir=cfg.cache_dir,
            batch_size=cfg.batch_size,
            num_pr_images=0,
            device=device,
            stored=False,
        )
    runs = []
    for file in files:
        results = evaluate_samples(
            file,
            reference,
            net,
            batch_size=cfg.batch_size,
            device=device,
            k=cfg.k,
            dinov2=dinov2,
            dinov2_reference=dinov2_reference,
        )
        print(format_metrics(results))
        print(f"wrote {write_metrics_json(results, file)}")
        runs.append(results)
    if len(runs) == 1:
        return runs[0]
    summary = summarize_sample_sets(runs)
    print(format_summary(summary))
    out = cfg.get("summary") or Path(files[0]).with_suffix(".mean.metrics.json")
    print(f"wrote {write_json(summary, out)}")
    return summary
