"""Post-hoc EMA (EDM2): the EMA of any profile, reconstructed from a run's snapshots (see conf/posthoc_ema.yaml).

    python src/train.py callbacks.posthoc_ema.enabled=true                  # a run that keeps snapshots
    python src/posthoc_ema.py run=outputs/<run>/<time> 'sigma_rel=[0.03,0.05,0.1,0.2]'

Writes <run>/checkpoints/posthoc_ema-sigma_rel_<σ>-step_<step>.ckpt per σ_rel: a checkpoint sample.py,
fid_nfe.py and export.py read, with the reconstruction as its EMA weights.
"""

from typing import Any

import hydra
from omegaconf import DictConfig

from ditlab.cli import run_cli
from ditlab.training.posthoc_ema import run_posthoc_ema


@hydra.main(config_path="../conf", config_name="posthoc_ema", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    return run_cli(run_posthoc_ema, cfg)


if __name__ == "__main__":
    main()
