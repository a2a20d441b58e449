"""Speed of the FID feature network (TF Inception-v3) on this machine, and that the FID does not move.

    python experiments/bench_inception.py [--images 400] [--batch 50] [--repeats 3]

Modes, interleaved over `--repeats` rounds (A B B A ...), on the same Fashion-MNIST test images:
- `whole-batch`: each batch of `--batch` images through the network in one pass, contiguous (NCHW) — the
  pipeline before `InceptionFeatures` chunked CPU work;
- `features`: `InceptionFeatures.features` as FID calls it (CPU: chunks of `CPU_CHUNK`, channels-last).
Then the FID of the first half of the images against the second half, from each mode's features, and
their relative difference. Prints a table and writes JSON to `bench_results/`.
"""

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ditlab.data.fashion_mnist import FashionMNISTDataModule
from ditlab.metrics.features import CPU_CHUNK, InceptionFeatures
from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric


def whole_batch(net: InceptionFeatures, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.layers(net.preprocess(images)).flatten(1)


def fid(features: torch.Tensor) -> float:
    half = len(features) // 2
    metric = frechet_metric(PrecomputedFeatures(features.shape[1]))
    metric.update(features[:half].double(), real=True)
    metric.update(features[half:].double(), real=False)
    return metric.compute().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batch", type=int, default=50, help="images per call (the FID callbacks use 100)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "bench_results")
    args = p.parse_args()

    data = FashionMNISTDataModule(random_flip=False)
    data.prepare_data()
    test = data.build_dataset("val", random_flip=False)
    images = (test.__getitems__(range(args.images))[0] + 1) / 2  # (N, 1, 32, 32) in [0, 1]
    net = InceptionFeatures()
    modes = {"whole-batch": lambda x: whole_batch(net, x), "features": net.forward}
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
    rows = {
        name: {
            "images_per_s_median": args.images / statistics.median(s),
            "images_per_s_range": [args.images / max(s), args.images / min(s)],
            "fid_half_vs_half": fids[name],
        }
        for name, s in seconds.items()
    }
    speedup = rows["features"]["images_per_s_median"] / rows["whole-batch"]["images_per_s_median"]
    fid_rel = abs(fids["features"] - fids["whole-batch"]) / fids["whole-batch"]
    feat_rel = (
        (features["features"] - features["whole-batch"]).abs().max() / features["whole-batch"].abs().max()
    ).item()
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"{'mode':<12} {'images/s (median, range)':>28} {'FID':>10}")
    for name, row in rows.items():
        low, high = row["images_per_s_range"]
        print(
            f"{name:<12} {row['images_per_s_median']:>12.1f} ({low:.1f}–{high:.1f}) {row['fid_half_vs_half']:>14.6f}"
        )
    print(
        f"speed-up ×{speedup:.2f}; FID relative difference {fid_rel:.1e}; features max rel. difference {feat_rel:.1e}"
    )
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": torch.get_num_threads(),
        "torch": torch.__version__,
        "images": args.images,
        "batch": args.batch,
        "cpu_chunk": CPU_CHUNK,
        "repeats": args.repeats,
        "modes": rows,
        "speedup": speedup,
        "fid_relative_difference": fid_rel,
        "features_max_relative_difference": feat_rel,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"inception-cpu-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
