"""Grids of EMA samples with guidance, one labelled row per class (`ditlab.grids`), saved as PNG and logged to
W&B."""

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from ditlab.diffusion.sampling import SamplingSpec, guide_options
from ditlab.grids import grid_title, save_grid
from ditlab.interop.formats import config_coordinates
from ditlab.interop.generation import to_uint8_rgb


class SampleGrid(L.Callback):
    """Every `every_n_steps` and at the end of training: a grid of EMA samples with guidance, one row
    per class (`per_class` columns) labelled with the class's name, under a title naming the design point,
    the step and the sampling (`ditlab.grids.grid_image`), saved as PNG under `<output_dir>/samples/` and
    logged to W&B. `guide` ({ckpt, scale}: the run's `guide` node by default): autoguidance beside the
    classifier-free guidance of `cfg_scale` (`DiTModule.guide_model`, checked in `setup`, before the first
    step)."""

    def __init__(
        self,
        output_dir: str,
        every_n_steps: int = 1000,
        per_class: int = 8,
        max_classes: int = 10,
        cfg_scale: float = 4.0,
        sampler: str = "ddim",
        sampler_options: dict[str, Any] | None = None,
        cfg_interval: tuple[float, float] | None = None,
        steps: int = 50,
        seed: int = 0,
        guide: dict[str, Any] | None = None,
    ):
        for key, value in (("per_class", per_class), ("max_classes", max_classes)):
            if value < 1:
                raise ValueError(f"callbacks.sample_grid.{key}={value} must be ≥ 1")
        # Validated here, before training, naming the keys as the config spells them.
        self.sampling = SamplingSpec(
            sampler,
            sampler_options,
            steps,
            cfg_scale,
            cfg_interval,
            seed=seed,
            **guide_options(guide, "callbacks.sample_grid.guide"),
            key="callbacks.sample_grid.",
        )
        self.output_dir = Path(output_dir) / "samples"
        self.every_n_steps = every_n_steps
        self.per_class = per_class
        self.max_classes = max_classes
        self.last_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the first step: the guide (with one) fits the model, so a run does not fail at its first grid."""
        if stage == "fit" and not trainer.fast_dev_run and self.sampling.guide is not None:
            pl_module.guide_model(self.sampling.guide, "callbacks.sample_grid.guide.ckpt")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if (
            self.every_n_steps > 0
            and trainer.global_step % self.every_n_steps == 0
            and not trainer.fast_dev_run
        ):
            self.make_grid(trainer, pl_module, f"step_{trainer.global_step:07d}.png")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:  # a smoke test of the loop: no grid
            self.make_grid(trainer, pl_module, "final.png")

    @rank_zero_only
    def make_grid(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        num_classes = min(pl_module.ema.num_classes, self.max_classes)
        labels = torch.arange(num_classes, device=pl_module.device).repeat_interleave(self.per_class)
        with trainer.precision_plugin.forward_context():
            images, _ = pl_module.sample(labels, self.sampling)
        info = pl_module.info
        title = grid_title(
            info.get("coordinates") or config_coordinates(pl_module.model.config),
            step=trainer.global_step,
            weights="EMA",
            sampler=self.sampling.sampler,
            steps=self.sampling.steps,
            cfg_scale=self.sampling.cfg_scale,
            guide_scale=self.sampling.guide_scale,
        )
        self.last_path = self.output_dir / name
        grid = save_grid(
            self.last_path,
            to_uint8_rgb(images.float()).cpu().numpy(),
            labels.tolist(),
            per_row=self.per_class,
            class_names=info.get("data", {}).get("class_names"),
            title=title,
        )
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):  # the labelled grid, as saved
                logger.log_image("samples", [grid], step=trainer.global_step, caption=[title])
