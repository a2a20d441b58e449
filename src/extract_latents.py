"""Encode a dataset once with the autoencoder, then train from the stored latents (`data=latents`).

    python src/extract_latents.py data=image_folder data.root=/datasets/imagenet/train autoencoder=sd_vae
    torchrun --nproc-per-node 8 src/extract_latents.py data=image_folder ...   # ranks share the work

Rerun the same command to resume an interrupted extraction.
"""

from typing import Any

import hydra
from omegaconf import DictConfig

from ditlab.cli import run_cli
from ditlab.data.extract import run_extract


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract_latents")
def main(cfg: DictConfig) -> Any:
    return run_cli(run_extract, cfg)


if __name__ == "__main__":
    main()
