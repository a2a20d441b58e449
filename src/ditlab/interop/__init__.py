"""Checkpoints in and out: every DiT weight format, safetensors and diffusers exports, ADM-format sampling."""

from ditlab.interop.checkpoints import export_safetensors, init_from_checkpoint, load_dit
from ditlab.interop.formats import LoadedDiT, describe, infer_config, resolve_checkpoint

__all__ = [
    "LoadedDiT",
    "describe",
    "export_safetensors",
    "infer_config",
    "init_from_checkpoint",
    "load_dit",
    "resolve_checkpoint",
]
