"""Encode a dataset once with the autoencoder, then train from the stored latents (`data=latents`).

    python src/extract_latents.py data=image_folder data.root=/datasets/imagenet/train autoencoder=sd_vae
    torchrun --nproc-per-node 8 src/extract_latents.py data=image_folder ...   # ranks share the work

Rerun the same command to resume an interrupted extraction.
"""

import os
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from ditlab.cli import run_cli
from ditlab.data import extract_latents


def extract(cfg: DictConfig) -> None:
    device = cfg.device
    if device == "auto":
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    manifest = extract_latents(
        instantiate(cfg.data),
        instantiate(cfg.autoencoder),
        cfg.path,
        split=cfg.split,
        flip=cfg.flip,
        dtype=cfg.dtype,
        chunk_size=cfg.chunk_size,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=cfg.rank,
        world_size=cfg.world_size,
        device=device,
        wait_timeout_s=cfg.wait_timeout_s,
    )
    path = os.path.abspath(cfg.path)
    if not manifest["complete"]:
        print(
            f"rank {cfg.rank}: its chunks are done ({manifest['done_chunks']} of {manifest['num_chunks']} in all); "
            "the rank that finishes last completes the manifest. If a rank failed, rerun the same command."
        )
        return
    hydra_cfg = HydraConfig.get()
    autoencoder_args = [f"autoencoder={hydra_cfg.runtime.choices.autoencoder}"]
    autoencoder_args += [o for o in hydra_cfg.overrides.task if o.startswith("autoencoder.")]
    latents = manifest["latents"]
    print(
        f"Latents {latents['shape']} ({latents['dtype']}) of {manifest['data']['split']} are in {path}.\n"
        f"Train from them with:\n  python src/train.py data=latents data.path={path} {' '.join(autoencoder_args)}"
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract_latents")
def main(cfg: DictConfig) -> Any:
    return run_cli(extract, cfg)


if __name__ == "__main__":
    main()
