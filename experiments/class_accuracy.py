"""Are a Fashion-MNIST model's samples recognisable, class by class? A small CNN classifier, trained once on
the training split (cached), labels each model's guided samples: per class, the share it assigns to the
class they were drawn for ("class accuracy"), and the Fréchet distance of their CNN features to those of
that class's test images ("class FD"). We used it to choose the CPU demo's recipe: FID on 500
samples barely moves between recipes that a reader tells apart at a glance (footwear or noise).

    python experiments/class_accuracy.py outputs/<run>/<time>/checkpoints/last.ckpt [more.ckpt ...] \
        [--per-class 50] [--cfg-scale 4] [--sampler ddim] [--steps 50] [--json out.json] [--grid folder]
    python experiments/class_accuracy.py --samples <run>/samples/fid_step0001000.npz [...] --json out.json

Prints both scores per checkpoint (one column per class) and writes them as JSON.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ditlab.data.fashion_mnist import CLASS_NAMES, FashionMNISTDataModule
from ditlab.diffusion import SAMPLERS, SamplingSpec
from ditlab.grids import save_grid
from ditlab.interop import load_dit
from ditlab.interop.generation import ImageSampler, to_uint8_rgb
from ditlab.io import atomic_write, cache_folder
from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric
from ditlab.provenance import cpu_name

CACHE = cache_folder()


def classifier() -> nn.Module:
    """A small CNN for (B, 1, 32, 32) images in [-1, 1] -> (B, 10) logits (91.4% test accuracy after
    3 epochs, measured on a 2-core CPU)."""

    def conv(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(
        conv(1, 32),
        conv(32, 32),
        nn.MaxPool2d(2),
        conv(32, 64),
        conv(64, 64),
        nn.MaxPool2d(2),
        conv(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def _split(data: FashionMNISTDataModule, split: str) -> tuple[Tensor, Tensor]:
    """All images (N, 1, 32, 32) in [-1, 1] and labels (N,) of "train" or "val", without flips."""
    dataset = data.build_dataset(split, random_flip=False)
    return dataset.__getitems__(range(len(dataset)))


def trained_classifier(
    data_dir: str, epochs: int = 3, seed: int = 0
) -> tuple[nn.Module, float, tuple[Tensor, Tensor]]:
    """The classifier, trained on the training split with flips (or loaded from the cache), its test
    accuracy, and the test split (images, labels)."""
    data = FashionMNISTDataModule(data_dir=data_dir, random_flip=False)
    data.prepare_data()
    net = classifier()
    path = CACHE / f"fmnist_classifier_e{epochs}_s{seed}.pt"
    if path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        torch.manual_seed(seed)
        x, y = _split(data, "train")
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
        steps = epochs * (len(x) // 128)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        net.train()
        for epoch in range(epochs):
            order = torch.randperm(len(x))
            for i in range(len(x) // 128):
                idx = order[i * 128 : (i + 1) * 128]
                xb = x[idx]
                flip = torch.rand(len(idx)) < 0.5  # garments are left-right symmetric in meaning
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
                loss = F.cross_entropy(net(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            print(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}", flush=True)
        atomic_write(path, lambda f: torch.save(net.state_dict(), f))
    net.eval()
    x, y = _split(data, "val")
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    return net, accuracy, (x, y)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features a (N, D) and b (M, D), in float64 (the
    project's FID computation on given features)."""
    metric = frechet_metric(PrecomputedFeatures(a.shape[1]))
    metric.update(b, real=True)
    metric.update(a, real=False)
    return metric.compute().item()


@torch.no_grad()
def score_images(
    net: nn.Module, real: tuple[Tensor, Tensor], x: Tensor, labels: Tensor
) -> tuple[list[float], list[float]]:
    """Per class c, for the images x (N, 1, H, W) in [-1, 1] drawn for class c (labels (N,)): the share the
    classifier labels c, and the Fréchet distance of their classifier features (the 128-d pooled layer)
    to those of the real test images of class c (NaN for a class with fewer than 2 images)."""
    features, head = net[:-1], net[-1]
    fake_features, real_features = features(x), features(real[0])
    predicted = head(fake_features).argmax(1)
    accuracy, distance = [], []
    for c in range(10):
        mine = labels == c
        accuracy.append((predicted[mine] == c).float().mean().item() if mine.any() else float("nan"))
        enough = int(mine.sum()) >= 2
        distance.append(
            frechet_distance(fake_features[mine], real_features[real[1] == c]) if enough else float("nan")
        )
    return accuracy, distance


def write_grid(path: Path, images: Tensor, labels: Tensor, title: str, per_row: int = 8) -> None:
    """A labelled grid (`ditlab.grids`) of images (N, 1, H, W) in [-1, 1]: a row per class drawn, of its first
    images, as many in every row (at most `per_row`) so that no row holds two classes."""
    drawn = [torch.nonzero(labels == c).flatten() for c in range(10)]
    drawn = [indices for indices in drawn if len(indices)]
    per_row = min(per_row, *(len(indices) for indices in drawn))
    keep = torch.cat([indices[:per_row] for indices in drawn])
    pixels = to_uint8_rgb(images[keep]).numpy()
    save_grid(path, pixels, labels[keep].tolist(), per_row=per_row, class_names=CLASS_NAMES, title=title)


@torch.no_grad()
def class_scores(
    net: nn.Module,
    real: tuple[Tensor, Tensor],
    checkpoint: str,
    *,
    per_class: int,
    cfg_scale: float,
    sampler: str,
    steps: int,
    seed: int,
) -> tuple[list[float], list[float], Tensor]:
    """`score_images` of `per_class` guided samples per class of a checkpoint; also the samples,
    (N, 1, H, W) in [-1, 1]."""
    sample = ImageSampler(
        load_dit(checkpoint), SamplingSpec(sampler, steps=steps, cfg_scale=cfg_scale, seed=seed)
    )
    labels = torch.arange(10).repeat_interleave(per_class)
    images, _ = sample(range(len(labels)), labels)  # (N, H, W, 3) uint8
    x = images[..., :1].permute(0, 3, 1, 2).float() / 127.5 - 1
    return *score_images(net, real, x, labels), x


def saved_samples(path: str | Path) -> tuple[Tensor, Tensor]:
    """Images (N, 1, H, W) in [-1, 1] and labels (N,) of an `.npz` written by `src/sample.py` or by the
    FID callback (`callbacks.fid.save_samples=true`): `arr_0` (N, H, W, 3) uint8, `arr_1` labels."""
    with np.load(path, allow_pickle=False) as f:
        if "arr_1" not in f:
            raise SystemExit(f"{path} has no labels (arr_1): it is not a ditlab samples file")
        images, labels = torch.from_numpy(f["arr_0"]), torch.from_numpy(f["arr_1"]).long()
    return images[..., :1].permute(0, 3, 1, 2).float() / 127.5 - 1, labels


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+", help="checkpoints, or with --samples .npz sample files")
    parser.add_argument(
        "--samples", action="store_true", help="score saved samples (.npz with labels) instead of sampling"
    )
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument(
        "--sampler", default="ddim", choices=("auto", *SAMPLERS), help="auto: the objective's (flow: euler)"
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--grid", type=Path, default=None, help="folder for a PNG grid per checkpoint")
    args = parser.parse_args()
    net, test_accuracy, real = trained_classifier(args.data_dir)
    print(f"classifier test accuracy: {test_accuracy:.3f}")
    short = [name.split("/")[0][:7] for name in CLASS_NAMES]
    header = f"{'':44s} " + " ".join(f"{s:>7s}" for s in short) + "    mean"
    rows = []
    for checkpoint in args.checkpoints:
        if args.samples:
            images, labels = saved_samples(checkpoint)
            accuracy, distance = score_images(net, real, images, labels)
            sampling = "saved samples"
        else:
            labels = torch.arange(10).repeat_interleave(args.per_class)  # class_scores' order
            sampling = f"{args.sampler} {args.steps} steps, cfg {args.cfg_scale:g}"
            accuracy, distance, images = class_scores(
                net,
                real,
                checkpoint,
                per_class=args.per_class,
                cfg_scale=args.cfg_scale,
                sampler=args.sampler,
                steps=args.steps,
                seed=args.seed,
            )
        print(header)
        for name, values, fmt in (("accuracy", accuracy, "7.2f"), ("class FD", distance, "7.1f")):
            mean = float(np.nanmean(values))
            print(
                f"{name + ' ' + checkpoint[-34:]:44s} "
                + " ".join(format(v, fmt) for v in values)
                + " "
                + format(mean, fmt)
            )
        if args.grid:
            title = f"{checkpoint} · {sampling} · class accuracy {np.nanmean(accuracy):.2f}"
            write_grid(args.grid / (Path(checkpoint).parent.parent.name + ".png"), images, labels, title)
        rows.append(
            {
                "checkpoint": checkpoint,
                "class_accuracy": dict(zip(CLASS_NAMES, accuracy, strict=True)),
                "class_fd": dict(zip(CLASS_NAMES, distance, strict=True)),
                "mean_accuracy": float(np.nanmean(accuracy)),
                "mean_class_fd": float(np.nanmean(distance)),
            }
        )
    if args.json:
        result = {
            "machine": cpu_name(),
            "classifier_test_accuracy": test_accuracy,
            "sampling": "saved samples"
            if args.samples
            else {
                "per_class": args.per_class,
                "cfg_scale": args.cfg_scale,
                "sampler": args.sampler,
                "steps": args.steps,
                "seed": args.seed,
            },
            "runs": rows,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
