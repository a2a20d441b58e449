"""All sample metrics of the paper (FID, sFID, Inception Score, precision, recall) for an `.npz` of samples.

The samples go through the feature network once; the pool features feed FID, precision/recall and the
Inception Score logits, the spatial features sFID. `evaluate_samples` returns a flat dict,
`format_metrics` prints it as a table and `write_metrics_json` stores it next to the samples;
`run_evaluate` is the body of `src/evaluate.py`.
"""

import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from ditlab.cli import resolve_device
from ditlab.io import atomic_write_text
from ditlab.metrics.features import FC_WEIGHTS_FILE, InceptionFeatures
from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric
from ditlab.metrics.image_sources import iter_npz_images, npz_image_shape
from ditlab.metrics.inception_score import inception_score
from ditlab.metrics.precision_recall import precision_recall
from ditlab.metrics.reference import ReferenceStats, load_reference

METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


@torch.no_grad()
def evaluate_samples(
    samples: str | Path,
    reference: ReferenceStats,
    net: nn.Module,
    *,
    batch_size: int = 100,
    device: str | torch.device = "cpu",
    k: int = 3,
) -> dict[str, Any]:
    """FID, sFID, IS, precision and recall of the uint8 images `arr_0` (N×H×W×3) of `samples` against `reference`.

    `net` (moved to `device`) is an `InceptionFeatures` or anything with its `features` and `identity`.
    A metric the inputs cannot give (IS without classifier weights, sFID or precision/recall without
    spatial statistics or reference features) is None, with the reason in `notes`.
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
    pool, logits = [], []
    num_batches = math.ceil(num_samples / batch_size)
    for images in tqdm(iter_npz_images(samples, batch_size), "sample features", num_batches, disable=None):
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
    results["fid"] = fid.compute().item()
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
    lines.append("-" * 40)
    for key in METRICS:
        value = results[key]
        lines.append(f"{names.get(key, key):<16} {'n/a' if value is None else f'{value:.4f}'}")
    lines += [f"note: {note}" for note in results["notes"]]
    return "\n".join(lines)


def write_metrics_json(results: dict[str, Any], samples: str | Path) -> Path:
    """Write `results` atomically to `<samples without .npz>.metrics.json`; non-finite numbers become null."""
    path = Path(samples).with_suffix(".metrics.json")
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in results.items()}
    return atomic_write_text(path, json.dumps(clean, indent=2, allow_nan=False) + "\n")


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """The body of `src/evaluate.py` (options: conf/evaluate.yaml): the metrics of `cfg.samples` against
    `cfg.ref`, printed and written to `<samples>.metrics.json`; returns them."""
    try:  # a bad samples file fails now, not after the reference statistics
        npz_image_shape(cfg.samples)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"samples: {err}") from None
    device = resolve_device(cfg.device)
    net = InceptionFeatures(cfg.inception, fc_weights_path=cfg.inception_fc_weights)
    reference = load_reference(
        cfg.ref,
        net,
        cache_dir=cfg.cache_dir,
        batch_size=cfg.batch_size,
        num_pr_images=cfg.num_pr_images,
        device=device,
    )
    results = evaluate_samples(cfg.samples, reference, net, batch_size=cfg.batch_size, device=device, k=cfg.k)
    print(format_metrics(results))
    print(f"wrote {write_metrics_json(results, cfg.samples)}")
    return results
