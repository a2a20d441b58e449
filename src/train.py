"""Train one point of the DiT design space, or sweep many with -m.

python src/train.py                                        # the embedded default, on a laptop CPU
python src/train.py block=adaln_zero model=DiT-B patch=4   # one point
python src/train.py -m patch=2,4,8                         # one run per point
"""

from typing import Any

import hydra
from omegaconf import DictConfig

from ditlab.cli import run_cli
from ditlab.training.run import train


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    return run_cli(train, cfg)


if __name__ == "__main__":
    main()
