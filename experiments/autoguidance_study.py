"""Autoguidance against classifier-free guidance at CPU scale (issue 22): one checkpoint guided by weaker
versions of itself (earlier checkpoints of its run, a smaller model) at a few weights w, against CFG at a
few scales s. Per setting and sampling seed: the FID of `--num-samples` samples against the run's own FID
reference (as `src/fid_nfe.py` scores: x0 clipped, uint8 images) and the class scores of
`experiments/class_accuracy.py` (class accuracy, class FD); the JSON keeps every seed's values, the table
their mean and range.

    python experiments/autoguidance_study.py --ckpt <demo>/checkpoints/last.ckpt \
        --guide step500=<demo>/checkpoints/step_0000500.ckpt --guide ti8=<p8 run>/checkpoints/last.ckpt \
        --cfg-scales 1 1.5 2 3 --guide-scales 2 3 --seeds 0 1 --out experiments/results/sampling/autoguidance

Writes `<out>/autoguidance.json` (settings, per-seed values, how it was made), `<out>/autoguidance.md`
(the table) and a grid of seed 0's first images per setting (`<out>/grids/`).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from class_accuracy import score_images, trained_classifier, write_grid
from ditlab.diffusion import SamplingSpec
from ditlab.interop import load_dit
from ditlab.interop.checkpoints import load_guide
from ditlab.interop.generation import ImageSampler
from ditlab.io import atomic_write_text, content_sha256
from ditlab.metrics.features import InceptionFeatures
from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric
from ditlab.provenance import describe_device, git_state, versions
from ditlab.report.fid_nfe import reference_stats


@torch.no_grad()
def score_setting(
    loaded: Any,
    spec: SamplingSpec,
    guide: torch.nn.Module | None,
    seed: int,
    num_samples: int,
    batch_size: int,
    inception: InceptionFeatures,
    reference: Any,
    classifier: tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]],
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """FID, class scores and NFE of `num_samples` images of one setting and sampling seed; also the images
    (N, 1, H, W) in [-1, 1] and their labels."""
    sampler = ImageSampler(loaded, SamplingSpec(**(spec.as_record() | {"seed": seed})), guide=guide)
    metric = frechet_metric(PrecomputedFeatures(inception.num_features), reference.mu, reference.sigma)
    images, labels = [], []
    for start in range(0, num_samples, batch_size):
        pixels, y = sampler(range(start, min(start + batch_size, num_samples)))  # (N, H, W, 3) uint8
        metric.update(inception(pixels.permute(0, 3, 1, 2)).double(), real=False)
        images.append(pixels[..., :1].permute(0, 3, 1, 2).float() / 127.5 - 1)
        labels.append(y)
    x, y = torch.cat(images), torch.cat(labels)
    net, real = classifier
    accuracy, distance = score_images(net, real, x, y)
    scores = {
        "fid": metric.compute().item(),
        "class_accuracy": float(np.nanmean(accuracy)),
        "class_fd": float(np.nanmean(distance)),
        "nfe": sampler.evaluations.per_image,
    }
    return scores, x, y


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", required=True, help="the guided model: a training run's checkpoint")
    parser.add_argument(
        "--guide", action="append", default=[], help="name=checkpoint of a guide (repeatable)"
    )
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--guide-scales", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    guides = dict(item.split("=", 1) for item in args.guide)

    loaded = load_dit(args.ckpt)
    inception = InceptionFeatures()
    ref_cfg = OmegaConf.create(
        {
            "ref": None,
            "cache_dir": None,
            "ckpt": args.ckpt,
            "batch_size": args.batch_size,
            "num_reference_images": None,
        }
    )
    reference, _ = reference_stats(ref_cfg, inception, torch.device("cpu"))
    net, test_accuracy, real = trained_classifier(args.data_dir)
    settings = [("cfg", None, s, 1.0) for s in args.cfg_scales]
    settings += [(name, path, 1.0, w) for name, path in guides.items() for w in args.guide_scales]
    rows = []
    for kind, guide_path, cfg_scale, guide_scale in settings:
        spec = SamplingSpec(
            args.sampler, steps=args.steps, cfg_scale=cfg_scale, guide=guide_path, guide_scale=guide_scale
        )
        guide = (
            None
            if guide_path is None
            else load_guide(guide_path, loaded.model.config, loaded.diffusion, autoencoder=loaded.autoencoder)
        )
        per_seed, started = {}, time.monotonic()
        for seed in args.seeds:
            scores, x, y = score_setting(
                loaded,
                spec,
                guide,
                seed,
                args.num_samples,
                args.batch_size,
                inception,
                reference,
                (net, real),
            )
            per_seed[str(seed)] = scores
            if seed == args.seeds[0]:
                title = f"{kind}: cfg {cfg_scale:g}, guide weight {guide_scale:g} (seed {seed})"
                write_grid(
                    args.out / "grids" / f"{kind}-s{cfg_scale:g}-w{guide_scale:g}.png", x[:80], y[:80], title
                )
        row = {
            "setting": kind,
            "guide": guide_path,
            "guide_sha256": None if guide_path is None else content_sha256(Path(guide_path)),
            "cfg_scale": cfg_scale,
            "guide_scale": guide_scale,
            "per_seed": per_seed,
            **{
                key: summarise([s[key] for s in per_seed.values()])
                for key in ("fid", "class_accuracy", "class_fd")
            },
            "nfe": statistics.fmean(s["nfe"] for s in per_seed.values()),
            "seconds": time.monotonic() - started,
        }
        rows.append(row)
        print(
            f"{kind:>10} s={cfg_scale:g} w={guide_scale:g}: FID {row['fid']['mean']:.2f} "
            f"[{row['fid']['min']:.2f}, {row['fid']['max']:.2f}], class accuracy "
            f"{row['class_accuracy']['mean']:.3f}, class FD {row['class_fd']['mean']:.1f}, NFE {row['nfe']:g}",
            flush=True,
        )
    document = {
        "checkpoint": args.ckpt,
        "checkpoint_sha256": content_sha256(Path(args.ckpt)),
        "step": loaded.step,
        "coordinates": loaded.coordinates,
        "sampler": args.sampler,
        "steps": args.steps,
        "num_samples": args.num_samples,
        "seeds": args.seeds,
        "reference": reference.source,
        "feature_network": inception.identity,
        "classifier_test_accuracy": test_accuracy,
        "precision": "fp32",
        "device": describe_device(torch.device("cpu")),
        "git": git_state(),
        "versions": versions(),
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }
    atomic_write_text(args.out / "autoguidance.json", json.dumps(document, indent=1) + "\n")
    lines = [
        f"{len(args.seeds)} sampling seeds × {args.num_samples} samples, {args.sampler} {args.steps} steps; "
        "mean [min, max] over the seeds",
        "",
        "| setting | cfg scale | guide weight | NFE | FID | class accuracy | class FD |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [
            f"{r[k]['mean']:.{d}f} [{r[k]['min']:.{d}f}, {r[k]['max']:.{d}f}]"
            for k, d in (("fid", 2), ("class_accuracy", 3), ("class_fd", 1))
        ]
        lines.append(
            f"| {r['setting']} | {r['cfg_scale']:g} | {r['guide_scale']:g} | {r['nfe']:g} | "
            + " | ".join(cells)
            + " |"
        )
    atomic_write_text(args.out / "autoguidance.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
