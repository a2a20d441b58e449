"""Grids of EMA samples with guidance, one row per class, saved as PNG and logged to W&B."""

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import make_grid, save_image

from ditlab.diffusion.sampling import SAMPLERS, get_sampler


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
        sampler_options: dict[str, Any] | None = None,
        cfg_interval: tuple[float, float] | None = None,
        steps: int = 50,
        seed: int = 0,
    ):
        for key, value, low in (
            ("per_class", per_class, 1),
            ("max_classes", max_classes, 1),
            ("steps", steps, 1),
        ):
            if value < low:
                raise ValueError(f"callbacks.sample_grid.{key}={value} must be ≥ {low}")
        if cfg_scale < 0:
            raise ValueError(f"callbacks.sample_grid.cfg_scale={cfg_scale} must be ≥ 0 (1: no guidance)")
        if sampler not in SAMPLERS:
            raise ValueError(f"callbacks.sample_grid.sampler={sampler!r}; valid: {', '.join(SAMPLERS)}")
        # Built once here so that a bad option fails before training, with the sampler named.
        get_sampler(sampler, **(sampler_options or {}))
        self.sampler_options = dict(sampler_options or {})
        self.cfg_interval = tuple(cfg_interval) if cfg_interval is not None else None
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
            images, _ = pl_module.sample(
                labels,
                seed=self.seed,
                cfg_scale=self.cfg_scale,
                cfg_interval=self.cfg_interval,
                sampler=self.sampler,
                sampler_options=self.sampler_options,
                steps=self.steps,
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
