"""Post-hoc EMA (EDM2): the EMA of any profile, reconstructed from a run's snapshots (see conf/posthoc_ema.yaml).

    python src/train.py callbacks.posthoc_ema.enabled=true                  # a run that keeps snapshots
    python src/posthoc_ema.py run=outputs/<run>/<time> 'sigma_rel=[0.03,0.05,0.1,0.2]'
    python src/posthoc_ema.py run=outputs/<run>/<time> 'sigma_rel=[0.03,0.05,0.1,0.2]' fid=true 'seeds=[0,1]'

Writes <run>/checkpoints/posthoc_ema-sigma_rel_<σ>-step_<step>.ckpt per σ_rel: a checkpoint sample.py,
fid_nfe.py and export.py read, with the reconstruction as its EMA weights. With fid=true it scores each, and
the run's classic EMA (last.ckpt), with the run's FID settings, and writes posthoc_ema_fid.json (every
point's FID per sampling seed, NFE, checkpoint and sha256; how it was made), posthoc_ema_fid.md (the table)
and fid_vs_sigma_rel.png beside the checkpoints (out=).
"""

from typing import Any

import hydra
from omegaconf import DictConfig

from ditlab.cli import run_cli
from ditlab.report.posthoc_ema_fid import run_posthoc_ema_command


@hydra.main(config_path="../conf", config_name="posthoc_ema", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    return run_cli(run_posthoc_ema_command, cfg)


if __name__ == "__main__":
    main()
