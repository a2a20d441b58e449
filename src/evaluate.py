"""Sample metrics: python src/evaluate.py samples=path/to/samples.npz ref=path/to/ref.npz|image_folder|fashion_mnist_test

Prints FID, sFID, Inception Score, precision and recall against the reference, names the feature network
that produced them, and writes them to <samples>.metrics.json. Options: conf/evaluate.yaml.
"""

from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from ditlab.cli import run_cli
from ditlab.metrics.evaluation import evaluate_samples, format_metrics, write_metrics_json
from ditlab.metrics.features import InceptionFeatures
from ditlab.metrics.image_sources import npz_image_shape
from ditlab.metrics.reference import load_reference


def evaluate(cfg: DictConfig) -> None:
    try:  # a bad samples file fails now, not after the reference statistics
        npz_image_shape(cfg.samples)
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"samples: {err}") from None
    device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    net = InceptionFeatures(cfg.inception, fc_weights_path=cfg.inception_fc_weights)
    reference = load_reference(
        cfg.ref,
        net,
        cache_dir=cfg.cache_dir,
        batch_size=cfg.batch_size,
        num_pr_images=cfg.num_pr_images,
        device=device,
    )
    results = evaluate_samples(cfg.samples, reference, net, batch_size=cfg.batch_size, device=device, k=cfg.k)
    print(format_metrics(results))
    print(f"wrote {write_metrics_json(results, cfg.samples)}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> Any:
    return run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
