"""Speed of the FID feature network (TF Inception-v3) on this machine, and that the FID does not move.

    python experiments/bench_inception.py [--images 400] [--batch 100] [--repeats 3] [--chunks 4 8]

Modes, interleaved over `--repeats` rounds (A B B A ...), on the same Fashion-MNIST test images:
- `whole-batch`: the TorchScript graph, each batch of `--batch` images in one pass, contiguous (NCHW) — the
  pipeline before ditlab's CPU work on it (the baseline);
- `torchscript-chunk8`: the TorchScript graph in chunks of 8 images, channels-last (the pipeline of 2026-12-01);
- `folded-chunkK`: `InceptionFeatures.features` as FID calls it (`FoldedInception`, channels-last), in
  chunks of each K of `--chunks` (the default is `CPU_CHUNK`).
Then the FID of the first half of the images against the second half, from each mode's features, and
their relative difference from the baseline's. Prints a table and writes JSON to `bench_results/`.
"""

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

import ditlab.metrics.features as features_module
from bench import slug
from ditlab.data.fashion_mnist import FashionMNISTDataModule
from ditlab.metrics.features import InceptionFeatures, load_inception_torchscript
from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric
from ditlab.provenance import describe_device

BASELINE = "whole-batch"


def torchscript(layers: torch.nn.Module, net: InceptionFeatures, images: torch.Tensor, chunk: int | None):
    """Pool features of the TorchScript graph, whole batch (NCHW) or in channels-last chunks."""
    with torch.no_grad():
        x = net.preprocess(images)
        if chunk is None:
            return layers(x).flatten(1)
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.cat([layers(part).flatten(1) for part in x.split(chunk)])


def folded(net: InceptionFeatures, images: torch.Tensor, chunk: int) -> torch.Tensor:
    features_module.CPU_CHUNK = chunk  # read at call time by `InceptionFeatures.features`
    return net(images)


def fid(features: torch.Tensor) -> float:
    half = len(features) // 2
    metric = frechet_metric(PrecomputedFeatures(features.shape[1]))
    metric.update(features[:half].double(), real=True)
    metric.update(features[half:].double(), real=False)
    return metric.compute().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batch", type=int, default=100, help="images per call (the FID callbacks use 100)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunks", type=int, nargs="+", default=[features_module.CPU_CHUNK])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "bench_results")
    args = p.parse_args()

    data = FashionMNISTDataModule(random_flip=False)
    data.prepare_data()
    test = data.build_dataset("val", random_flip=False)
    images = (test.__getitems__(range(args.images))[0] + 1) / 2  # (N, 1, 32, 32) in [0, 1]
    net = InceptionFeatures()
    layers, _ = load_inception_torchscript()
    modes = {
        BASELINE: lambda x: torchscript(layers, net, x, None),
        "torchscript-chunk8": lambda x: torchscript(layers, net, x, 8),
    }
    for chunk in args.chunks:
        modes[f"folded-chunk{chunk}"] = lambda x, chunk=chunk: folded(net, x, chunk)
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    features: dict[str, torch.Tensor] = {}
    for run in modes.values():  # warm-up: allocations, oneDNN kernel selection
        run(images[: args.batch])
    for round_ in range(args.repeats):
        order = list(modes) if round_ % 2 == 0 else list(reversed(modes))
        for name in order:
            start = time.perf_counter()
            features[name] = torch.cat([modes[name](batch) for batch in images.split(args.batch)])
            seconds[name].append(time.perf_counter() - start)
    fids = {name: fid(f) for name, f in features.items()}
    base, base_fid = features[BASELINE], fids[BASELINE]
    base_rate = args.images / statistics.median(seconds[BASELINE])
    rows = {
        name: {
            "images_per_s_median": args.images / statistics.median(s),
            "images_per_s_range": [args.images / max(s), args.images / min(s)],
            "speedup_vs_baseline": args.images / statistics.median(s) / base_rate,
            "fid_half_vs_half": fids[name],
            "fid_relative_difference": abs(fids[name] - base_fid) / base_fid,
            "features_max_relative_difference": (
                (features[name] - base).abs().max() / base.abs().max()
            ).item(),
        }
        for name, s in seconds.items()
    }
    device = describe_device(torch.device("cpu"))
    print(f"{device['name']}, {device['torch_threads']} threads, torch {torch.__version__}")
    print(
        f"{'mode':<20} {'images/s (median, range)':>26} {'vs base':>8} {'FID':>11} {'FID rel.':>9} {'feat. rel.':>10}"
    )
    for name, row in rows.items():
        low, high = row["images_per_s_range"]
        print(
            f"{name:<20} {row['images_per_s_median']:>11.1f} ({low:5.1f}–{high:5.1f}) "
            f"×{row['speedup_vs_baseline']:>6.2f} {row['fid_half_vs_half']:>11.6f} "
            f"{row['fid_relative_difference']:>9.1e} {row['features_max_relative_difference']:>10.1e}"
        )
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "images": args.images,
        "batch": args.batch,
        "repeats": args.repeats,
        "baseline": BASELINE,
        "modes": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"inception-{slug(device['name'])}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
