"""Sample images from a DiT checkpoint into a PNG grid and/or an ADM-format .npz (see conf/sample.yaml).

    python src/sample.py ckpt=DiT-XL-2-256x256.pt classes=[207,360,387,974] cfg_scale=4.0
    torchrun --nproc_per_node=8 src/sample.py ckpt=DiT-XL-2-256x256.pt num_samples=50000 png=false

Under torchrun every rank samples its own range of images on cuda:LOCAL_RANK; rank 0 writes the outputs.
"""

from typing import Any

import hydra
from omegaconf import DictConfig

from ditlab.cli import run_cli
from ditlab.interop.generation import run_sample


@hydra.main(config_path="../conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    return run_cli(run_sample, cfg)


if __name__ == "__main__":
    main()
