"""Training progress on the console: Lightning's tqdm bar on a terminal, whole lines in a log file."""

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


def progress_bar(refresh_rate: int = 10, line_every_n_steps: int = 100) -> ProgressBar:
    """The bar, redrawn every `refresh_rate` steps, when stdout is a terminal; else (output redirected to a
    file) `LineProgress`: tqdm's carriage returns would make one line of a whole epoch there."""
    if sys.stdout.isatty():
        return TQDMProgressBar(refresh_rate=refresh_rate)
    return LineProgress(every_n_steps=line_every_n_steps)


class LineProgress(ProgressBar):
    """One line every `every_n_steps` optimizer steps and one at the end of training: the step, the elapsed
    time and the progress-bar metrics (reading them is a host sync on GPU: only on those steps)."""

    def __init__(self, every_n_steps: int = 100) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"callbacks.progress_bar.line_every_n_steps={every_n_steps} must be ≥ 1")
        self.every_n_steps = every_n_steps
        self.enabled = True
        self._start = 0.0
        self._printed_step = -1

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._print_line(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_line(trainer, pl_module)

    def _print_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not self.enabled or step == self._printed_step:  # gradient accumulation: one step, several batches
            return
        self._printed_step = step
        total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self._start))
        metrics = ", ".join(
            f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
            for key, value in self.get_metrics(trainer, pl_module).items()
        )
        print(f"step {step}{total} [{elapsed}] {metrics}", flush=True)  # flushed: a log shows it now
