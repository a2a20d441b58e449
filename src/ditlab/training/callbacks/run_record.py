"""The run record, `<output_dir>/results.json`: a run's coordinates, seed, Gflops, parameters, training
compute and FID, and how it was made (config, source commit, device, versions, wall times), kept up to
date for `src/report.py` (schema: `ditlab.report.records`)."""

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from ditlab.design import default_axes, point_name
from ditlab.io import atomic_write_text
from ditlab.provenance import device_name, git_state, versions

RESULTS_FILE = "results.json"


def update_run_record(output_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merges `fields` into `<output_dir>/results.json`, written atomically; returns the record."""
    path = Path(output_dir) / RESULTS_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(fields)
    atomic_write_text(path, json.dumps(record, indent=2))
    return record


def images_seen(trainer: L.Trainer) -> int:
    return trainer.global_step * trainer.datamodule.batch_size * trainer.world_size


def train_compute_gflop(trainer: L.Trainer, pl_module: L.LightningModule) -> float:
    """Training compute so far: 3 × forward Gflops × images seen, each step at the forward it ran
    (`DiTModule.train_compute_gflop`: masked training's masked steps at the masked pass)."""
    return pl_module.train_compute_gflop(
        trainer.global_step, trainer.datamodule.batch_size * trainer.world_size
    )


class RunRecord(L.Callback):
    """Logs Gflops, parameters and the design-space coordinates at the start of fit (metrics, config, W&B
    summary) and keeps `<output_dir>/results.json` (coordinates, Gflops, params, the model's config,
    precision, learning rate and EMA decay, steps, images seen, training compute = Gflops × 3 × images, each
    step at the pass it ran: `train_compute_gflop`) up
    to date for `src/report.py`, which averages runs over seeds only where all of these are equal.

    The record also says how the run was made: `config` (the run's whole resolved config, set by
    `ditlab.training.run.train`), `git` (the source tree's commit and whether it had changes), `device`,
    `world_size`, `versions`, and `train_seconds`, the wall time of training (FIDs along the run included:
    each `fid_history` point holds its `seconds`), summed over resumes through the checkpoint."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)
        self.config: dict[str, Any] | None = None  # set by `train` once devices and sampler are resolved
        self._seconds_before = 0.0  # trained before a resume (from the checkpoint)
        self._started: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        summary = pl_module.complexity()
        wandb = {}
        for logger in trainer.loggers:
            logger.log_hyperparams({"model/gflops": summary["gflops"], "model/params_m": summary["params_m"]})
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(summary)
                run = logger.experiment
                wandb = {"project": run.project, "entity": run.entity, "id": run.id}
        coordinates = pl_module.info.get("coordinates", {})
        run_name = point_name(coordinates)  # the run folder's and the W&B run's name
        update_run_record(
            self.output_dir,
            run_name=run_name,
            coordinates=coordinates,
            axis_defaults=default_axes(),  # the paper's values, a user's axes included, for the report
            seed=pl_module.seed,
            **summary,
            data=pl_module.info.get("data", {}).get("name"),
            model_config=dict(pl_module.model.config),  # the size (depth, width, heads) beyond the name
            precision=str(trainer.precision),
            lr=trainer.optimizers[0].defaults["lr"],
            ema_decay=pl_module.ema_decay,
            wandb=wandb or None,
            device=device_name(pl_module.device),
            world_size=trainer.world_size,
            versions=versions(),
            git=git_state(),
            config=self.config,
        )
        masked = summary.get("gflops_train_forward")
        masked = "" if masked is None else f" ({masked:.3f} in masked training)"
        print(
            f"[ditlab] {summary['params_m']:.2f}M parameters, {summary['gflops']:.3f} Gflops per forward pass"
            + masked
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()

    def train_seconds(self) -> float:
        """Wall time of training so far, over every resume of the run."""
        if self._started is None:
            return self._seconds_before
        return self._seconds_before + time.monotonic() - self._started

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._seconds_before = state_dict["train_seconds"]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            update_run_record(
                self.output_dir,
                step=trainer.global_step,
                images_seen=images_seen(trainer),
                train_compute_gflop=train_compute_gflop(trainer, pl_module),
                train_seconds=self.train_seconds(),
            )
