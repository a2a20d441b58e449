"""DiT weight formats: what each file holds, how its model is recognised, read without ever unpickling code.

`ditlab.interop.checkpoints.load_dit` is the one entry point that dispatches on them (files here,
diffusers folders in `diffusers_export`).

Formats (`source_format`):
  - "ditlab": a Lightning `.ckpt` of ditlab training: `state_dict` with `model.*` (raw) and `ema.*` (EMA)
    weights, and a `ditlab` header of plain data (model config, diffusion, autoencoder, data).
  - "released": a bare state dict of the reference implementation, e.g. the released
    DiT-XL-2-256x256.pt / DiT-XL-2-512x512.pt (these two names are downloaded when not local files).
  - "reference_train": a checkpoint of the reference training script: `model`, `ema`, `opt`, `args`.
  - "safetensors": ditlab's export, weights plus the ditlab header as JSON metadata (`export_safetensors`).
  - "diffusers": a folder written by `DiTPipeline`/`DiTTransformer2DModel.save_pretrained`
    (see `ditlab.interop.diffusers_export`).
Bare state dicts carry no configuration: it is inferred from tensor shapes (`infer_config`).
"""

import argparse
import inspect
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from ditlab.autoencoders import SDVAE, Autoencoder, IdentityAutoencoder
from ditlab.design import DesignPoint
from ditlab.diffusion import PAPER_DIFFUSION, objective_builder
from ditlab.io import (
    HEADER_VERSION,
    CheckpointFileError,
    atomic_path,
    cache_folder,
    checkpoint_header,
    load_torch_file,
)
from ditlab.models import BLOCKS, DIT_SIZES, PATCH_SIZES, DiT, complete_config, parse_model_name
from ditlab.models.embeddings import sincos_pos_embed_2d

log = logging.getLogger(__name__)

RELEASED_URL = "https://dl.fbaipublicfiles.com/DiT/models/{name}"
RELEASED_NAMES = ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")
SD_VAE_SCALE = 0.18215  # the reference's latent scale for the SD VAE
AUTOENCODER_TARGETS = {
    "ditlab.autoencoders.IdentityAutoencoder": "identity",
    "ditlab.autoencoders.SDVAE": "sd_vae",
}
SUPPORTED_FORMATS = (
    "supported formats: a ditlab Lightning checkpoint (.ckpt with 'state_dict' and 'ditlab'); a released DiT "
    "state dict (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt: these names are downloaded); a reference DiT "
    "training checkpoint (dict with 'model', 'ema', 'opt', 'args'); a ditlab safetensors export "
    "(src/export.py safetensors=...); a diffusers DiT folder (save_pretrained layout)"
)


@dataclass
class LoadedDiT:
    """A DiT in eval mode and what is needed to sample from it.

    `diffusion`: {"learn_sigma", "noise_schedule", "diffusion_steps"}; `autoencoder`: {"name": "identity" |
    "sd_vae", "pretrained", "scale_factor"}; `data`: {"name", "num_classes", "image_size", "channels",
    "class_names"}. `guidance_channels` is the recommended number of guided ε channels: 3 for the reference's
    checkpoints (the reference evaluation's quirk, kept so its FIDs reproduce), None (all) otherwise.
    `weights` says which weights were loaded: "ema" or "model". `coordinates`: the design point of the run
    that trained it (`ditlab.design.DesignPoint.coordinates`), and `step`: its training step, where the file records them.
    """

    model: DiT
    source_format: str
    diffusion: dict[str, Any]
    autoencoder: dict[str, Any]
    data: dict[str, Any]
    guidance_channels: int | None
    weights: str
    coordinates: dict[str, Any] | None = None
    step: int | None = None

    def header(self) -> dict[str, Any]:
        """The ditlab header (plain data) describing this model, as stored in checkpoints and exports."""
        return checkpoint_header(
            self.model.config,
            diffusion=dict(self.diffusion),
            autoencoder=dict(self.autoencoder),
            data=dict(self.data),
            guidance_channels=self.guidance_channels,
            # Exports keep the design point, for their sample grids' titles.
            **({"coordinates": dict(self.coordinates)} if self.coordinates else {}),
        )

    def build_autoencoder(self) -> Autoencoder:
        """The autoencoder the model was trained with (`autoencoder`: normalised by `load_dit`)."""
        if self.autoencoder["name"] == "identity":
            return IdentityAutoencoder()
        return SDVAE(pretrained=self.autoencoder["pretrained"], scale_factor=self.autoencoder["scale_factor"])


# ---- describing and inferring model configurations ---------------------------------------------------


def model_name(config: dict[str, Any]) -> str:
    """ "DiT-XL/2" for a size of the table, else "DiT(depth=…, hidden=…)/p"."""
    for name, size in DIT_SIZES.items():
        if (size.depth, size.hidden_size) == (config["depth"], config["hidden_size"]):
            return f"{name}/{config['patch_size']}"
    return f"DiT(depth={config['depth']}, hidden={config['hidden_size']})/{config['patch_size']}"


def config_coordinates(config: dict[str, Any]) -> dict[str, Any]:
    """The design-space coordinates (`ditlab.design.DesignPoint`) that a model config holds: its block, size,
    patch and layer axes; for weights that do not record their run's (the objective, REPA: unknown)."""
    coordinates = {"block": config.get("block", "adaln_zero"), "model": model_name(config).rpartition("/")[0]}
    for axis, argument in DesignPoint.model_axes().items():
        if axis not in coordinates and argument in config:
            coordinates[axis] = config[argument]
    return coordinates


def describe(config: dict[str, Any]) -> str:
    """E.g. "DiT-XL/2 (adaln_zero, input 32, 4 channels, 1000 classes, learned sigma)"."""
    sigma = ", learned sigma" if config.get("learn_sigma") else ""
    return (
        f"{model_name(config)} ({config.get('block', 'unknown block')}, input {config['input_size']}, "
        f"{config['in_channels']} channels, {config['num_classes']} classes{sigma})"
    )


def _shape_config(state_dict: dict[str, Tensor]) -> dict[str, Any]:
    """Every constructor argument readable from the shapes of the embedders, blocks and final layer."""
    required = ("x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"not DiT weights: no {', '.join(missing)}")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape  # (d, C, p, p)
    depth, decoder_depth = (
        1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith(prefix)), default=-1)
        for prefix in ("blocks.", "decoder_blocks.")
    )
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)  # (p·p·out, d)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"final layer gives {out_channels} channels for {in_channels} input channels")
    if "pos_embed" in state_dict:  # (1, T, d), T = (input/p)²
        input_size = math.isqrt(state_dict["pos_embed"].shape[1]) * patch
    else:
        raise ValueError("no pos_embed in the weights: the input size cannot be inferred")
    fc1 = state_dict.get("blocks.0.mlp.fc1.weight")  # (mlp_ratio·d, d) in every registered block
    return dict(
        input_size=input_size,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        mlp_ratio=fc1.shape[0] / hidden if fc1 is not None else 4.0,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,  # row num_classes: null
        learn_sigma=out_channels == 2 * in_channels,
        long_skip=any(k.startswith("long_skips.") for k in state_dict),  # U-ViT's: absent in the paper's
        second_time=any(k.startswith("r_embedder.") for k in state_dict),  # MeanFlow's: absent in the paper's
        decoder_depth=decoder_depth,  # MaskDiT's decoder: absent in the paper's
        class_dropout_prob=0.1,  # not in the weights: the paper's
    )


def _meta_state_shapes(config: dict[str, Any]) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in DiT(**config).state_dict().items()}


def identify(state_dict: dict[str, Tensor]) -> dict[str, Any]:
    """The configuration of the DiT whose state dict has exactly these keys and shapes, as far as shapes
    tell: `num_heads` (no shape depends on it) comes from the size table, None for other sizes.

    Depth from the block count, hidden size, channels and patch from the patch conv, input size from the
    position table, classes from the label table (rows − 1), learn_sigma from the final layer, long_skip
    from U-ViT's skip projections, second_time from MeanFlow's interval embedder, decoder_depth from
    MaskDiT's decoder blocks; the block type is the registered one whose parameters match. Raises ValueError when none does.
    """
    config = _shape_config(state_dict)
    size = next(
        (
            s
            for s in DIT_SIZES.values()
            if (s.depth, s.hidden_size) == (config["depth"], config["hidden_size"])
        ),
        None,
    )
    config["num_heads"] = size.num_heads if size else None
    shapes = {k: v.shape for k, v in state_dict.items()}
    for block in BLOCKS:
        if _meta_state_shapes({**config, "num_heads": config["num_heads"] or 1, "block": block}) == shapes:
            return complete_config({**config, "block": block})  # a bare state dict has the paper's layers
    raise ValueError(f"the weights of a {model_name(config)} match none of the blocks {', '.join(BLOCKS)}")


def infer_config(state_dict: dict[str, Tensor]) -> dict[str, Any]:
    """The `DiT(**config)` of a bare state dict (see `identify`), which must be of a size of the table
    (DiT-S/B/L/XL, or the tiny DiT-Ti) with patch 2, 4 or 8. Raises ValueError otherwise."""
    config = identify(state_dict)
    if config["num_heads"] is None or config["patch_size"] not in PATCH_SIZES:
        known = ", ".join(f"{n} (depth {s.depth}, hidden {s.hidden_size})" for n, s in DIT_SIZES.items())
        raise ValueError(
            f"weights of depth {config['depth']}, hidden size {config['hidden_size']}, patch "
            f"{config['patch_size']} are not a known DiT size; known sizes: {known}; patches {PATCH_SIZES}"
        )
    return config


def check_weights_fit(
    model_config: dict[str, Any],
    state_dict: dict[str, Tensor],
    declared: str,
    source: str,
    file_state_dict: dict[str, Tensor] | None = None,
) -> None:
    """Raise a readable ValueError unless `state_dict` has exactly the keys and shapes of DiT(**model_config),
    naming the model the weights of the file (`file_state_dict`, default `state_dict`) look like."""
    expected = _meta_state_shapes(model_config)
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    wrong = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(expected[k])}"
        for k in sorted(expected.keys() & state_dict.keys())
        if state_dict[k].shape != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return
    try:
        looks = f"this checkpoint looks like {describe(identify(file_state_dict or state_dict))}"
    except ValueError as err:
        looks = f"its weights match no known DiT ({err})"
    details = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{', …' if len(keys) > 5 else ''}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape (file vs model)", wrong),
        )
        if keys
    ]
    raise ValueError(f"{source}: {looks}; {declared} {describe(model_config)}. " + "; ".join(details))


# ---- reading files -------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return cache_folder()


def resolve_checkpoint(path_or_name: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local checkpoint file or folder; the released names are downloaded into `cache_dir` once
    (default `$XDG_CACHE_HOME/ditlab`, i.e. ~/.cache/ditlab)."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    if str(path_or_name) not in RELEASED_NAMES:
        raise FileNotFoundError(
            f"checkpoint {str(path_or_name)!r} does not exist; pass a local file or folder, or one of "
            f"{', '.join(RELEASED_NAMES)} to download the released weights"
        )
    target = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = target / path.name
    if target.is_file():
        return target
    url = RELEASED_URL.format(name=path.name)
    try:  # atomic: an interrupted download never leaves a truncated checkpoint
        with atomic_path(target) as tmp:
            torch.hub.download_url_to_file(url, str(tmp), progress=True)
    except OSError as err:  # URLError, timeouts and refused connections are all OSErrors
        raise FileNotFoundError(
            f"{path.name} is not a local file and could not be downloaded from {url} ({err}); download it "
            f"and pass the local path (e.g. `wget {url}` where there is internet, then ckpt=/path/to/{path.name})"
        ) from err
    return target


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    """torch.load restricted to tensors and plain data (argparse.Namespace allowed: the reference's `args`)."""
    try:
        return load_torch_file(path, map_location, allowed_globals=[argparse.Namespace])
    except CheckpointFileError as err:
        raise CheckpointFileError(f"{err}. {SUPPORTED_FORMATS}") from None


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and then the JSON header '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def clean_key(key: str) -> str:
    """Drop the `module.` of DDP/DataParallel and the `_orig_mod.` of torch.compile from a state-dict key."""
    return ".".join(part for part in key.split(".") if part not in ("module", "_orig_mod"))


def _clean(state_dict: dict[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """The tensors under `prefix`, with the prefix removed and keys cleaned."""
    return {
        clean_key(k.removeprefix(prefix)): v
        for k, v in state_dict.items()
        if k.startswith(prefix) and isinstance(v, Tensor)
    }


def normalize_autoencoder(spec: dict[str, Any]) -> dict[str, Any]:
    """{"name": "identity" | "sd_vae", "pretrained", "scale_factor"} from a header's autoencoder entry, which
    may also be the autoencoder's Hydra config (`_target_`). Only ditlab's own targets are accepted: a header
    is data, never code to run."""
    name = spec.get("name") or AUTOENCODER_TARGETS.get(spec.get("_target_", ""))
    if name == "identity":
        return {"name": "identity", "pretrained": None, "scale_factor": 1.0}
    if name == "sd_vae":
        pretrained = spec.get("pretrained") or f"stabilityai/sd-vae-ft-{spec.get('variant', 'ema')}"
        return {
            "name": "sd_vae",
            "pretrained": pretrained,
            "scale_factor": spec.get("scale_factor", SD_VAE_SCALE),
        }
    raise ValueError(f"unknown autoencoder {spec} in the checkpoint; known: {', '.join(AUTOENCODER_TARGETS)}")


def normalize_diffusion(spec: dict[str, Any]) -> dict[str, Any]:
    """The objective's arguments from a header's diffusion entry (its Hydra config), missing ones at their
    defaults: those of `create_diffusion` for the paper's diffusion; for any other registered objective
    (`ditlab.diffusion.OBJECTIVES`: SiT's interpolant, a user's) `{"_target_": <its builder>, ...}` with
    its builder's arguments. `ditlab.diffusion.build_objective` builds either."""
    target = spec.get("_target_", PAPER_DIFFUSION)
    builder = objective_builder(target)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(builder).parameters
    args = {
        name: spec.get(name, p.default)
        for name, p in params.items()
        if p.kind in kinds and name != "timestep_respacing"  # a sampler's choice, not the objective's
    }
    missing = [name for name, value in args.items() if value is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"the checkpoint's diffusion has no {', '.join(missing)}, which {target} needs")
    return args if target == PAPER_DIFFUSION else {"_target_": target} | args


def _reference_info(config: dict[str, Any], vae: str = "ema") -> dict[str, Any]:
    """What a checkpoint of the reference implementation implies: SD-VAE latents of ImageNet (when it has
    4 channels; pixels otherwise), the linear 1000-step schedule, 3-channel guidance."""
    latent = config["in_channels"] == 4
    return {
        "diffusion": {
            "learn_sigma": config["learn_sigma"],
            "noise_schedule": "linear",
            "diffusion_steps": 1000,
        },
        "autoencoder": (
            {"name": "sd_vae", "pretrained": f"stabilityai/sd-vae-ft-{vae}", "scale_factor": SD_VAE_SCALE}
            if latent
            else {"name": "identity", "pretrained": None, "scale_factor": 1.0}
        ),
        "data": {
            "name": "imagenet" if latent else "unknown",
            "num_classes": config["num_classes"],
            "image_size": config["input_size"] * (8 if latent else 1),
            "channels": 3 if latent else config["in_channels"],
            "class_names": None,
        },
        "guidance_channels": 3 if latent else None,
    }


def read_checkpoint(
    path: Path, *, use_ema: bool = True, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The DiT state dict of a checkpoint file and what the file says about it.

    Returns (state_dict, meta); meta has `source_format`, `weights` ("ema" | "model"), and, when the file
    declares them, `model_config` with `declared` (who declares it, for error messages), `diffusion`,
    `autoencoder`, `data`, `guidance_channels`, `coordinates`, `step`.
    """
    if _is_safetensors(path):
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = load_file(path, device=str(map_location))
        meta = {"source_format": "safetensors", "weights": "ema"}
        if "ditlab" in metadata:
            meta |= json.loads(metadata["ditlab"]) | {"declared": "its metadata declares"}
        return _clean(state_dict), meta

    obj = _torch_load(path, map_location)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict. {SUPPORTED_FORMATS}")
    weights = "ema" if use_ema else "model"
    if "state_dict" in obj and "ditlab" in obj:
        state_dict = _clean(obj["state_dict"], f"{weights}.")
        if not state_dict:
            hint = "; pass use_ema=False for the raw weights" if use_ema else ""
            raise ValueError(f"{path} has no '{weights}.*' weights in its state_dict{hint}")
        header = obj["ditlab"]
        if header.get("version", HEADER_VERSION) > HEADER_VERSION:
            raise ValueError(
                f"{path} has ditlab header version {header['version']}; upgrade ditlab to read it"
            )
        return state_dict, {
            **header,
            "source_format": "ditlab",
            "weights": weights,
            "step": obj.get("global_step"),
            "declared": "its ditlab header declares",
        }
    if isinstance(obj.get("model"), dict):
        if use_ema and not isinstance(obj.get("ema"), dict):
            raise ValueError(f"{path} has no 'ema' weights; pass use_ema=False to load 'model'")
        meta = {"source_format": "reference_train", "weights": weights}
        args = obj.get("args")
        meta["args"] = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
        return _clean(obj[weights]), meta
    if "state_dict" in obj:
        raise ValueError(
            f"{path} is a Lightning checkpoint without a 'ditlab' header (not written by ditlab's training). "
            f"{SUPPORTED_FORMATS}"
        )
    state_dict = _clean(obj)
    if len(state_dict) == len(obj) and "x_embedder.proj.weight" in state_dict:
        return state_dict, {"source_format": "released", "weights": "ema"}  # the released files are EMA
    raise ValueError(
        f"{path} has an unknown structure (keys: {', '.join(list(obj)[:8])}). {SUPPORTED_FORMATS}"
    )


def _declared_reference_config(args: dict[str, Any], inferred: dict[str, Any]) -> dict[str, Any]:
    """The model the reference training `args` name (model, image_size, num_classes), else the inferred one."""
    if not {"model", "image_size", "num_classes"} <= args.keys():
        return inferred
    size, patch = parse_model_name(args["model"])
    return {
        **inferred,
        "depth": size.depth,
        "hidden_size": size.hidden_size,
        "num_heads": size.num_heads,
        "patch_size": patch,
        "input_size": args["image_size"] // 8,
        "num_classes": args["num_classes"],
        "in_channels": 4,
        "learn_sigma": True,
        "block": "adaln_zero",
    }


def build_model(config: dict[str, Any], state_dict: dict[str, Tensor], declared: str, source: str) -> DiT:
    """DiT(**config) holding `state_dict` (float32), checked key by key and shape by shape."""
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    with torch.device("meta"):
        model = DiT(**config)
    # A fixed function of the shape; some forks do not save it. None: a model without one (pos_embed="rope").
    if "pos_embed" not in state_dict and model.pos_embed is not None:
        grid = config["input_size"] // config["patch_size"]
        state_dict["pos_embed"] = sincos_pos_embed_2d(config["hidden_size"], grid)[None]
    check_weights_fit(config, state_dict, declared, source)
    model.load_state_dict(state_dict, strict=True, assign=True)  # takes the loaded tensors, no init
    return model.requires_grad_(False).eval()


def load_dit_file(
    path: Path,
    *,
    use_ema: bool = True,
    map_location: str | torch.device = "cpu",
    expect: dict[str, Any] | None = None,
) -> LoadedDiT:
    """A DiT file of any supported format (see the module docstring) for sampling; `load_dit` documents
    the arguments and errors."""
    state_dict, meta = read_checkpoint(path, use_ema=use_ema, map_location=map_location)
    config = meta.get("model_config")
    if config is None:
        try:
            config = infer_config(state_dict)
        except ValueError as err:
            raise ValueError(f"{path}: cannot identify the model of these weights: {err}") from None
        if meta["source_format"] == "reference_train":
            config = _declared_reference_config(meta["args"], config)
        meta = _reference_info(config, meta.get("args", {}).get("vae", "ema")) | meta
    missing = [k for k in ("diffusion", "autoencoder", "data") if k not in meta]
    if missing:
        raise ValueError(f"{path}: its ditlab header has no {', '.join(missing)}; it cannot be sampled from")
    declared = meta.get("declared", "its args declare")
    if expect is not None:
        config, declared = dict(expect), "you asked for"
    model = build_model(config, state_dict, declared, str(path)).to(map_location)
    diffusion = normalize_diffusion(meta["diffusion"])
    # An objective without the option (MeanFlow's) trains a model without the variance channels, as
    # `DesignPoint.model_arguments` builds it.
    learn_sigma = bool(diffusion.get("learn_sigma", False))
    if learn_sigma != model.learn_sigma:
        raise ValueError(f"{path}: the diffusion has learn_sigma={learn_sigma}, the model not")
    return LoadedDiT(
        model=model,
        source_format=meta["source_format"],
        diffusion=diffusion,
        autoencoder=normalize_autoencoder(meta["autoencoder"]),
        data=meta["data"],
        guidance_channels=meta.get("guidance_channels"),
        weights=meta["weights"],
        coordinates=meta.get("coordinates"),
        step=meta.get("step"),
    )
