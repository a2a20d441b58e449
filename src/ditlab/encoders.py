"""Frozen pretrained image encoders from timm, in one place: REPA's alignment target
(`ditlab.training.repa`) and FD-DINOv2's feature network (`ditlab.metrics.dinov2`).

An encoder is a timm model name (e.g. `vit_large_patch14_dinov2.lvd142m`) with its weights from a local file
or folder (`path`: a .safetensors, or a .pth/.bin read with `torch.load(weights_only=True)`; no pickle is
executed) or from timm's own source (the Hugging Face hub, or the URL of its pretrained config).
`encoder_weights` finds them without loading anything: a local path, the Hugging Face cache, timm's URL
cache, and only with `download=True` the network. `load_encoder` builds the frozen model from them.
"""

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

HUB_PROBE_TIMEOUT_S = 10  # one HEAD request: without a network it fails at once, without retries


class EncoderWeightsMissing(FileNotFoundError):
    """No weights for an encoder at hand: its message is one line naming the config key."""


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def encoder_weights(
    name: str, path: str | os.PathLike | None = None, *, key: str = "", download: bool = True
) -> dict[str, Any]:
    """Where timm should read `name`'s weights from, as its `pretrained_cfg_overlay` ({} for timm's own
    source); raises `EncoderWeightsMissing` (one line naming `key`'s options) when there are none at hand.

    `path` (a file, or a folder holding one) wins. Otherwise the Hugging Face cache is read for timm's hub
    file of `name` (and timm's URL cache for models published by URL); with nothing there, `download=True`
    fetches it (one quick HEAD request first, so that no network fails in a second, not after the hub
    client's retries), `download=False` counts it as missing. `key` is the options' prefix, e.g. "repa."
    for `repa.encoder` / `repa.encoder_path`.
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.exists():
            raise EncoderWeightsMissing(f"{key}encoder_path {path} does not exist")
        return dict(source="local-dir", file=str(path)) if path.is_dir() else dict(file=str(path))
    import timm  # here: importing timm takes a second, and most runs need no encoder

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as error:  # an unknown pretrained tag
        raise ValueError(f"{key}encoder={name}: {_first_line(error)}") from None
    if cfg is None:
        raise ValueError(f"{key}encoder={name} has no pretrained weights in timm {timm.__version__}")
    where = f"{key}encoder={name}: no weights at hand"
    hint = f"give {key}encoder_path=<a local .safetensors or folder>"
    if cfg.hf_hub_id:
        import huggingface_hub

        repo, _, revision = cfg.hf_hub_id.partition("@")
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for file in files:
            cached = huggingface_hub.try_to_load_from_cache(repo, file, revision=revision or None)
            if isinstance(cached, str):
                return dict(file=cached)
        if not download:
            raise EncoderWeightsMissing(f"{where} (not in the Hugging Face cache); {hint}")
        if _hub_offline():
            raise EncoderWeightsMissing(
                f"{where} (not in the Hugging Face cache, HF_HUB_OFFLINE is set); {hint}"
            )
        url = huggingface_hub.hf_hub_url(repo, files[0], revision=revision or None)
        try:
            huggingface_hub.get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT_S)
        except Exception as error:  # no network, a proxy, a missing file: whatever it is, nothing to load
            raise EncoderWeightsMissing(
                f"{where} (not in the Hugging Face cache, and {repo} cannot be reached: {_first_line(error)}); "
                f"{hint}"
            ) from None
        return dict(file=huggingface_hub.hf_hub_download(repo, files[0], revision=revision or None))
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if cached.is_file():
            return dict(file=str(cached))
        if not download:
            raise EncoderWeightsMissing(f"{where} (not in torch's cache {cached.parent}); {hint}")
        return {}  # timm downloads it
    raise EncoderWeightsMissing(f"{where} (timm names no source for them); {hint}")


def load_encoder(
    name: str,
    *,
    path: str | os.PathLike | None = None,
    pretrained: bool = True,
    download: bool = True,
    key: str = "",
    **kwargs: Any,
) -> nn.Module:
    """timm's `name` without its classifier (`num_classes=0`), frozen and in eval mode, with weights from
    `encoder_weights(name, path, key=key, download=download)`; `pretrained=False` leaves it random (tests,
    cost checks). `kwargs` go to `timm.create_model` (e.g. `dynamic_img_size=True`, or a smaller `depth`)."""
    if path is not None and not pretrained:
        raise ValueError(f"{key}encoder_path is set but {key}pretrained is false")
    import timm

    overlay = encoder_weights(name, path, key=key, download=download) if pretrained else {}
    model = timm.create_model(
        name, pretrained=pretrained, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs
    )
    return model.requires_grad_(False).eval()
