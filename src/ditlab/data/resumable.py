"""A training loader whose global batches do not depend on the number of processes, and which resumes
mid-epoch at the exact batch where a checkpoint was taken.

Epoch e shuffles the dataset with a generator seeded by (seed, e); global batch g is
perm[g·G : (g+1)·G] for the global batch size G, and rank r of R takes its r-th contiguous chunk of
G/R indices. One process with batch G and R processes with G/R each therefore see the same examples
per step. Lightning saves `state_dict()` in checkpoints and calls `load_state_dict()` on resume, so use
it with `Trainer(use_distributed_sampler=False)`.

Augmentation is drawn here too, so that no data randomness depends on process count, worker seeds or
when a batch was prefetched: a dataset with `num_views` V > 1 (V = 2: the image and its mirror) reads
index i + N·v as view v of example i (N = len(dataset)), and the sampler draws v uniformly.
"""

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's index lists of every global batch of an epoch, from `start_batch` on."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_views: int = 1,
    ):
        if global_batch_size % world_size != 0:
            raise ValueError(
                f"global batch size {global_batch_size} is not divisible by the {world_size} processes; "
                "choose a global batch size that is a multiple of devices × nodes"
            )
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} examples, fewer than one global batch of {global_batch_size}"
            )
        self.num_samples = num_samples
        self.num_views = num_views
        self.global_batch_size = global_batch_size
        self.batch_size = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.num_samples // self.global_batch_size  # the last partial batch is dropped

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=generator)
        views = torch.randint(self.num_views, (self.num_samples,), generator=generator)
        perm += self.num_samples * views  # index i + N·v: view v of example i
        for g in range(self.start_batch, len(self)):
            begin = g * self.global_batch_size + self.rank * self.batch_size
            yield perm[begin : begin + self.batch_size].tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `GlobalBatchSampler` that counts the batches it has handed out (not those its
    workers prefetched), so its `state_dict` names the exact position in the epoch."""

    def __init__(self, dataset: Dataset, batch_sampler: GlobalBatchSampler, **kwargs: Any):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.epoch = 0
        self.batches_done = 0

    def __iter__(self) -> Iterator[Any]:
        sampler: GlobalBatchSampler = self.batch_sampler
        sampler.epoch, sampler.start_batch = self.epoch, self.batches_done
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch
        self.epoch += 1
        self.batches_done = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
