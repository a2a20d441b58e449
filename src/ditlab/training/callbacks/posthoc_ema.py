"""Post-hoc EMA (EDM2, Karras et al. 2024): power-function EMAs of the weights tracked during training and
saved as snapshots, from which `src/posthoc_ema.py` reconstructs the EMA of any profile afterwards."""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy

from ditlab.io import checkpoint_header, is_disk_full
from ditlab.training.posthoc_ema import SNAPSHOT_FOLDER, PowerFunctionEMA, sigma_rel_to_gamma, write_snapshot

KEY = "callbacks.posthoc_ema"
# Snapshots a run keeps when every_n_steps is derived from max_steps: EDM2's reconstructions need a few
# tens per profile, and each one is a model's weights on disk.
TARGET_SNAPSHOTS = 32


class PostHocEMA(L.Callback):
    """With `enabled`: one power-function EMA of the model's weights per σ_rel of `sigma_rels` (EDM2's
    0.05 and 0.10), updated after every optimizer step (β_t = (1 − 1/t)^(γ+1): `ditlab.training.posthoc_ema`),
    and every `every_n_steps` steps (null: trainer.max_steps / 32, rounded up) and at the end of training a
    snapshot of each, `<output_dir>/posthoc_ema/step_<step>-sigma_rel_<σ>.safetensors` (written atomically:
    the model's state dict with the average as its parameters, the step, σ_rel, γ and the run's ditlab
    header as metadata; it loads like an export).

    The snapshots stay out of the checkpoints; the running averages are this callback's state in them, so
    a resumed run continues them exactly. A run resumed from a checkpoint without them (post-hoc EMA off
    until then) is refused: a profile weighs every step from the first.

    Beside the classic EMA of the module (`optim.ema_decay`, the samples' and the FID's), which it leaves
    as it is. Off by default (`enabled: false`): two more copies of the weights on the device, and the
    snapshots on disk.
    """

    def __init__(
        self,
        output_dir: str,
        enabled: bool = False,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        every_n_steps: int | None = None,
    ) -> None:
        self.gammas = [sigma_rel_to_gamma(s, f"{KEY}.sigma_rels") for s in sigma_rels]
        self.sigma_rels = [float(s) for s in sigma_rels]
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"{KEY}.sigma_rels={self.sigma_rels} must be distinct values, e.g. [0.05,0.10]")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(
                f"{KEY}.every_n_steps={every_n_steps} must be ≥ 1 (or null: from trainer.max_steps)"
            )
        self.enabled = enabled
        self.folder = Path(output_dir) / SNAPSHOT_FOLDER
        self.every_n_steps = every_n_steps
        self.ema: PowerFunctionEMA | None = None
        self.names: list[str] = []
        self.snapshot_step: int | None = None  # the step of the newest snapshots written
        self._loaded: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled or stage != "fit" or trainer.fast_dev_run:
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                f"{KEY}.enabled=true does not support FSDP (its averages would be shards of the weights): "
                "use trainer=ddp, or turn it off"
            )
        if self.every_n_steps is None:
            if trainer.max_steps < 1:
                raise ValueError(f"{KEY}.every_n_steps=null needs trainer.max_steps: set every_n_steps")
            self.every_n_steps = math.ceil(trainer.max_steps / TARGET_SNAPSHOTS)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or trainer.fast_dev_run:
            return
        # Built here, not in setup: the weights are on their device and a resumed run's are restored.
        named = list(pl_module.model.named_parameters())
        self.names = [name for name, _ in named]
        self.ema = PowerFunctionEMA([p for _, p in named], self.gammas)
        step = trainer.global_step
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        elif step > 0:
            raise ValueError(
                f"{KEY}.enabled=true on a run resumed at step {step} whose checkpoint has no post-hoc EMA: its "
                "profiles weigh every step from the first; enable it from the start of a run"
            )
        if self.ema.step != step:
            raise ValueError(
                f"the checkpoint's post-hoc EMA is at step {self.ema.step}, its weights at step {step}: "
                "resume from a checkpoint written by ditlab's training"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # Once per optimizer step (gradient accumulation calls this once per batch).
        if self.ema is not None and trainer.global_step > self.ema.step:
            self._advance(trainer, pl_module)

    def _advance(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ema.update(list(pl_module.model.parameters()))
        if self.ema.step % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is None:
            return
        if self.snapshot_step != self.ema.step:  # the last step: reconstructions at the end of the run
            self.save(trainer, pl_module)
        if trainer.is_global_zero:
            print(
                f"[ditlab] post-hoc EMA: snapshots of σ_rel {', '.join(f'{s:g}' for s in self.sigma_rels)} every "
                f"{self.every_n_steps} steps in {self.folder}; reconstruct any σ_rel with python "
                f"src/posthoc_ema.py run={self.folder.parent} 'sigma_rel=[0.03,0.05,0.1,0.2]'"
            )

    def save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One snapshot per profile at the current step (rank 0 writes; the averages are alike on all ranks).
        A full disk skips them with one line and training goes on: the reconstruction uses those there are."""
        step = self.ema.step
        self.snapshot_step = step
        if not trainer.is_global_zero:
            return
        header = checkpoint_header(pl_module.model.config, **pl_module.info)
        averaged = set(self.names)
        state = {  # the buffers (the position table), as they are
            k: v.detach().to("cpu", copy=True)
            for k, v in pl_module.model.state_dict().items()
            if k not in averaged
        }
        copied = list(state)
        for sigma_rel, gamma, averages in zip(self.sigma_rels, self.gammas, self.ema.averages, strict=True):
            state |= {name: a.to("cpu", copy=True) for name, a in zip(self.names, averages, strict=True)}
            try:
                write_snapshot(self.folder, step, sigma_rel, gamma, state, copied, header)
            except OSError as err:
                if not is_disk_full(err):
                    raise
                print(
                    f"[ditlab] disk full: could not write the post-hoc EMA snapshots of step {step} in {self.folder}"
                )
                return

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Checkpointing writes in its on_train_batch_end, which runs before this callback's (run.py puts it
        # first): the update of the checkpoint's step, from the weights it holds, comes first, so that a
        # checkpoint holds the averages of its own step (Lightning took `state_dict` just before this hook).
        if self.ema is not None and trainer.global_step > self.ema.step:
            self._advance(trainer, pl_module)
            checkpoint["callbacks"][self.state_key] = self.state_dict()

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        return {
            "sigma_rels": self.sigma_rels,
            "step": self.ema.step,
            "names": self.names,
            "averages": [dict(zip(self.names, a, strict=True)) for a in self.ema.averages],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.enabled:
            print(f"[ditlab] {KEY}.enabled=false: the checkpoint's post-hoc EMA profiles are dropped")
            return
        if state_dict["sigma_rels"] != self.sigma_rels:
            tracked = ",".join(f"{s:g}" for s in state_dict["sigma_rels"])
            raise ValueError(
                f"{KEY}.sigma_rels={self.sigma_rels} but the checkpoint tracked {state_dict['sigma_rels']}: resume "
                f"with {KEY}.sigma_rels=[{tracked}]"
            )
        self._loaded = state_dict  # restored in on_train_start, once the averages exist on their device

    def _restore(self, state: dict[str, Any]) -> None:
        if state["names"] != self.names:
            raise ValueError("the checkpoint's post-hoc EMA averages are of another model's parameters")
        for averages, saved in zip(self.ema.averages, state["averages"], strict=True):
            for average, name in zip(averages, self.names, strict=True):
                average.copy_(saved[name])
        self.ema.step = state["step"]
