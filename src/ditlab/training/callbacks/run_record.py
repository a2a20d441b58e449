"""The run record, `<output_dir>/results.json`: a run's coordinates, seed, Gflops, parameters, training
compute and FID, kept up to date for `src/report.py` (schema: `ditlab.report.records`)."""

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from ditlab.io import atomic_write_text

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


class RunRecord(L.Callback):
    """Logs Gflops, parameters and the design-space coordinates at the start of fit (metrics, config, W&B
    summary) and keeps `<output_dir>/results.json` (coordinates, Gflops, params, steps, images seen,
    training compute = Gflops × 3 × images) up to date for `src/report.py`."""

    def __init__(self, output_dir: str):
        self.output_dir = Path(output_dir)

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
        run_name = "-".join(
            [
                str(coordinates.get("block", "")),
                str(coordinates.get("model", "")),
                f"p{coordinates.get('patch', '')}",
            ]
        )
        update_run_record(
            self.output_dir,
            run_name=run_name,
            coordinates=coordinates,
            seed=pl_module.seed,
            **summary,
            data=pl_module.info.get("data", {}).get("name"),
            wandb=wandb or None,
        )
        print(
            f"[ditlab] {summary['params_m']:.2f}M parameters, {summary['gflops']:.3f} Gflops per forward pass"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            seen = images_seen(trainer)
            gflops = pl_module.complexity()["gflops"]
            update_run_record(
                self.output_dir,
                step=trainer.global_step,
                images_seen=seen,
                train_compute_gflop=gflops * 3 * seen,
            )
