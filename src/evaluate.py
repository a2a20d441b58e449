"""Sample metrics: python src/evaluate.py samples=path/to/samples.npz ref=path/to/ref.npz|image_folder|fashion_mnist_test

Prints FID, sFID, Inception Score, precision and recall (and FD-DINOv2 when DINOv2's weights are at hand)
against the reference, names the feature network that produced them, and writes them to
<samples>.metrics.json; samples=[a.npz,b.npz,c.npz] (one set per sampling seed) adds their mean ± std.
Options: conf/evaluate.yaml.
"""

from typing import Any

import hydra
from omegaconf import DictConfig

from ditlab.cli import run_cli
from ditlab.metrics.evaluation import run_evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> Any:
    return run_cli(run_evaluate, cfg)


if __name__ == "__main__":
    main()
