"""FID against network evaluations (NFE) of one checkpoint, one line per sampler (see conf/fid_nfe.yaml).

    python src/fid_nfe.py ckpt=outputs/<run>/<time>/checkpoints/last.ckpt samplers=[ddim,dpmsolver++,unipc,ddpm] \\
        steps=[5,10,25,50] num_samples=500 seeds=[0,1]

Writes <out>/fid_nfe.json (every point's FID per sampling seed and NFE, the skipped points, how it was made)
and <out>/fid_vs_nfe.png; out defaults to <run>/fid_nfe.
"""

from typing import Any

import hydra
from omegaconf import DictConfig

from ditlab.cli import run_cli
from ditlab.report.fid_nfe import run_fid_nfe


@hydra.main(config_path="../conf", config_name="fid_nfe", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    return run_cli(run_fid_nfe, cfg)


if __name__ == "__main__":
    main()
