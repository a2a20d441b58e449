"""Loading DiT weights of every format (`load_dit`), fine-tuning from them (`init_from_checkpoint`), and
the safetensors export. The formats themselves are in `ditlab.interop.formats`; diffusers folders in
`ditlab.interop.diffusers_export`, which depends on the formats only (no import circle).
"""

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ditlab.diffusion import objective_name
from ditlab.interop.formats import (
    LoadedDiT,
    build_model,
    check_weights_fit,
    load_dit_file,
    normalize_autoencoder,
    normalize_diffusion,
    read_checkpoint,
    resolve_checkpoint,
)
from ditlab.io import atomic_path
from ditlab.models import DiT

log = logging.getLogger(__name__)


def load_dit(
    path_or_name: str | os.PathLike,
    *,
    use_ema: bool = True,
    map_location: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    expect: dict[str, Any] | None = None,
) -> LoadedDiT:
    """Load a DiT for sampling from any supported format (`ditlab.interop.formats`), EMA weights by default.

    `path_or_name`: a file, a diffusers folder, or a released name (DiT-XL-2-256x256.pt,
    DiT-XL-2-512x512.pt) downloaded into `cache_dir`. `expect`: a model config (`DiT.config`) the weights
    must fit; the model is then built from it. Raises FileNotFoundError for a missing file and ValueError
    for a file of another format or whose weights do not fit the declared or expected model (the message
    names the model the weights look like).
    """
    path = resolve_checkpoint(path_or_name, cache_dir)
    if not path.is_dir():
        return load_dit_file(path, use_ema=use_ema, map_location=map_location, expect=expect)
    from ditlab.interop.diffusers_export import import_diffusers  # imports diffusers: slow, only for folders

    loaded = import_diffusers(path, map_location=map_location)
    if expect is not None:
        loaded.model = build_model(dict(expect), loaded.model.state_dict(), "you asked for", str(path))
        loaded.model.to(map_location)
    return loaded


# What a guide must share with the guided model for their outputs to mean the same thing at the same (x, t),
# beside the objective itself (`objective_name`: ddpm, sit_linear, ...): the paper's schedule and prediction,
# the interpolant's prediction. The rest (learned or fixed variance, how t was drawn in training, ε margins)
# changes how a model was trained or sampled, not what its guided channels predict.
GUIDE_MUST_MATCH = ("noise_schedule", "diffusion_steps", "predict")


def load_guide(
    path_or_name: str | os.PathLike,
    model_config: dict[str, Any],
    diffusion: dict[str, Any],
    *,
    use_ema: bool = True,
    map_location: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    key: str = "guide.ckpt",
    autoencoder: dict[str, Any] | None = None,
) -> DiT:
    """The guiding model of autoguidance (Karras et al. 2024): a weaker DiT (an earlier checkpoint of the run,
    a smaller model), in eval mode and frozen, of the same objective as the guided model (`diffusion`: its
    checkpoint header's entry or its run's diffusion config, `normalize_diffusion` reads both), with its
    input shape and classes (`model_config`) and, where `autoencoder` (the guided model's header entry) is
    given, in the same latent space. Any format `load_dit` reads. ValueError (FileNotFoundError for
    a missing file) in one line naming `key` and what differs otherwise."""
    try:
        guide = load_dit(path_or_name, use_ema=use_ema, map_location=map_location, cache_dir=cache_dir)
        ours, theirs = normalize_diffusion(diffusion), normalize_diffusion(guide.diffusion)
    except (FileNotFoundError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        named = key if str(path_or_name) in first_line else f"{key}={path_or_name}"  # the path said once
        raise type(error)(f"{named}: {first_line}") from None
    kinds = objective_name(theirs), objective_name(ours)  # ddpm, sit_linear, ...
    differences = (
        [f"objective {kinds[0]} vs {kinds[1]}"]
        if kinds[0] != kinds[1]
        else [
            f"{name} {theirs.get(name)} vs {ours.get(name)}"
            for name in GUIDE_MUST_MATCH
            if theirs.get(name) != ours.get(name)
        ]
    )
    differences += [
        f"{name} {guide.model.config[name]} vs {model_config[name]}"
        for name in ("input_size", "in_channels", "num_classes")
        if guide.model.config[name] != model_config[name]
    ]
    if autoencoder is not None:
        # The latent space is the encoder's and the scale's: SD-VAE ft-EMA and ft-MSE fine-tune only the
        # decoder, so their latents are one space (the paper samples its checkpoints with either).
        latents = [
            (ae["name"], ae["scale_factor"])
            for ae in map(normalize_autoencoder, (guide.autoencoder, autoencoder))
        ]
        if latents[0] != latents[1]:
            differences.append(
                f"latents of autoencoder {latents[0][0]} (scale {latents[0][1]}) vs {latents[1][0]} (scale {latents[1][1]})"
            )
    if differences:
        raise ValueError(
            f"{key}={path_or_name} cannot guide this model (guide vs model: {', '.join(differences)}): "
            "the guide must be a model of the same objective, input shape, classes and autoencoder"
        )
    return guide.model.eval().requires_grad_(False)


def init_from_checkpoint(
    model: DiT,
    path_or_name: str | os.PathLike,
    *,
    use_ema: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Copy a checkpoint's weights (any supported format) into `model`, to fine-tune it.

    The label table is kept at its initialisation when the class count differs (e.g. from ImageNet's
    1000 classes to a 10-class data set) and so are the fixed position embeddings when the input size
    differs; everything else must match exactly (else ValueError naming the model the file looks like).
    Returns the keys left at their initialisation.
    """
    path = resolve_checkpoint(path_or_name, cache_dir)
    if path.is_dir():
        state_dict = load_dit(path).model.state_dict()
    else:
        state_dict, _ = read_checkpoint(path, use_ema=use_ema)
    own = model.state_dict()
    kept = [
        k
        for k in ("y_embedder.embedding_table.weight", "pos_embed")
        if k in state_dict and k in own and state_dict[k].shape != own[k].shape
    ]
    merged = {**state_dict, **{k: own[k] for k in kept}}
    if "pos_embed" in own:  # absent with pos_embed="rope"
        merged.setdefault("pos_embed", own["pos_embed"])
    check_weights_fit(model.config, merged, "you asked for", str(path), file_state_dict=state_dict)
    model.load_state_dict(merged, strict=True)
    if kept:
        log.warning("init_from %s: kept at initialisation (shape differs): %s", path, ", ".join(kept))
    return kept


def export_safetensors(
    ckpt: "str | os.PathLike | LoadedDiT", out_path: str | os.PathLike, *, use_ema: bool = True
) -> Path:
    """Write a checkpoint's weights (EMA by default) as safetensors, with the ditlab header as JSON metadata.

    The file loads back with `load_dit(out_path)` and holds no executable content.
    """
    loaded = ckpt if isinstance(ckpt, LoadedDiT) else load_dit(ckpt, use_ema=use_ema)
    out_path = Path(out_path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    header = loaded.header() | {"weights": loaded.weights, "exported_from": loaded.source_format}
    with atomic_path(out_path) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "ditlab": json.dumps(header)})
    return out_path
