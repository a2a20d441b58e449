"""ditlab DiT <-> diffusers `DiTTransformer2DModel` / `DiTPipeline`, weight by weight.

diffusers' DiT is the reference's adaLN-Zero model with three differences handled here:
  - it keeps a copy of the timestep and label embedders in every block (`norm1.emb`): ours is copied into
    each on export, and on import the copies must agree;
  - its timestep projection hard-codes `downscale_freq_shift=1` (frequencies exp(-ln(10⁴)·k/127)), the
    reference uses 0 (k/128). The shift is not part of the saved config, so it is set on the modules after
    loading (`use_reference_timestep_embedding`; `load_diffusers_pipeline` does it); without it outputs
    differ slightly (the weights were trained with shift 0);
  - `DiTPipeline` uses 1000 as the null class, so only 1000-class latent models export as a pipeline;
    other models export the transformer and scheduler only. The pipeline also guides all 4 latent
    channels (the reference evaluation guided 3) and drops the learned variance (its schedulers use fixed
    variances), so its samples are those of DDIM / DPM-Solver, not of ditlab's 250-step DDPM.
"""

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
)

from ditlab.autoencoders import load_autoencoder_kl
from ditlab.diffusion import objective_name
from ditlab.diffusion.sampling import DIFFUSERS_PREDICTION
from ditlab.interop.formats import (
    SD_VAE_SCALE,
    LoadedDiT,
    describe,
    normalize_autoencoder,
    normalize_diffusion,
)
from ditlab.io import atomic_path
from ditlab.models import DiT
from ditlab.models.embeddings import sincos_pos_embed_2d

log = logging.getLogger(__name__)

SCHEDULERS = {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}
PREDICTION_TYPES = DIFFUSERS_PREDICTION  # ditlab -> diffusers (the samplers' table: one home)
HEADER_FILE = "ditlab.json"  # the ditlab header (autoencoder, data, diffusion) kept beside the weights


def use_reference_timestep_embedding(transformer: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Set the timestep frequencies of every block to the reference's (downscale_freq_shift=0), in place.

    Needed after every `from_pretrained` of a DiT transformer: the shift is hard-coded in diffusers'
    `CombinedTimestepLabelEmbeddings` and not saved in the config.
    """
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


def _check_exportable(model: DiT) -> None:
    config = model.config
    if config["block"] != "adaln_zero":
        raise ValueError(
            f"diffusers' DiTTransformer2DModel implements only adaLN-Zero; this model is {describe(config)}"
        )
    paper = {
        "pos_embed": "sincos",
        "norm": "layernorm",
        "qk_norm": False,
        "mlp": "gelu",
        "long_skip": False,
        "second_time": False,
        "decoder_depth": 0,
    }
    layers = {k: config.get(k, v) for k, v in paper.items()}
    if layers != paper:
        raise ValueError(f"diffusers' DiT has the paper's layers; this model has {layers}")
    if config["mlp_ratio"] != 4.0:
        raise ValueError(f"diffusers' DiT has MLP ratio 4; this model has {config['mlp_ratio']}")


def to_diffusers(model: DiT) -> DiTTransformer2DModel:
    """The `DiTTransformer2DModel` computing what `model` (an adaln_zero DiT) computes.

    Shapes: both map (N, C, H, W), t (N,), y (N,) to (N, 2C or C, H, W).
    """
    _check_exportable(model)
    c = model.config
    transformer = DiTTransformer2DModel(
        num_attention_heads=c["num_heads"],
        attention_head_dim=c["hidden_size"] // c["num_heads"],
        in_channels=c["in_channels"],
        out_channels=model.out_channels,
        num_layers=c["depth"],
        sample_size=c["input_size"],
        patch_size=c["patch_size"],
        num_embeds_ada_norm=c["num_classes"],
        norm_eps=1e-6,  # the reference's LayerNorm eps (diffusers' default is 1e-5)
    )
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    theirs = {
        "pos_embed.proj.weight": ours["x_embedder.proj.weight"],
        "pos_embed.proj.bias": ours["x_embedder.proj.bias"],
        "proj_out_1.weight": ours["final_layer.adaLN_modulation.1.weight"],  # (shift, scale) in both
        "proj_out_1.bias": ours["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": ours["final_layer.linear.weight"],
        "proj_out_2.bias": ours["final_layer.linear.bias"],
    }
    for i in range(c["depth"]):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            # The embedders, repeated in every block.
            theirs[f"{d}norm1.emb.timestep_embedder.linear_1.{p}"] = ours[f"t_embedder.mlp.0.{p}"]
            theirs[f"{d}norm1.emb.timestep_embedder.linear_2.{p}"] = ours[f"t_embedder.mlp.2.{p}"]
            # Same chunk order: shift/scale/gate of attention, then of the MLP.
            theirs[f"{d}norm1.linear.{p}"] = ours[f"{b}adaLN_modulation.1.{p}"]
            q, k, v = ours[f"{b}attn.qkv.{p}"].chunk(3)  # rows of the fused qkv: q, then k, then v
            theirs |= {f"{d}attn1.to_q.{p}": q, f"{d}attn1.to_k.{p}": k, f"{d}attn1.to_v.{p}": v}
            theirs[f"{d}attn1.to_out.0.{p}"] = ours[f"{b}attn.proj.{p}"]
            theirs[f"{d}ff.net.0.proj.{p}"] = ours[f"{b}mlp.fc1.{p}"]
            theirs[f"{d}ff.net.2.{p}"] = ours[f"{b}mlp.fc2.{p}"]
        theirs[f"{d}norm1.emb.class_embedder.embedding_table.weight"] = ours[
            "y_embedder.embedding_table.weight"
        ]
    transformer.load_state_dict({k: v.clone() for k, v in theirs.items()}, strict=True)
    return use_reference_timestep_embedding(transformer.eval())


def from_diffusers(transformer: DiTTransformer2DModel) -> DiT:
    """The ditlab adaln_zero `DiT` computing what `transformer` computes with the reference timestep
    frequencies. Raises ValueError if its per-block embedder copies differ (ditlab's DiT shares one)."""
    c = transformer.config
    if c.norm_type != "ada_norm_zero" or c.activation_fn != "gelu-approximate" or not c.attention_bias:
        raise ValueError(
            "only adaLN-Zero DiTs with tanh-GELU and attention bias convert to ditlab; got norm_type="
            f"{c.norm_type!r}, activation_fn={c.activation_fn!r}, attention_bias={c.attention_bias}"
        )
    theirs = transformer.state_dict()
    emb = "norm1.emb."
    first = {k.split(emb, 1)[1]: v for k, v in theirs.items() if k.startswith(f"transformer_blocks.0.{emb}")}
    for i in range(1, c.num_layers):
        for name, value in first.items():
            if not torch.equal(theirs[f"transformer_blocks.{i}.{emb}{name}"], value):
                raise ValueError(
                    f"block {i}'s copy of the embedder {name} differs from block 0's; ditlab's DiT shares "
                    "one timestep/label embedder and cannot represent this model"
                )
    model_config = dict(
        input_size=c.sample_size,
        patch_size=c.patch_size,
        in_channels=c.in_channels,
        hidden_size=c.num_attention_heads * c.attention_head_dim,
        depth=c.num_layers,
        num_heads=c.num_attention_heads,
        num_classes=c.num_embeds_ada_norm,
        learn_sigma=transformer.out_channels == 2 * c.in_channels,
        block="adaln_zero",
    )
    with torch.device("meta"):
        model = DiT(**model_config)
    ours = {
        "x_embedder.proj.weight": theirs["pos_embed.proj.weight"],
        "x_embedder.proj.bias": theirs["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": first["timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": first["timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": first["timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": first["timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": first["class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": theirs["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": theirs["proj_out_1.bias"],
        "final_layer.linear.weight": theirs["proj_out_2.weight"],
        "final_layer.linear.bias": theirs["proj_out_2.bias"],
    }
    for i in range(c.num_layers):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            ours[f"{b}adaLN_modulation.1.{p}"] = theirs[f"{d}norm1.linear.{p}"]
            qkv = [theirs[f"{d}attn1.to_{n}.{p}"] for n in "qkv"]
            ours[f"{b}attn.qkv.{p}"] = torch.cat(qkv)
            ours[f"{b}attn.proj.{p}"] = theirs[f"{d}attn1.to_out.0.{p}"]
            ours[f"{b}mlp.fc1.{p}"] = theirs[f"{d}ff.net.0.proj.{p}"]
            ours[f"{b}mlp.fc2.{p}"] = theirs[f"{d}ff.net.2.{p}"]
    ours["pos_embed"] = sincos_pos_embed_2d(model_config["hidden_size"], c.sample_size // c.patch_size)[None]
    model.load_state_dict({k: v.detach().clone().float() for k, v in ours.items()}, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def make_scheduler(
    diffusion: dict[str, Any], kind: str = "ddim"
) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """A diffusers scheduler on ditlab's noise schedule and prediction target (`diffusion`: {"noise_schedule",
    "diffusion_steps", "predict"}).

    "ddim": DDIM with ᾱ_prev = 1 at the last step and "leading" spacing, i.e. the steps of ditlab's
    "ddimN" respacing; "dpm_solver": DPM-Solver++ (2nd order), good in 20-25 steps.
    """
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose one of {', '.join(SCHEDULERS)}")
    steps, schedule = diffusion["diffusion_steps"], diffusion["noise_schedule"]
    predict = diffusion.get("predict", "epsilon")
    common: dict[str, Any] = {"num_train_timesteps": steps, "prediction_type": PREDICTION_TYPES[predict]}
    if schedule == "linear":  # ditlab scales both ends by 1000/T, diffusers' linspace takes them as given
        common |= {
            "beta_schedule": "linear",
            "beta_start": 1e-4 * 1000 / steps,
            "beta_end": 0.02 * 1000 / steps,
        }
    elif schedule == "cosine":  # the same ᾱ(t) = cos²((t/T + 0.008)/1.008·π/2), β capped at 0.999
        common |= {"beta_schedule": "squaredcos_cap_v2"}
    else:
        raise ValueError(f"noise schedule {schedule!r} has no diffusers equivalent here (linear, cosine)")
    if kind == "ddim":
        return DDIMScheduler(
            **common, clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading"
        )
    return DPMSolverMultistepScheduler(**common)


def _diffusion_from_scheduler(config: dict[str, Any], learn_sigma: bool) -> dict[str, Any]:
    """ditlab's diffusion settings equal to a diffusers scheduler config; ValueError if there are none."""
    steps = config.get("num_train_timesteps", 1000)
    schedule = config.get("beta_schedule", "linear")
    predict = {v: k for k, v in PREDICTION_TYPES.items()}.get(config.get("prediction_type", "epsilon"))
    if predict is None or config.get("trained_betas") is not None:
        schedule = "other"
    elif schedule == "linear":
        expected = (1e-4 * 1000 / steps, 0.02 * 1000 / steps)
        got = (config.get("beta_start", 1e-4), config.get("beta_end", 0.02))
        if not all(abs(a - b) < 1e-9 for a, b in zip(expected, got, strict=True)):
            schedule = "other"
    elif schedule == "squaredcos_cap_v2":
        schedule = "cosine"
    if schedule not in ("linear", "cosine"):
        raise ValueError(
            "the scheduler's noise schedule is not one of ditlab's (ε, x0 or v prediction, linear β 1e-4..0.02 at "
            f"1000 steps, or squaredcos_cap_v2): {json.dumps(config)}"
        )
    return {
        "learn_sigma": learn_sigma,
        "noise_schedule": schedule,
        "diffusion_steps": steps,
        "predict": predict,
    }


def _vae_for(loaded: LoadedDiT, vae: "str | os.PathLike | AutoencoderKL | None") -> AutoencoderKL | None:
    """The AutoencoderKL to ship with the pipeline (its scaling_factor set to the checkpoint's), or None
    for a pixel-space model."""
    pixel_space = loaded.autoencoder["name"] == "identity"
    if pixel_space:
        if vae is not None:
            raise ValueError("this model runs in pixel space (autoencoder 'identity'); it takes no VAE")
        return None
    if vae is None:
        vae = loaded.autoencoder["pretrained"]
    vae = vae if isinstance(vae, AutoencoderKL) else load_autoencoder_kl(str(vae))
    if vae.config.latent_channels != loaded.model.in_channels:
        raise ValueError(
            f"the VAE has {vae.config.latent_channels} latent channels, the model {loaded.model.in_channels}"
        )
    scale = loaded.autoencoder.get("scale_factor", SD_VAE_SCALE)
    if vae.config.scaling_factor != scale:  # the pipeline divides latents by it before decoding
        vae = copy.deepcopy(vae)
        vae.register_to_config(scaling_factor=scale)
    return vae


def _model_card(loaded: LoadedDiT, reason: str | None) -> str:
    """README.md of an exported folder: how to load it, and the timestep-frequency fix."""
    fix = (
        "for block in transformer.transformer_blocks:  # the reference's timestep frequencies\n"
        "    block.norm1.emb.time_proj.downscale_freq_shift = 0\n"
    )
    if reason is None:
        usage = (
            "```python\nfrom diffusers import DiTPipeline\n\n"
            'pipe = DiTPipeline.from_pretrained("path/to/this/folder")\ntransformer = pipe.transformer\n'
            f"{fix}images = pipe(class_labels=[0, 1], guidance_scale=4.0, num_inference_steps=50).images\n```\n\n"
            "(`ditlab.interop.diffusers_export.load_diffusers_pipeline(folder)` does the same.) The pipeline "
            "guides all latent channels and samples with the scheduler's fixed variance; ditlab's FID protocol "
            "is `python src/sample.py ckpt=path/to/this/folder` (250 DDPM steps, learned variance)."
        )
    else:
        usage = (
            f"Only the transformer and scheduler are here: {reason}.\n\n```python\n"
            "from diffusers import DiTTransformer2DModel\n\n"
            'transformer = DiTTransformer2DModel.from_pretrained("path/to/this/folder", subfolder="transformer")\n'
            f"{fix}```\n\nor sample with ditlab: `python src/sample.py ckpt=path/to/this/folder`."
        )
    return (
        f"# {describe(loaded.model.config)}\n\nExported by ditlab from a {loaded.source_format} checkpoint "
        f"({loaded.weights} weights).\n\n{usage}\n\n"
        "diffusers hard-codes `downscale_freq_shift=1` in DiT's timestep projection and does not save it; "
        "these weights were trained with 0, so set it after loading as above. "
        f"`{HEADER_FILE}`: the ditlab header (autoencoder, data, noise schedule).\n"
    )


def export_diffusers(
    loaded: LoadedDiT,
    out_dir: str | os.PathLike,
    *,
    vae: "str | os.PathLike | AutoencoderKL | None" = None,
    scheduler: str = "ddim",
    include_vae: bool = True,
) -> Path:
    """Write an adaln_zero DiT (as `ditlab.interop.load_dit` returns it) as a diffusers folder.

    With a VAE (`vae`: a folder, hub name or AutoencoderKL; default: the checkpoint's) and 1000 classes,
    a complete `DiTPipeline` (transformer, vae, scheduler, `id2label` from the data's class names);
    otherwise (or with `include_vae=False`, e.g. offline without the VAE at hand) the transformer and
    scheduler only, with a warning saying why and, in the folder's README, how to add the VAE. `ditlab.json` keeps the ditlab
    header so that `load_dit(out_dir)` restores everything. The folder appears atomically; an existing
    non-empty `out_dir` is an error.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new folder or delete it")
    if "_target_" in loaded.diffusion:  # SiT's interpolant, MeanFlow: no DiTPipeline scheduler samples them
        raise ValueError(
            "diffusers export covers the paper's diffusion; this model trains "
            f"{objective_name(loaded.diffusion)}: export safetensors instead (src/export.py "
            "safetensors=model.safetensors) and sample with src/sample.py"
        )
    transformer = to_diffusers(loaded.model)
    sched = make_scheduler(loaded.diffusion, scheduler)
    try:
        vae_model = _vae_for(loaded, vae) if include_vae else None
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err} Or export the transformer and scheduler alone: include_vae=false"
        ) from None
    if not include_vae and loaded.autoencoder["name"] != "identity":
        reason = (
            "exported without its VAE (include_vae=false); add it with DiTPipeline(transformer=..., scheduler=..., "
            f"vae=AutoencoderKL.from_pretrained({loaded.autoencoder.get('pretrained')!r}))"
        )
    elif vae_model is None:
        reason = "the model runs in pixel space and DiTPipeline decodes with a VAE"
    elif loaded.model.num_classes != 1000:
        reason = f"DiTPipeline uses 1000 as the null class, this model has {loaded.model.num_classes} classes"
    else:
        reason = None
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if reason is None:
            names = loaded.data.get("class_names")
            id2label = {str(i): name for i, name in enumerate(names)} if names else None
            pipe = DiTPipeline(transformer=transformer, vae=vae_model, scheduler=sched, id2label=id2label)
            if id2label:  # saved in model_index.json, passed back to __init__ by from_pretrained
                pipe.register_to_config(id2label=id2label)
            pipe.save_pretrained(tmp)
        else:
            transformer.save_pretrained(tmp / "transformer")
            sched.save_pretrained(tmp / "scheduler")
            log.warning("%s: exported the transformer and scheduler only: %s", out, reason)
        header = loaded.header() | {"weights": loaded.weights, "exported_from": loaded.source_format}
        (tmp / HEADER_FILE).write_text(json.dumps(header, indent=2))
        (tmp / "README.md").write_text(_model_card(loaded, reason))
        if out.exists():  # an empty folder (checked above), which the rename does not replace on every OS
            out.rmdir()
    return out


def import_diffusers(folder: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> LoadedDiT:
    """A diffusers DiT folder (a DiTPipeline, or a transformer folder) as a ditlab LoadedDiT.

    Uses `ditlab.json` when the folder was written by `export_diffusers`; otherwise the schedule comes
    from the scheduler config, the autoencoder from `vae/` and the class names from `id2label`.
    """
    folder = Path(folder)
    sub = folder / "transformer" if (folder / "transformer" / "config.json").is_file() else folder
    if not (sub / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers DiT folder (no config.json, no transformer/)")
    model = from_diffusers(DiTTransformer2DModel.from_pretrained(sub)).to(map_location)
    read = lambda path: json.loads(path.read_text()) if path.is_file() else None  # noqa: E731
    header = read(folder / HEADER_FILE) or {}
    scheduler_config = read(folder / "scheduler" / "scheduler_config.json")
    if "diffusion" in header:
        diffusion = normalize_diffusion(header["diffusion"])
    else:
        diffusion = _diffusion_from_scheduler(scheduler_config or {}, model.learn_sigma)
    vae_config = read(folder / "vae" / "config.json")
    if vae_config is not None:  # the VAE shipped in the folder
        autoencoder = {
            "name": "sd_vae",
            "pretrained": str((folder / "vae").resolve()),
            "scale_factor": vae_config.get("scaling_factor", SD_VAE_SCALE),
        }
    else:  # without a header, 4 channels are taken for SD-VAE latents as in the reference
        default = {"name": "sd_vae" if model.in_channels == 4 else "identity"}
        autoencoder = normalize_autoencoder(header.get("autoencoder", default))
    id2label = (read(folder / "model_index.json") or {}).get("id2label")
    latent = autoencoder["name"] == "sd_vae"
    downsample = 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config else 8 if latent else 1
    data = header.get("data") or {
        "name": "unknown",
        "num_classes": model.num_classes,
        "image_size": model.input_size * downsample,
        "channels": 3 if latent else model.in_channels,
        "class_names": [id2label.get(str(i), str(i)) for i in range(model.num_classes)] if id2label else None,
    }
    return LoadedDiT(
        model=model,
        source_format="diffusers",
        diffusion=diffusion,
        autoencoder=autoencoder,
        data=data,
        guidance_channels=header.get("guidance_channels"),
        weights=header.get("weights", "ema"),
        coordinates=header.get("coordinates"),
    )


def load_diffusers_pipeline(folder: str | os.PathLike, **kwargs: Any) -> DiTPipeline:
    """`DiTPipeline.from_pretrained(folder, **kwargs)` with the reference timestep frequencies set."""
    pipe = DiTPipeline.from_pretrained(folder, **kwargs)
    use_reference_timestep_embedding(pipe.transformer)
    return pipe
