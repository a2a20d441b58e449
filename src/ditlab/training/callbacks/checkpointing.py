"""When a training run writes its checkpoints: so that no more than the stated interval is ever lost."""

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ditlab.io import is_disk_full

LAST = "last.ckpt"


class Checkpointing(L.Callback):
    """Writes `<dirpath>/last.ckpt` (the full training state: weights, EMA, optimizer, step, RNG):

    - every `every_n_steps` steps, also as `step_<step>.ckpt`, of which the newest `keep_last` are kept;
    - every `every_minutes` minutes of training (checked every 10 steps, agreed across processes);
    - when training ends, before any end-of-run callback (FID, grids, run record) runs, so a failing
      one cannot lose the run (`src/train.py` puts this callback first);
    - on SIGTERM (SLURM pre-emption) and Ctrl-C, after the current step.

    Why not Lightning's ModelCheckpoint (with OnExceptionCheckpoint for SIGTERM): it saves by steps or by
    a train-time interval, not both (mutually exclusive options); Lightning moves it after the other
    callbacks, so at the end it would write after the FID; a run resumed in place gets `last-v1.ckpt`;
    and a full disk ends the run instead of keeping the previous checkpoint.

    There is one `last.ckpt`: a run resumed in its own folder overwrites it (Lightning's ModelCheckpoint
    would start `last-v1.ckpt`). Writes are atomic (`AtomicCheckpointIO`); a write that fails for a full
    disk keeps the previous checkpoint, says so in one line and training goes on. `setup` checks, before
    the first step, that the folder is writable and has room for two checkpoints.
    """

    TIME_CHECK_EVERY = 10  # steps between clock checks (each one is a broadcast under DDP)

    def __init__(
        self, dirpath: str, every_n_steps: int = 5000, every_minutes: float | None = 5.0, keep_last: int = 3
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.checkpointing.every_n_steps={every_n_steps} must be ≥ 1")
        if every_minutes is not None and every_minutes <= 0:
            raise ValueError(
                f"callbacks.checkpointing.every_minutes={every_minutes} must be > 0 (or null: off)"
            )
        if keep_last < 0:
            raise ValueError(f"callbacks.checkpointing.keep_last={keep_last} must be ≥ 0")
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.every_minutes, self.keep_last = every_n_steps, every_minutes, keep_last
        self.saved: Path | None = None  # the newest checkpoint written by this run
        self.saved_step: int | None = None
        self._last_save = time.monotonic()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        import shutil

        try:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            probe = self.dirpath / ".write-test"
            probe.write_bytes(b"ditlab")
            probe.unlink()
        except OSError as err:
            raise ValueError(
                f"cannot write checkpoints to {self.dirpath} ({err.strerror}); run where you can write, e.g. "
                "hydra.run.dir=<a writable folder> (hydra.sweep.dir= for -m)"
            ) from None
        needed = checkpoint_bytes(pl_module)
        free = shutil.disk_usage(self.dirpath).free
        if free < 2 * needed:  # the new file is written beside the previous one before it replaces it
            raise ValueError(
                f"{self.dirpath} has {free / 2**20:.0f} MiB free; a checkpoint of this run takes "
                f"~{needed / 2**20:.0f} MiB and two must fit: free some space or set hydra.run.dir elsewhere"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_save = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.fast_dev_run:
            return
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            self.save(trainer, numbered=True)
        elif self.every_minutes is not None and step % self.TIME_CHECK_EVERY == 0:
            due = time.monotonic() - self._last_save >= 60 * self.every_minutes
            if trainer.strategy.broadcast(due, src=0):  # one decision for all ranks: saving is collective
                self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run and self.saved_step != trainer.global_step:
            self.save(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if (
            isinstance(exception, SIGTERMException | KeyboardInterrupt)
            and self.saved_step != trainer.global_step
        ):
            self.save(trainer)

    def save(self, trainer: L.Trainer, numbered: bool = False) -> None:
        """last.ckpt (and step_<step>.ckpt when `numbered`); a full disk keeps the previous file."""
        step = trainer.global_step
        targets = [self.dirpath / LAST] + (
            [self.dirpath / f"step_{step:07d}.ckpt"] if numbered and self.keep_last else []
        )
        for path in targets:
            full = False
            try:
                trainer.save_checkpoint(path, weights_only=False)
            except OSError as err:
                if not is_disk_full(err):
                    raise
                # The writer (rank 0) left save_checkpoint before its barrier: meet the other ranks there.
                full = True
                trainer.strategy.barrier("ditlab.checkpointing")
            if trainer.strategy.broadcast(full, src=0):  # every rank skips the rest alike
                if trainer.is_global_zero:
                    kept = (
                        f"{self.saved} (step {self.saved_step}) is kept" if self.saved else "none was written"
                    )
                    print(
                        f"[ditlab] disk full: could not write {path} at step {step}; {kept}. Free space to save again."
                    )
                return
        self.saved, self.saved_step = self.dirpath / LAST, step
        self._last_save = time.monotonic()
        if numbered and trainer.is_global_zero:
            for old in sorted(self.dirpath.glob("step_*.ckpt"))[: -self.keep_last or None]:
                old.unlink(missing_ok=True)


def checkpoint_bytes(pl_module: L.LightningModule) -> int:
    """The size of a checkpoint of this module, roughly: its state dict (weights, EMA, buffers) plus
    AdamW's two moments per trainable parameter, plus 1% for the rest."""
    state = sum(t.numel() * t.element_size() for t in pl_module.state_dict().values())
    moments = sum(2 * p.numel() * 4 for p in pl_module.parameters() if p.requires_grad)
    return math.ceil(1.01 * (state + moments))
