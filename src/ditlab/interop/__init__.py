"""Checkpoints in and out: every DiT weight format, safetensors and diffusers exports, ADM-format sampling."""

from ditlab.interop.checkpoints import (
    LoadedDiT,
    describe,
    export_safetensors,
    infer_config,
    init_from_checkpoint,
    load_dit,
    resolve_checkpoint,
)

__all__ = [
    "LoadedDiT",
    "describe",
    "export_safetensors",
    "infer_config",
    "init_from_checkpoint",
    "load_dit",
    "resolve_checkpoint",
]
