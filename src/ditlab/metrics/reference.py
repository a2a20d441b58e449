"""Reference statistics: what the samples are compared with, computed once per source and network and cached.

A reference holds N(mu, sigma) of the pool features (FID), N(mu_s, sigma_s) of the spatial features (sFID)
and the pool features of up to `num_pr_images` images (precision/recall; ADM uses 10,000). Sources:

- any iterable of image batches (a DataLoader, a datamodule's loader): `reference_from_images`,
- an image folder: `reference_from_folder`,
- an `.npz`: ADM's reference batches (`mu`, `sigma`, `mu_s`, `sigma_s` from the TensorFlow evaluator, kept as
  they are, and `arr_0` images for precision/recall) or a plain `arr_0` image set: `reference_from_npz`,
- Fashion-MNIST as the datamodule serves it (zero-padded to 32×32): `load_reference("fashion_mnist_test")`.

`load_reference` caches what it computes as `.npz` under `cache_dir`, keyed by a hash of the source (its
path, size and modification time), the feature network and the settings.
"""

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm import tqdm

from ditlab.io import atomic_write, cache_folder
from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric, real_gaussian
from ditlab.metrics.image_sources import iter_image_files, iter_npz_images, list_image_files

DEFAULT_CACHE_DIR = cache_folder("fid_stats")
_CACHE_FORMAT = "ditlab-reference-v1"
_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class ReferenceStats:
    """Reference statistics in a feature network's space (float64 Gaussians, float32 features).

    mu (d,), sigma (d, d): pool features; mu_s (d_s,), sigma_s (d_s, d_s): spatial features (None: no sFID);
    pool_features (M, d): for precision/recall (None: not available); num_images: images behind the
    statistics, if known; source, network: where the statistics come from, for reports.
    """

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    pool_features: np.ndarray | None
    num_images: int | None
    source: str
    network: str

    def save(self, path: str | Path) -> None:
        """Write an `.npz` atomically (temporary file in the same folder, then rename)."""
        arrays = {k: v for k, v in dataclasses.asdict(self).items() if isinstance(v, np.ndarray)}
        arrays |= {
            "num_images": np.array(self.num_images or 0),
            "source": np.array(self.source),
            "network": np.array(self.network),
        }
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        """Read what `save` wrote (no pickles)."""
        with np.load(path, allow_pickle=False) as z:
            get = {k: z[k] if k in z.files else None for k in (*_STAT_KEYS, "pool_features")}
            return cls(
                **get,
                num_images=int(z["num_images"]) or None,
                source=str(z["source"]),
                network=str(z["network"]),
            )


@torch.no_grad()
def reference_from_images(
    batches: Iterable[Tensor | tuple | list],
    net: nn.Module,
    *,
    source: str,
    num_pr_images: int = 10_000,
    device: str | torch.device = "cpu",
) -> ReferenceStats:
    """Statistics of every image in `batches`, and the pool features of the first `num_pr_images` of them.

    batches: (B, 1|3, H, W) uint8 or [0, 1] float images, or (images, labels, ...) tuples of them (the first
    element is used). Shuffle a loader whose order is sorted (by class, say) so that the precision/recall
    subset is representative. `net` (moved to `device`) is an `InceptionFeatures` or anything with the same
    `features(images) -> {"pool", "spatial"}` and `identity`; a network without `spatial` features
    (`DINOv2Features`) gives no sFID statistics (mu_s, sigma_s None).
    """
    net.to(device)
    metrics: dict[str, FrechetInceptionDistance] = {}
    kept: list[Tensor] = []
    num_kept = 0
    for batch in tqdm(batches, desc="reference features", unit="batch", disable=None, leave=False):
        images = batch[0] if isinstance(batch, tuple | list) else batch
        features = net.features(images.to(device))
        for kind in ("pool", "spatial"):
            if kind not in features:
                continue
            if kind not in metrics:
                metrics[kind] = frechet_metric(PrecomputedFeatures(features[kind].shape[1])).to(device)
            metrics[kind].update(features[kind], real=True)
        if num_kept < num_pr_images:
            kept.append(features["pool"][: num_pr_images - num_kept].float().cpu())
            num_kept += kept[-1].shape[0]
    if not metrics:
        raise ValueError(f"Reference source {source} yielded no images.")
    mu, sigma = real_gaussian(metrics["pool"])
    mu_s, sigma_s = real_gaussian(metrics["spatial"]) if "spatial" in metrics else (None, None)
    num_images = int(metrics["pool"].real_features_num_samples)
    pool_features = torch.cat(kept).numpy() if kept else None
    return ReferenceStats(mu, sigma, mu_s, sigma_s, pool_features, num_images, source, net.identity)


def reference_from_folder(
    folder: str | Path,
    net: nn.Module,
    *,
    batch_size: int = 100,
    num_pr_images: int = 10_000,
    device: str | torch.device = "cpu",
) -> ReferenceStats:
    """Statistics of the images under `folder` (recursively, as RGB).

    Files are visited in a fixed random order, so the precision/recall subset does not follow the folder
    layout (ImageNet-style class folders); the Gaussians do not depend on the order.
    """
    files = list_image_files(folder)
    order = np.random.default_rng(0).permutation(len(files))
    batches = iter_image_files([files[i] for i in order], batch_size)
    return reference_from_images(batches, net, source=str(folder), num_pr_images=num_pr_images, device=device)


def reference_from_npz(
    path: str | Path,
    net: nn.Module,
    *,
    batch_size: int = 100,
    num_pr_images: int = 10_000,
    device: str | torch.device = "cpu",
    stored: bool = True,
) -> ReferenceStats:
    """Statistics of an `.npz`: an ADM reference batch or a plain `arr_0` image set.

    `mu`, `sigma`, `mu_s`, `sigma_s` stored in the file (ADM's, from the TensorFlow Inception) are used as
    they are; whatever is missing is computed from the `arr_0` images, which also give the precision/recall
    features. A file with statistics but no images gives no precision/recall. `stored=False` ignores the
    stored statistics (they are the Inception's: another network, e.g. DINOv2, needs the images).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Reference file {path} does not exist.")
    with np.load(path, allow_pickle=False) as z:
        keys = _STAT_KEYS if stored else ()
        stored = {k: z[k].astype(np.float64) for k in keys if k in z.files}
        has_images = "arr_0" in z.files
    if has_images:
        batches = iter_npz_images(path, batch_size)
        reference = reference_from_images(
            batches, net, source=str(path), num_pr_images=num_pr_images, device=device
        )
    elif {"mu", "sigma"} <= stored.keys():
        reference = ReferenceStats(
            stored["mu"], stored["sigma"], None, None, None, None, source=str(path), network=net.identity
        )
    else:
        what = (
            "`arr_0` images or `mu` and `sigma` statistics" if keys else f"`arr_0` images for {net.identity}"
        )
        raise ValueError(f"{path} needs {what} to serve as a reference.")
    if stored:
        reference = dataclasses.replace(reference, **stored)
        reference.network += f"; {', '.join(stored)} as stored in {path.name}"
    return reference


def load_reference(
    ref: str | Path,
    net: nn.Module,
    *,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    batch_size: int = 100,
    num_pr_images: int = 10_000,
    device: str | torch.device = "cpu",
    stored: bool = True,
) -> ReferenceStats:
    """Reference statistics of `ref`, computed once and cached in `cache_dir` (None: no cache).

    ref: an `.npz` (ADM reference batch or `arr_0` images), an image folder, or `fashion_mnist_test` /
    `fashion_mnist_train` (through `FashionMNISTDataModule(image_size=32)`: uint8, zero-padded to 32×32).
    `stored`: whether an ADM `.npz`'s own (Inception) statistics are used (`reference_from_npz`).
    """
    kwargs = {"net": net, "num_pr_images": num_pr_images, "device": device}
    match = re.fullmatch(r"fashion_mnist_(train|test)", str(ref))
    if match:
        # The datamodule gives exactly the images training sees; imported here because it pulls in Lightning.
        from ditlab.data.fashion_mnist import FashionMNISTDataModule

        split = match.group(1)
        datamodule = FashionMNISTDataModule(image_size=32, random_flip=False, download=False)
        key_file = datamodule.raw_dir()

        def compute() -> ReferenceStats:
            dataset = datamodule.build_dataset("val" if split == "test" else "train", random_flip=False)
            source = f"Fashion-MNIST {split}, 32×32"
            return reference_from_images(dataset.images.split(batch_size), source=source, **kwargs)

    elif Path(ref).is_dir():
        key_file = Path(ref)

        def compute() -> ReferenceStats:
            return reference_from_folder(ref, batch_size=batch_size, **kwargs)

    elif Path(ref).is_file() and Path(ref).suffix == ".npz":
        key_file = Path(ref)

        def compute() -> ReferenceStats:
            return reference_from_npz(ref, batch_size=batch_size, stored=stored, **kwargs)

    else:
        check_reference_source(ref)
    if cache_dir is None:
        return compute()
    fingerprint = f"{_source_fingerprint(key_file)}|pr={num_pr_images}" + ("" if stored else "|computed")
    return cached_reference(Path(str(ref)).stem, net, compute, cache_dir=cache_dir, fingerprint=fingerprint)


def check_reference_source(ref: str | Path) -> None:
    """Raises FileNotFoundError, in one line, unless `ref` is something `load_reference` reads."""
    if re.fullmatch(r"fashion_mnist_(train|test)", str(ref)) or Path(ref).is_dir():
        return
    if Path(ref).is_file() and Path(ref).suffix == ".npz":
        return
    raise FileNotFoundError(
        f"FID reference {str(ref)!r} is neither an .npz file, an image folder, nor fashion_mnist_test/"
        "fashion_mnist_train: check the path (callbacks.fid.reference= / ref=)"
    )


def cached_reference(
    name: str,
    net: nn.Module,
    compute: Callable[[], ReferenceStats],
    *,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    fingerprint: str = "",
) -> ReferenceStats:
    """`compute()` once per (name, fingerprint, feature network); later calls read `cache_dir/<name>-<hash>.npz`.

    For a DataLoader, name it after the data and its transform, e.g.
    `cached_reference("imagenet_train_256", net, lambda: reference_from_images(loader, net, source=...))`.
    """
    key = f"{_CACHE_FORMAT}|{name}|{fingerprint}|{net.identity}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{digest}.npz"
    if path.is_file():
        return ReferenceStats.load(path)
    reference = compute()
    reference.save(path)
    return reference


def _source_fingerprint(path: Path) -> str:
    """Resolved path, size and modification time of a file, or of every file under a folder."""
    path = path.resolve()
    if not path.exists():
        raise FileNotFoundError(f"Reference source {path} does not exist.")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return f"{path}:" + ";".join(
        f"{p.relative_to(path.parent)},{p.stat().st_size},{p.stat().st_mtime_ns}" for p in files
    )
