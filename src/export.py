"""Export a DiT checkpoint to safetensors and/or a diffusers folder (options: conf/export.yaml).

python src/export.py ckpt=last.ckpt safetensors=dit.safetensors
python src/export.py ckpt=DiT-XL-2-256x256.pt diffusers=dit-xl-2-256 vae=path/to/sd-vae-ft-ema
python src/export.py ckpt=DiT-XL-2-256x256.pt diffusers=dit-xl-2-256 include_vae=false   # offline
"""

from typing import Any

import hydra
from omegaconf import DictConfig

from ditlab.cli import run_cli
from ditlab.interop.export import export


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    return run_cli(export, cfg)


if __name__ == "__main__":
    main()
