"""Pre-extracted latents: train without the autoencoder in the loop.

A latent folder (written by `ditlab.data.extract.extract_latents`) holds
  latents.npy    (N, V, c, h, w) float16|float32, already scaled; view 0 the image, view 1 (if V=2) its mirror
  labels.npy     (N,) int64
  manifest.json  shapes, dtype, scale factor, the autoencoder's config, the data source, chunk progress
  chunks/        one empty `<chunk>.done` file per finished chunk (the progress of an extraction)
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

from ditlab.autoencoders import Autoencoder
from ditlab.data.base import ImageDataModule, collate_batched, split_views

FORMAT = "ditlab-latents/1"
MANIFEST = "manifest.json"
LATENTS = "latents.npy"
LABELS = "labels.npy"
CHUNKS = "chunks"


def read_manifest(path: str | Path, require_complete: bool = True) -> dict[str, Any]:
    """The manifest of the latent folder `path`; with `require_complete`, an error unless extraction finished."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(
            f"no latent manifest {file}; extract latents first: "
            f"python src/extract_latents.py data=<dataset> autoencoder=<autoencoder> path={path}"
        )
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file} is not a ditlab latent manifest of format {FORMAT}")
    if require_complete and not manifest["complete"]:
        done = len(list((Path(path) / CHUNKS).glob("*.done")))
        raise ValueError(
            f"the extraction in {path} is unfinished ({done} of {manifest['num_chunks']} chunks); rerun the "
            "extract_latents command that started it to finish it"
        )
    return manifest


class LatentDataset(Dataset):
    """Latents and labels of a finished latent folder, memory-mapped and served in whole batches.

    Returns (z, y): z float32 (B, c, h, w), y int64 (B,). With `random_flip` and both views stored, index
    i + N is the mirrored image's latent of example i (`num_views` = 2; `GlobalBatchSampler` draws it).
    """

    def __init__(self, path: str | Path, random_flip: bool):
        self.path = Path(path)
        manifest = read_manifest(self.path)
        self.count = manifest["count"]
        self.num_views = manifest["views"] if random_flip else 1
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes map the files themselves instead of receiving a pickled copy of the data.
        return {**self.__dict__, "_arrays": None}

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (
                np.load(self.path / LATENTS, mmap_mode="r", allow_pickle=False),
                np.load(self.path / LABELS, mmap_mode="r", allow_pickle=False),
            )
        return self._arrays

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        latents, labels = self.arrays()
        idx, view = (v.numpy() for v in split_views(indices, self.count))
        if view.max(initial=0) >= self.num_views:
            raise IndexError(f"index out of range: {self.count} examples × {self.num_views} stored views")
        z = torch.from_numpy(latents[idx, view]).float()  # fancy indexing copies out of the map
        return z, torch.from_numpy(labels[idx])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        z, y = self.__getitems__([index])
        return z[0], y[0]


class LatentDataModule(ImageDataModule):
    """Trains from latents extracted by `src/extract_latents.py`; no autoencoder in the loop.

    `channels`, `image_size` and the classes are those of the images the latents came from, so an
    autoencoder can check it matches (`model_input_shape`) and decode samples to that image size.
    Batches: z float32 (B, c, h, w), already scaled; y int64 (B,).
    """

    is_latent = True
    collate_fn = staticmethod(collate_batched)

    def __init__(
        self,
        *,
        path: str,
        val_path: str | None = None,
        random_flip: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = True,
        limit_train_samples: int | None = None,
        image_size: int | None = None,
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            random_flip=random_flip,
            limit_train_samples=limit_train_samples,
        )
        self.path = Path(path)
        self.val_path = None if val_path is None else Path(val_path)
        # The image size the latents must come from (presets built on an image recipe, e.g. imagenet256,
        # keep its data.image_size): checked against the manifest, which holds the size they came from.
        self.expected_image_size = image_size
        self._manifest: dict[str, Any] | None = None

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            manifest = read_manifest(self.path)
            size = manifest["data"]["image_size"]
            if self.expected_image_size is not None and size != self.expected_image_size:
                raise ValueError(
                    f"data.image_size={self.expected_image_size}, but the latents in {self.path} were "
                    f"extracted from {size}px images: extract them at {self.expected_image_size}px or set "
                    f"data.image_size={size}"
                )
            self._manifest = manifest
        return self._manifest

    @property
    def class_names(self) -> list[str]:
        return self.manifest["data"]["class_names"]

    @property
    def image_size(self) -> int:
        return self.manifest["data"]["image_size"]

    @property
    def channels(self) -> int:
        return self.manifest["data"]["channels"]

    @property
    def source(self) -> str:
        return self.manifest["data"]["source"]

    @property
    def latent_shape(self) -> tuple[int, int]:
        """(latent channels, latent size) of the stored latents."""
        channels, size = self.manifest["latent_shape"]
        return channels, size

    @property
    def autoencoder_config(self) -> dict[str, Any]:
        """The config (with `_target_`) of the autoencoder that encoded the latents, for decoding samples."""
        return self.manifest["autoencoder"]

    def model_input_shape(self, autoencoder: Autoencoder) -> tuple[int, int]:
        """The stored latents' (channels, size), after checking that `autoencoder` produces the same."""
        expected = autoencoder.latent_shape(self.channels, self.image_size)
        if expected != self.latent_shape or autoencoder.scale_factor != self.manifest["scale_factor"]:
            raise ValueError(
                f"the latents in {self.path} ({self.latent_shape}, scale {self.manifest['scale_factor']}) "
                f"come from {self.autoencoder_config}, but the configured autoencoder gives {expected}, scale "
                f"{autoencoder.scale_factor}; configure the autoencoder the latents were extracted with"
            )
        return self.latent_shape

    def build_dataset(self, split: str, random_flip: bool) -> LatentDataset | None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        path = self.path if split == "train" else self.val_path
        if path is None:
            return None
        dataset = LatentDataset(path, random_flip)
        manifest = read_manifest(path)
        if manifest["latent_shape"] != self.manifest["latent_shape"] or manifest["data"]["class_names"] != (
            self.class_names
        ):
            raise ValueError(f"the latents in {path} differ in shape or classes from those in {self.path}")
        if random_flip and manifest["views"] == 1:
            rank_zero_warn(
                f"random_flip is on but {path} holds no mirrored copies (extracted with flip=false); "
                "training without flips. Extract with flip=true for the paper's augmentation."
            )
        return dataset
