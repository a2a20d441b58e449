"""Sample images from a DiT checkpoint into a PNG grid and/or an ADM-format .npz (see conf/sample.yaml).

    python src/sample.py ckpt=DiT-XL-2-256x256.pt classes=[207,360,387,974] cfg_scale=4.0
    torchrun --nproc_per_node=8 src/sample.py ckpt=DiT-XL-2-256x256.pt num_samples=50000 png=false

Under torchrun every rank samples its own range of images on cuda:LOCAL_RANK; rank 0 writes the outputs.
"""

import os
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ditlab.cli import import_registering_modules, run_cli
from ditlab.interop import describe, load_dit, resolve_checkpoint
from ditlab.interop.sampling import generate
from ditlab.io import content_sha256


def guidance_channels(value: int | str, recommended: int | None) -> int | None:
    """`auto` -> the checkpoint's recommendation, `all` -> None, else the number."""
    if value == "auto":
        return recommended
    if value == "all":
        return None
    if isinstance(value, int):
        return value
    raise ValueError(f"guidance_channels must be auto, all or an integer, got {value!r}")


def sample(cfg: DictConfig) -> None:
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # the device index on this node, never the global rank
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    if cfg.classes is not None and not (OmegaConf.is_list(cfg.classes) and len(cfg.classes)):
        raise ValueError(
            f"classes={cfg.classes} is {'empty' if OmegaConf.is_list(cfg.classes) else 'not a list'}: give the "
            f"classes to sample, e.g. classes=[0,1,2] (per_class={cfg.per_class} images of each), or "
            f"classes=null for num_samples={cfg.num_samples} images with uniformly drawn labels"
        )
    if cfg.classes is not None and cfg.per_class < 1:
        raise ValueError(f"per_class={cfg.per_class} is out of range: it must be ≥ 1 (images of each class)")
    import_registering_modules(cfg)
    # The whole file's sha256 (about a second per GB, next to hours of sampling), before it is loaded: a
    # resumed job must not add shards of newer weights to old ones. Size and mtime would miss a copy that
    # keeps them; a hash of parts of the file would miss weights outside those parts.
    checkpoint_sha256 = content_sha256(resolve_checkpoint(cfg.ckpt, cfg.cache_dir))
    loaded = load_dit(cfg.ckpt, use_ema=cfg.use_ema, cache_dir=cfg.cache_dir)
    if cfg.vae:
        loaded.autoencoder = {**loaded.autoencoder, "pretrained": cfg.vae}
    guided = guidance_channels(cfg.guidance_channels, loaded.guidance_channels)
    labels = [c for c in cfg.classes for _ in range(cfg.per_class)] if cfg.classes is not None else None
    name = f"{Path(cfg.ckpt).stem}-{loaded.weights}-{cfg.sampler.name}{cfg.steps}-cfg{cfg.cfg_scale}"
    name += f"-seed{cfg.seed}-" + ("classes" if labels else str(cfg.num_samples))
    if rank == 0:
        print(
            f"{describe(loaded.model.config)} from {cfg.ckpt} ({loaded.source_format}, {loaded.weights} weights); "
            f"guidance on {'all' if guided is None else guided} channels; {world_size} rank(s), {device}"
        )
    written = generate(
        loaded,
        cfg.out or Path("samples") / name,
        labels=labels,
        num_samples=cfg.num_samples,
        cfg_scale=cfg.cfg_scale,
        guidance_channels=guided,
        cfg_interval=None if cfg.cfg_interval is None else list(cfg.cfg_interval),
        sampler=cfg.sampler.name,
        sampler_options=OmegaConf.to_container(cfg.sampler.options) if cfg.sampler.get("options") else {},
        steps=cfg.steps,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        precision=cfg.precision,
        device=device,
        rank=rank,
        world_size=world_size,
        npz=cfg.npz,
        png=cfg.png,
        png_images=None if labels else 64,
        png_nrow=cfg.per_class if labels else 8,
        keep_parts=cfg.keep_parts,
        progress=cfg.progress,
        job={"ckpt": str(cfg.ckpt), "use_ema": cfg.use_ema},
        checkpoint_sha256=checkpoint_sha256,
    )
    for kind, path in written.items():
        print(f"{kind}: {path}")


@hydra.main(config_path="../conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    return run_cli(sample, cfg)


if __name__ == "__main__":
    main()
