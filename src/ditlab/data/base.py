"""What every ditlab datamodule shares: loader settings, the properties the model is built from, and an
in-memory image dataset served in whole batches."""

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset, Subset

from ditlab.autoencoders import Autoencoder
from ditlab.data.resumable import GlobalBatchSampler, ResumableDataLoader


def collate_batched(batch: Any) -> Any:
    """Collate for datasets whose `__getitems__` already returns the whole batch."""
    return batch


def split_views(indices: Sequence[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices i + N·v (see `GlobalBatchSampler`) -> (example indices i, views v), each (B,) int64."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    return idx % n, idx // n


class ViewSubset(Subset):
    """A Subset that passes views through: index i + len(self)·v is view v of its i-th example."""

    def __getitems__(self, indices: Sequence[int]) -> Any:
        n, full = len(self.indices), len(self.dataset)
        return self.dataset.__getitems__([self.indices[i % n] + full * (i // n) for i in indices])

    def __getitem__(self, index: int) -> Any:
        n = len(self.indices)
        return self.dataset[self.indices[index % n] + len(self.dataset) * (index // n)]


class InMemoryImageDataset(Dataset):
    """uint8 images (N, C, H, W) held in memory, served as whole batches.

    `__getitems__` gathers a batch with one index operation and mirrors it with one `torch.where`, so a
    training step is not bound by per-image Python work. Returns (x, y): x float32 (B, C, H, W) in
    [-1, 1], y int64 (B,). Use with `collate_fn=collate_batched`. With `random_flip`, index i + N is the
    mirror image of example i (`num_views` = 2); `GlobalBatchSampler` draws which one a batch gets.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, random_flip: bool):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images = images
        self.labels = labels.long()
        self.random_flip = random_flip
        self.num_views = 2 if random_flip else 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx, view = split_views(indices, len(self.images))
        if not self.random_flip and bool((view > 0).any()):
            raise IndexError(f"index out of range for {len(self.images)} images without flips")
        x = self.images[idx].float().div_(127.5).sub_(1.0)
        if self.random_flip:
            x = torch.where((view == 1)[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]


class ImageDataModule(L.LightningDataModule, ABC):
    """Base of the ditlab datamodules.

    Subclasses define `build_dataset(split, random_flip)` and the properties `num_classes`,
    `class_names`, `image_size`, `channels` and `source` (these work before `setup`, so the model can be
    built first). `batch_size` is per device: the training module may set it before the loaders are made.
    There is no `val_dataloader`: training has no validation loop (Lightning would warn of a loader without a
    `validation_step`); the FID reads the validation split itself (`build_dataset("val", ...)`).
    """

    is_latent = False  # batches are images in [-1, 1]; LatentDataModule serves encoded latents
    collate_fn: Callable | None = None  # None: torch's default collate

    def __init__(
        self,
        *,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        random_flip: bool,
        limit_train_samples: int | None,
    ):
        super().__init__()
        if limit_train_samples is not None and limit_train_samples < 1:
            raise ValueError(
                f"limit_train_samples must be a positive count or null, got {limit_train_samples}"
            )
        self.batch_size = batch_size
        # Set by the training code: the global batch (default batch_size × world size) and the seed of
        # the epoch permutations of GlobalBatchSampler.
        self.global_batch_size: int | None = None
        self.seed = 0
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.random_flip = random_flip
        self.limit_train_samples = limit_train_samples
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @abstractmethod
    def build_dataset(self, split: str, random_flip: bool) -> Dataset | None:
        """The dataset of `split` ("train" or "val"); None when the source has no such split."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    @abstractmethod
    def class_names(self) -> list[str]: ...

    @property
    @abstractmethod
    def image_size(self) -> int: ...

    @property
    @abstractmethod
    def channels(self) -> int: ...

    @property
    @abstractmethod
    def source(self) -> str:
        """Where the data is read from (recorded in latent manifests)."""

    def model_input_shape(self, autoencoder: Autoencoder) -> tuple[int, int]:
        """(in_channels, input_size) of the diffusion model: the data seen through `autoencoder`."""
        return autoencoder.latent_shape(self.channels, self.image_size)

    def train_subset(self, dataset: Dataset) -> Dataset:
        """`limit_train_samples` examples of `dataset`, a fixed random subset (all classes, not the first)."""
        if self.limit_train_samples is None or self.limit_train_samples >= len(dataset):
            return dataset
        generator = torch.Generator().manual_seed(0)
        keep = torch.randperm(len(dataset), generator=generator)[: self.limit_train_samples].sort().values
        return ViewSubset(dataset, keep.tolist())

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self.train_subset(self.build_dataset("train", self.random_flip))
            self.val_set = self.build_dataset("val", random_flip=False)

    def loader_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
            "collate_fn": self.collate_fn,
        }

    def train_dataloader(self) -> ResumableDataLoader:
        """This rank's share of each global batch (the last partial one dropped), resumable mid-epoch."""
        self.setup("fit")
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        global_batch_size = self.global_batch_size or self.batch_size * world_size
        num_views = getattr(self.train_set, "num_views", None) or getattr(
            self.train_set.dataset, "num_views", 1
        )
        sampler = GlobalBatchSampler(
            len(self.train_set), global_batch_size, rank, world_size, self.seed, num_views=num_views
        )
        return ResumableDataLoader(self.train_set, sampler, **self.loader_options())
