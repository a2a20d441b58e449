"""Images/s and model FLOPs utilisation of a training run."""

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops


class Throughput(L.Callback):
    """Images/s and model FLOPs utilisation over windows of `trainer.log_every_n_steps` steps.

    One device sync per window (not per step); MFU sums the module's `flops_per_batch` of each batch (the
    training pass it ran: masked training's masked pass costs less than its unmasked fine-tune steps) over
    the window and divides by Lightning's table of peak device FLOP/s (CUDA only: there is no such figure
    for CPUs).

    Why not Lightning's ThroughputMonitor: it needs the batch size from a `batch_size_fn` and syncs the
    device on every step to time it; this one reads the images from the global batch and syncs once a
    window, so timing costs nothing on a GPU.
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._step0 = 0
        self._flops = 0  # of the batches since the window began
        self._peak: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self._peak = get_available_flops(device, dtype)
        self._t0, self._step0, self._flops = None, trainer.global_step, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._flops += pl_module.flops_per_batch or 0
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
            if self._peak and self._flops:
                metrics["perf/mfu"] = self._flops / seconds / self._peak
            pl_module.log_dict(metrics)
        self._t0, self._step0, self._flops = now, step, 0
