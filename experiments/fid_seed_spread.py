"""How much a run's FID moves with the sampling seed alone: the FID of one checkpoint's EMA samples drawn
with several sampling seeds, through the run's own FID settings (sampler, steps, guidance, sample count,
reference images of its datamodule) and `ditlab.diffusion.sampling`, the sampling of training's FID.

    python experiments/fid_seed_spread.py <run folder> [--seeds 1 2 3] [--precision fp32 bf16] [--json out.json]

Prints each seed's FID, their mean, standard deviation and range, and the FID the run recorded; the
spread tells how far apart two design points must be before a difference of FIDs means anything.
With several `--precision` values each seed is sampled in each (bf16: autocast of the model, as training's
FID runs under bf16-mixed), which tells whether bf16 sampling moves the FID beyond that spread.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ditlab.diffusion import build_objective
from ditlab.diffusion.sampling import SamplingSpec, image_generators, sample
from ditlab.interop import load_dit
from ditlab.io import atomic_write_text
from ditlab.metrics.features import InceptionFeatures
from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric
from ditlab.provenance import cpu_name
from ditlab.training.callbacks.fid_monitor import datamodule_reference


@torch.no_grad()
def fid_of_seed(loaded, net, reference, fid_cfg, seed: int, bf16: bool = False) -> float:
    model = loaded.model
    diffusion = build_objective(loaded.diffusion)
    interval = fid_cfg.get("cfg_interval")
    spec = SamplingSpec(  # the training FID's settings: labels uniform per image, no clipping
        fid_cfg.sampler,
        dict(fid_cfg.get("sampler_options") or {}),
        fid_cfg.steps,
        fid_cfg.cfg_scale,
        None if interval is None else list(interval),
        seed=seed,
        key="callbacks.fid.",
    ).resolve(diffusion)
    autoencoder = loaded.build_autoencoder()
    shape = (model.in_channels, model.input_size, model.input_size)
    metric = frechet_metric(PrecomputedFeatures(net.num_features), reference.mu, reference.sigma)
    for start in range(0, fid_cfg.num_samples, fid_cfg.batch_size):
        indices = range(start, min(start + fid_cfg.batch_size, fid_cfg.num_samples))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z, _ = sample(
                model,
                diffusion,
                image_generators(seed, indices, "cpu"),
                shape,
                spec,
                num_classes=model.num_classes,
            )
        images = autoencoder.decode(z.float()).clamp(-1, 1)
        metric.update(net((images.float() + 1) / 2).double(), real=False)
    return metric.compute().item()


def spread(fids: dict[int, float]) -> dict:
    values = list(fids.values())
    return {
        "fid_by_sampling_seed": fids,
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "range": [min(values), max(values)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "run", type=Path, help="a training run's folder (with .hydra/config.yaml and checkpoints/)"
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="default: <run>/checkpoints/last.ckpt")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    cfg = OmegaConf.load(args.run / ".hydra" / "config.yaml")
    fid_cfg = cfg.callbacks.fid
    checkpoint = args.checkpoint or args.run / "checkpoints" / "last.ckpt"
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    net = InceptionFeatures(fid_cfg.get("inception"))
    reference = datamodule_reference(
        datamodule,
        net,
        fid_cfg.num_reference_images,
        fid_cfg.cache_dir,
        fid_cfg.batch_size,
        torch.device("cpu"),
    )
    loaded = load_dit(checkpoint)
    recorded = json.loads((args.run / "results.json").read_text()).get("fid")
    by_precision = {}
    for precision in args.precision:
        fids = by_precision.setdefault(precision, {})
        for seed in args.seeds:
            start = time.perf_counter()
            fids[seed] = fid_of_seed(loaded, net, reference, fid_cfg, seed, bf16=precision == "bf16")
            seconds = time.perf_counter() - start
            print(f"{precision} sampling seed {seed}: FID {fids[seed]:.2f} ({seconds:.0f} s)", flush=True)
    summaries = {precision: spread(fids) for precision, fids in by_precision.items()}
    summary = {
        "run": str(args.run),
        "checkpoint": str(checkpoint),
        "machine": cpu_name(),
        "fid_settings": {
            k: fid_cfg[k] for k in ("num_samples", "sampler", "steps", "cfg_scale", "num_reference_images")
        },
        "reference": reference.source,
        "recorded_fid": recorded,
        **(summaries["fp32"] if list(summaries) == ["fp32"] else {"by_precision": summaries}),
    }
    for precision, s in summaries.items():
        sd = f", sd {s['sd']:.2f}" if s["sd"] is not None else ""
        print(
            f"{precision}: {len(s['fid_by_sampling_seed'])} sampling seeds, {fid_cfg.num_samples} samples each: "
            f"mean {s['mean']:.2f}{sd}, range {s['range'][0]:.2f}–{s['range'][1]:.2f}; the run recorded {recorded}"
        )
    if args.json:
        atomic_write_text(args.json, json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
