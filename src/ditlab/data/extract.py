"""Encode a dataset once and store its latents (the layout is described in `ditlab.data.latents`).

The work is split into chunks of `chunk_size` examples; rank r of `world_size` encodes chunks r, r + W,
... into its own rows of one preallocated memory-mapped file, so ranks never write the same bytes.
Rank 0 creates the folder (arrays first, manifest last); the other ranks wait for the manifest. A chunk
is marked done by an empty file created after its rows are flushed, so an interrupted extraction
resumes where it stopped, with any number of ranks. Each chunk's posterior noise comes from a
generator seeded by (seed, chunk), so the result does not depend on the number of ranks or on resuming.
The rank that finishes the last chunk marks the manifest complete. `run_extract` is the body of
`src/extract_latents.py`.
"""

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from ditlab.autoencoders import Autoencoder
from ditlab.cli import resolve_device
from ditlab.data.base import ImageDataModule
from ditlab.data.latents import CHUNKS, FORMAT, LABELS, LATENTS, MANIFEST, read_manifest
from ditlab.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

DTYPES = ("float16", "float32")
PROGRESS_KEYS = ("done_chunks", "complete")


def write_json_atomic(file: Path, data: dict[str, Any]) -> None:
    atomic_write_text(file, json.dumps(data, indent=2) + "\n")


def _create_npy(file: Path, shape: tuple[int, ...], dtype: str) -> None:
    """Preallocate an .npy file under a temporary name and move it into place whole."""
    with atomic_path(file) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        array.flush()
        del array


def _create_folder(path: Path, plan: dict[str, Any]) -> None:
    """Rank 0, no manifest yet: (re)create the arrays, then the manifest that makes them visible."""
    ours = {LATENTS, LABELS, CHUNKS}
    if path.exists():
        # ditlab.io's temporary files of a killed run (.<name>.tmp-<pid>) are ours too
        strangers = [p.name for p in path.iterdir() if p.name not in ours and ".tmp-" not in p.name]
        if strangers:
            raise FileExistsError(
                f"{path} holds other files ({', '.join(sorted(strangers)[:5])}) and no {MANIFEST}; "
                "choose an empty or new folder for the latents"
            )
    path.mkdir(parents=True, exist_ok=True)
    # Markers without a manifest belong to arrays being replaced now: they no longer mean anything.
    shutil.rmtree(path / CHUNKS, ignore_errors=True)
    (path / CHUNKS).mkdir()
    _create_npy(path / LATENTS, tuple(plan["latents"]["shape"]), plan["latents"]["dtype"])
    _create_npy(path / LABELS, tuple(plan["labels"]["shape"]), plan["labels"]["dtype"])
    write_json_atomic(path / MANIFEST, plan)


def _check_same_plan(path: Path, plan: dict[str, Any]) -> dict[str, Any]:
    stored = read_manifest(path, require_complete=False)
    differ = sorted(
        k for k in plan.keys() | stored.keys() if k not in PROGRESS_KEYS and plan.get(k) != stored.get(k)
    )
    if differ:
        raise ValueError(
            f"{path} holds an extraction with other settings (differing: {', '.join(differ)}); choose another "
            "path, or delete that folder to start over"
        )
    return stored


def _wait_for_manifest(path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path / MANIFEST).is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank 0 did not create {path / MANIFEST} within {timeout_s:.0f} s; start rank 0 with the same path"
            )
        time.sleep(0.5)


def _chunk_generator(seed: int, chunk: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0]))


def extract_latents(
    datamodule: ImageDataModule,
    autoencoder: Autoencoder,
    path: str | Path,
    *,
    split: str = "train",
    flip: bool = True,
    dtype: str = "float16",
    chunk_size: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    wait_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Encode `split` of `datamodule` (and, with `flip`, its mirror images) with `autoencoder` into `path`.

    Encodes this rank's unfinished chunks in micro-batches of `batch_size` on `device` and returns the
    manifest: `complete` is true once every rank's chunks are done. Latents are (N, 1 or 2, c, h, w).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be positive, got {chunk_size} and {batch_size}")
    path = Path(path).absolute()
    if rank == 0:
        datamodule.prepare_data()
    else:
        _wait_for_manifest(path, wait_timeout_s)  # also means rank 0 has the data in place

    dataset = datamodule.build_dataset(split, random_flip=False)
    if dataset is None:
        raise ValueError(f"{type(datamodule).__name__} has no {split!r} split to extract")
    if split == "train":
        dataset = datamodule.train_subset(dataset)
    count, views = len(dataset), 2 if flip else 1
    channels, size = autoencoder.latent_shape(datamodule.channels, datamodule.image_size)
    num_chunks = -(-count // chunk_size)
    plan = {
        "format": FORMAT,
        "count": count,
        "views": views,
        "flip": flip,
        "latent_shape": [channels, size],
        "latents": {"file": LATENTS, "shape": [count, views, channels, size, size], "dtype": dtype},
        "labels": {"file": LABELS, "shape": [count], "dtype": "int64"},
        "scale_factor": autoencoder.scale_factor,
        "autoencoder": autoencoder.config,
        "data": {
            "_target_": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
            "source": datamodule.source,
            "split": split,
            "image_size": datamodule.image_size,
            "channels": datamodule.channels,
            "num_classes": datamodule.num_classes,
            "class_names": datamodule.class_names,
        },
        "chunk_size": chunk_size,
        "num_chunks": num_chunks,
        "seed": seed,
        "done_chunks": 0,
        "complete": False,
    }
    plan = json.loads(json.dumps(plan))  # tuples -> lists, as they come back from the file
    if rank == 0 and not (path / MANIFEST).is_file():
        _create_folder(path, plan)
    stored = _check_same_plan(path, plan)
    if stored["complete"]:
        return stored

    def marker(chunk: int) -> Path:
        return path / CHUNKS / f"{chunk:08d}.done"

    pending = [c for c in range(rank, num_chunks, world_size) if not marker(c).exists()]
    log.info("rank %d/%d: %d of its chunks to encode into %s", rank, world_size, len(pending), path)
    loader = DataLoader(
        dataset,
        batch_sampler=[list(range(c * chunk_size, min((c + 1) * chunk_size, count))) for c in pending],
        num_workers=datamodule.num_workers,
        collate_fn=datamodule.collate_fn,
    )
    latents = np.load(path / LATENTS, mmap_mode="r+", allow_pickle=False)
    labels = np.load(path / LABELS, mmap_mode="r+", allow_pickle=False)
    autoencoder.to(device)
    for chunk, (x, y) in zip(pending, tqdm(loader, desc=f"rank {rank}", position=rank), strict=True):
        generator = _chunk_generator(seed, chunk)
        x = x.to(device)
        encoded = []
        for view in range(views):
            images = x.flip(-1) if view else x
            encoded.append(
                torch.cat([autoencoder.encode(part, generator) for part in images.split(batch_size)])
            )
        z = torch.stack(encoded, dim=1)  # (B, views, c, h, w)
        if z.shape[2:] != (channels, size, size):
            raise ValueError(f"the autoencoder returned latents {tuple(z.shape[2:])}, not its latent_shape")
        start = chunk * chunk_size
        latents[start : start + len(z)] = z.to(getattr(torch, dtype)).cpu().numpy()
        labels[start : start + len(z)] = y.numpy()
        latents.flush()
        labels.flush()
        marker(chunk).touch()  # only after the rows are on disk
    del latents, labels

    done = sum(marker(c).exists() for c in range(num_chunks))
    manifest = {**stored, "done_chunks": done, "complete": done == num_chunks}
    if manifest["complete"]:
        write_json_atomic(path / MANIFEST, manifest)
    return manifest


def run_extract(cfg: DictConfig) -> dict[str, Any]:
    """The body of `src/extract_latents.py` (options: conf/extract_latents.yaml): this rank's chunks of
    `cfg.data` encoded into `cfg.path`, and the command that trains from them once all are done; returns
    the manifest."""
    manifest = extract_latents(
        instantiate(cfg.data),
        instantiate(cfg.autoencoder),
        cfg.path,
        split=cfg.split,
        flip=cfg.flip,
        dtype=cfg.dtype,
        chunk_size=cfg.chunk_size,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=cfg.rank,
        world_size=cfg.world_size,
        device=resolve_device(cfg.device),
        wait_timeout_s=cfg.wait_timeout_s,
    )
    if not manifest["complete"]:
        print(
            f"rank {cfg.rank}: its chunks are done ({manifest['done_chunks']} of {manifest['num_chunks']} in all); "
            "the rank that finishes last completes the manifest. If a rank failed, rerun the same command."
        )
        return manifest
    hydra_cfg = HydraConfig.get()
    autoencoder_args = [f"autoencoder={hydra_cfg.runtime.choices.autoencoder}"]
    autoencoder_args += [o for o in hydra_cfg.overrides.task if o.startswith("autoencoder.")]
    latents, path = manifest["latents"], os.path.abspath(cfg.path)
    print(
        f"Latents {latents['shape']} ({latents['dtype']}) of {manifest['data']['split']} are in {path}.\n"
        f"Train from them with:\n  python src/train.py data=latents data.path={path} {' '.join(autoencoder_args)}"
    )
    return manifest
