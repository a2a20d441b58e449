"""FID against Gflops for a sweep: the paper's Table 4 (markdown and CSV) and its figures (options:
conf/report.yaml).

python src/report.py runs=multirun/2026-01-31_12-00-00             # one sweep folder (searched recursively)
python src/report.py 'runs=[multirun/<table4>,multirun/<ablation>]'  # several
python src/report.py wandb=my-team/ditlab wandb_group=2026-01-31_12-00-00   # from W&B (network)

Writes table4.md/.csv, runs.md, blocks.md/.csv (when the block varies), fid_vs_gflops.png, fid_vs_compute.png.
"""

from typing import Any

import hydra
from omegaconf import DictConfig

from ditlab.cli import run_cli
from ditlab.report import run_report


@hydra.main(config_path="../conf", config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    return run_cli(run_report, cfg)


if __name__ == "__main__":
    main()
