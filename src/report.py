"""FID against Gflops for a sweep: the paper's Table 4 (markdown and CSV) and its figures (options:
conf/report.yaml).

python src/report.py runs=multirun/2026-01-31_12-00-00             # one sweep folder (searched recursively)
python src/report.py 'runs=[multirun/<table4>,multirun/<ablation>]'  # several
python src/report.py wandb=my-team/ditlab wandb_group=2026-01-31_12-00-00   # from W&B (network)

Writes table4.md/.csv, runs.md, blocks.md/.csv (when the block varies), fid_vs_gflops.png, fid_vs_compute.png.
"""

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from ditlab.cli import error_line, run_cli, wandb_logged_in
from ditlab.report import run_report


def report(cfg: DictConfig) -> dict[str, Path]:
    """`run_report`, with W&B's failures (no API key, no network, an unknown project) as one line."""
    if cfg.get("wandb") and not wandb_logged_in():  # else wandb fails with a traceback, or after its retries
        raise ValueError(
            f"wandb={cfg.wandb}: reading runs from W&B needs an API key; run `wandb login` or set "
            "WANDB_API_KEY, or report from the run folders with runs=<sweep folder>"
        )
    if not (cfg.get("wandb") or cfg.get("log_wandb")):
        return run_report(cfg)
    import wandb.errors  # slow: only when W&B is used

    try:
        return run_report(cfg)
    except wandb.errors.Error as err:
        key = f"wandb={cfg.wandb}" if cfg.get("wandb") else "log_wandb=true"
        raise ValueError(
            f"{key}: W&B failed ({error_line(err)}); check the network, the API key (`wandb login`) and "
            "the entity/project, or report from the run folders with runs=<sweep folder>"
        ) from None


@hydra.main(config_path="../conf", config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> Any:
    return run_cli(report, cfg)


if __name__ == "__main__":
    main()
