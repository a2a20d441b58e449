"""Callbacks of a ditlab run: throughput and MFU, EMA sample grids, checkpoint on SIGTERM, atomic
checkpoint files. (The run record and FID are in `fid.py`.)"""

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torchvision.utils import make_grid, save_image


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the target folder, fsyncs it, then renames it over
    the target, so an interrupted write never leaves a corrupt `last.ckpt` (Lightning's default goes
    through an in-memory copy and a temp file that may sit on another filesystem). Loads with
    `weights_only=True`: a checkpoint never runs code."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class Throughput(L.Callback):
    """Images/s and model FLOPs utilisation over windows of `trainer.log_every_n_steps` steps.

    One device sync per window (not per step); MFU uses the module's `flops_per_batch` and Lightning's
    table of peak device FLOP/s (CUDA only: there is no such figure for CPUs).
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._step0 = 0
        self._peak: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self._peak = get_available_flops(device, dtype)
        self._t0, self._step0 = None, trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % trainer.log_every_n_steps != 0:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._t0 is not None and step > self._step0:
            seconds = now - self._t0
            batches = step - self._step0
            images = batches * trainer.datamodule.batch_size * trainer.world_size
            metrics = {"perf/images_per_sec": images / seconds, "perf/sec_per_step": seconds / batches}
            if self._peak and pl_module.flops_per_batch:
                metrics["perf/mfu"] = pl_module.flops_per_batch * batches / seconds / self._peak
            pl_module.log_dict(metrics)
        self._t0, self._step0 = now, step


class SampleGrid(L.Callback):
    """Every `every_n_steps` and at the end of training: a grid of EMA samples with guidance, one row
    per class (`per_class` columns), saved as PNG under `<output_dir>/samples/` and logged to W&B."""

    def __init__(
        self,
        output_dir: str,
        every_n_steps: int = 1000,
        per_class: int = 8,
        max_classes: int = 10,
        cfg_scale: float = 4.0,
        sampler: str = "ddim",
        steps: int = 50,
        seed: int = 0,
    ):
        self.output_dir = Path(output_dir) / "samples"
        self.every_n_steps = every_n_steps
        self.per_class = per_class
        self.max_classes = max_classes
        self.cfg_scale = cfg_scale
        self.sampler = sampler
        self.steps = steps
        self.seed = seed
        self.last_path: Path | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self.make_grid(trainer, pl_module, f"step_{trainer.global_step:07d}.png")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.make_grid(trainer, pl_module, "final.png")

    @rank_zero_only
    def make_grid(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        num_classes = min(pl_module.ema.num_classes, self.max_classes)
        labels = torch.arange(num_classes, device=pl_module.device).repeat_interleave(self.per_class)
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        with trainer.precision_plugin.forward_context():
            images = pl_module.sample(
                labels, cfg_scale=self.cfg_scale, sampler=self.sampler, steps=self.steps, generator=generator
            )
        grid = make_grid(images.float().add(1).div(2), nrow=self.per_class, padding=1)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = self.output_dir / name
        save_image(grid, self.last_path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                caption = (
                    f"EMA samples, cfg {self.cfg_scale}, {self.sampler} {self.steps} steps; rows = classes"
                )
                logger.log_image("samples", [grid], step=trainer.global_step, caption=[caption])


class CheckpointOnSigterm(L.Callback):
    """On SIGTERM (SLURM pre-emption), Lightning stops after the current step; this saves
    `<dirpath>/last.ckpt` before the run exits, so `ckpt_path=.../last.ckpt` resumes it."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            self.saved = self.dirpath / "last.ckpt"
            trainer.save_checkpoint(self.saved)
