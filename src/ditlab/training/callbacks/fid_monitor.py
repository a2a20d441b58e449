"""FID of EMA samples during and at the end of training, against cached reference statistics."""

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader, Subset

from ditlab.diffusion.sampling import SamplingSpec
from ditlab.io import atomic_write
from ditlab.training.callbacks.run_record import images_seen, update_run_record


def datamodule_reference(
    datamodule: Any,
    net: torch.nn.Module,
    num_images: int,
    cache_dir: Any,
    batch_size: int,
    device: torch.device,
) -> Any:
    """Statistics of `num_images` images of the datamodule's validation split (its training split when it
    has none), drawn once with a fixed seed, cached under `cache_dir` (the FID reference of a run whose
    `callbacks.fid.reference` is null; also what `experiments/fid_seed_spread.py` compares against)."""
    from ditlab.metrics.reference import cached_reference, reference_from_images

    split = "val" if datamodule.build_dataset("val", random_flip=False) is not None else "train"
    dataset = datamodule.build_dataset(split, random_flip=False)
    n = min(num_images, len(dataset))
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n].tolist()
    loader = DataLoader(Subset(dataset, keep), batch_size=batch_size, collate_fn=datamodule.collate_fn)
    batches = ((x + 1) / 2 for x, _ in loader)
    source = f"{type(datamodule).__name__} {split} ({n} images of {datamodule.source})"
    return cached_reference(
        f"{type(datamodule).__name__}-{split}-{datamodule.image_size}px-{n}",
        net,
        lambda: reference_from_images(batches, net, source=source, num_pr_images=0, device=device),
        cache_dir=cache_dir,
        fingerprint=f"{datamodule.source}|{keep[:8]}",
    )


class FIDMonitor(L.Callback):
    """FID of `num_samples` EMA samples (labels uniform over the classes) against reference statistics,
    every `every_n_steps` steps (0: never) and at the end of training.

    The reference is an ADM `.npz`, an image folder or `fashion_mnist_test` (`reference=`), or, when
    null, `num_reference_images` images of the datamodule's validation split (its training split when it
    has none), drawn once with a fixed seed; its statistics are cached (`cache_dir`). Samples are split
    across ranks (each image seeded by its index, so the set does not depend on the batch size or the
    number of processes: `ditlab.diffusion.sampling`); features are gathered and rank 0 computes the FID with torchmetrics. Logged as `fid`
    with the run's Gflops, parameters and training compute so far (`train_compute_gflop`), and recorded
    in `results.json` with its wall time (`fid_seconds`; each `fid_history` point's `seconds`). Features come from the TensorFlow Inception-v3 (see `ditlab.metrics.features`).
    """

    def __init__(
        self,
        output_dir: str,
        every_n_steps: int = 0,
        num_samples: int = 1000,
        reference: str | None = None,
        num_reference_images: int = 10_000,
        sampler: str = "ddim",
        sampler_options: dict[str, Any] | None = None,
        cfg_interval: tuple[float, float] | None = None,
        steps: int = 50,
        cfg_scale: float = 1.0,
        batch_size: int = 100,
        seed: int = 0,
        cache_dir: str | None = None,
        inception: str | None = None,
        save_samples: bool = False,
    ):
        for key, value, low in (("num_samples", num_samples, 2), ("batch_size", batch_size, 1)):
            if value < low:
                raise ValueError(f"callbacks.fid.{key}={value} must be ≥ {low}")
        if every_n_steps < 0:
            raise ValueError(f"callbacks.fid.every_n_steps={every_n_steps} must be ≥ 0 (0: only at the end)")
        # Validated here, before training, naming the keys as the config spells them.
        self.sampling = SamplingSpec(
            sampler, sampler_options, steps, cfg_scale, cfg_interval, seed=seed, key="callbacks.fid."
        )
        self.output_dir = Path(output_dir)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.reference = reference
        self.num_reference_images = num_reference_images
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.inception = inception
        self.save_samples = save_samples
        self.history: list[dict[str, Any]] = []
        self.last_result: dict[str, Any] | None = None
        self._net = None
        self._reference_stats = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the first training step: what the FID will need at the end is there (the Inception
        file, the reference source), so a run does not train for hours and then fail."""
        if stage != "fit" or trainer.fast_dev_run or not trainer.is_global_zero:
            return
        from ditlab.metrics.features import find_inception_torchscript
        from ditlab.metrics.reference import check_reference_source

        find_inception_torchscript(self.inception)
        if self.reference is not None:
            check_reference_source(self.reference)
        elif trainer.datamodule is not None and trainer.datamodule.is_latent:
            raise ValueError(
                "FID of a latent-space run needs reference images: set callbacks.fid.reference to an ADM "
                ".npz (e.g. VIRTUAL_imagenet256_labeled.npz) or an image folder"
            )

    def network(self, device: torch.device) -> torch.nn.Module:
        if self._net is None:
            from ditlab.metrics.features import InceptionFeatures

            self._net = InceptionFeatures(self.inception)
        return self._net.to(device)

    def reference_stats(self, trainer: L.Trainer, device: torch.device) -> Any:
        """Reference statistics, computed once (and cached on disk)."""
        if self._reference_stats is not None:
            return self._reference_stats
        from ditlab.metrics.reference import DEFAULT_CACHE_DIR, load_reference

        net = self.network(device)
        cache_dir = self.cache_dir or DEFAULT_CACHE_DIR
        if self.reference is not None:
            self._reference_stats = load_reference(self.reference, net, cache_dir=cache_dir, device=device)
            return self._reference_stats
        self._reference_stats = datamodule_reference(
            trainer.datamodule, net, self.num_reference_images, cache_dir, self.batch_size, device
        )
        return self._reference_stats

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if (
            self.every_n_steps > 0
            and trainer.global_step % self.every_n_steps == 0
            and not trainer.fast_dev_run
        ):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:  # a smoke test of the loop: no FID
            return
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self.evaluate(trainer, pl_module)

    @torch.no_grad()
    def sample_features(self, trainer: L.Trainer, pl_module: L.LightningModule) -> torch.Tensor | None:
        """Pool features (num_samples, 2048) of EMA samples, generated in shares across the ranks; None
        once a SIGTERM has arrived (pre-emption must not wait for an FID)."""
        device, world, rank = pl_module.device, trainer.world_size, trainer.global_rank
        net = self.network(device)
        per_rank = math.ceil(self.num_samples / world)
        begin, end = rank * per_rank, min((rank + 1) * per_rank, self.num_samples)
        features = torch.zeros(per_rank, net.num_features, device=device)
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (labels, uint8 images) when save_samples
        for start in range(begin, end, self.batch_size):
            if trainer.received_sigterm:
                return None
            n = min(self.batch_size, end - start)
            with trainer.precision_plugin.forward_context():  # labels uniform, drawn per image
                images, labels = pl_module.sample(None, self.sampling, indices=range(start, start + n))
            features[start - begin : start - begin + n] = net((images.float() + 1) / 2)
            if self.save_samples:
                kept.append((labels.cpu(), images.float().cpu()))
        if kept:
            self._save_samples(trainer.global_step, rank, kept)
        if world > 1:
            features = pl_module.all_gather(features).reshape(-1, net.num_features)
        return features[: self.num_samples]

    def _save_samples(self, step: int, rank: int, kept: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """`<output_dir>/samples/fid_step<step>[_rank<r>].npz` as `src/sample.py` writes them: `arr_0`
        (N, H, W, 3) uint8 and `arr_1` labels (N,), so that the same samples can be scored again later
        (`src/evaluate.py`, `experiments/class_accuracy.py --samples`)."""
        labels = torch.cat([k[0] for k in kept]).numpy()
        images = torch.cat([k[1] for k in kept])  # (N, C, H, W) in [-1, 1]
        pixels = (127.5 * images + 128.0).clamp(0, 255).to(torch.uint8)  # 128 = 127.5 + 0.5: rounds
        pixels = pixels.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()
        path = self.output_dir / "samples" / f"fid_step{step:07d}{f'_rank{rank}' if rank else ''}.npz"
        atomic_write(path, lambda f: np.savez(f, pixels, labels))

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric

        started = time.monotonic()

        skipped = f"[ditlab] SIGTERM: the FID at step {trainer.global_step} is skipped"
        if trainer.received_sigterm:  # Lightning's flag; the training loop has stopped or is stopping
            print(skipped)
            return
        if trainer.is_global_zero:
            reference = self.reference_stats(trainer, pl_module.device)
        features = self.sample_features(trainer, pl_module)
        if features is None:
            print(skipped)
            return
        if not trainer.is_global_zero:
            return
        metric = frechet_metric(PrecomputedFeatures(features.shape[1]), reference.mu, reference.sigma)
        metric.update(features.double().cpu(), real=False)
        fid = metric.compute().item()
        gflops = pl_module.complexity()["gflops"]
        seen = images_seen(trainer)
        point = {
            "step": trainer.global_step,
            "images_seen": seen,
            "train_compute_gflop": gflops * 3 * seen,
            "fid": fid,
            "seconds": time.monotonic() - started,  # sampling, features and the reference's when not cached
        }
        self.history.append(point)
        for logger in trainer.loggers:
            logger.log_metrics(
                {"fid": fid, "train_compute_gflop": point["train_compute_gflop"]}, step=trainer.global_step
            )
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(
                    {
                        "fid": fid,
                        "train_compute_gflop": point["train_compute_gflop"],
                        "fid_num_samples": self.num_samples,
                        "feature_network": self._net.identity,
                    }
                )
        self.last_result = {"fid": fid, "num_samples": self.num_samples, "reference": reference.source}
        spec = self.sampling
        update_run_record(
            self.output_dir,
            fid=fid,
            fid_num_samples=self.num_samples,
            fid_reference=reference.source,
            fid_reference_images=reference.num_images,
            feature_network=self._net.identity,
            fid_sampler=f"{spec.sampler} {spec.steps} steps, cfg {spec.cfg_scale}",
            fid_history=self.history,
            fid_seconds=point["seconds"],
        )
        print(
            f"[ditlab] step {trainer.global_step}: FID {fid:.2f} ({self.num_samples} EMA samples, {spec.sampler} "
            f"{spec.steps} steps, cfg {spec.cfg_scale}; vs {reference.source})"
        )
