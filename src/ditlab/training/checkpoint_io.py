"""How a training run writes and reads its checkpoint files (Lightning's CheckpointIO plugin)."""

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ditlab.io import atomic_write, load_torch_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the target folder, fsyncs it, then renames it over
    the target, so an interrupted or failed write (a kill, a full disk) never leaves a corrupt file and
    keeps the previous one (Lightning's default goes through an in-memory copy and a temp file that may
    sit on another filesystem). Loads with `weights_only=True`: a checkpoint never runs code, and a file
    that is not a checkpoint, a truncated one or a refused pickle is named as such."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f), fsync=True)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict:
        return load_torch_file(path, map_location or "cpu")
