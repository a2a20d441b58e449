"""`python src/evaluate.py samples=... ref=...` end to end, with the real TF Inception on a few tiny images."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~15 s on 2 CPU cores: imports, and torchmetrics' 2048×2048 eigvals for FID and sFID
def test_evaluate_cli_writes_metrics_json(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 128, (5, 16, 16), dtype=np.uint8))  # grey reference
    command = [
        sys.executable,
        str(REPO / "src" / "evaluate.py"),
        f"samples={tmp_path / 'samples.npz'}",
        f"ref={tmp_path / 'ref.npz'}",
        f"cache_dir={tmp_path / 'cache'}",
        "device=cpu",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "feature network  TF Inception-v3 2015-12-05" in run.stdout

    results = json.loads((tmp_path / "samples.metrics.json").read_text())
    assert results["num_samples"] == 5 and results["num_reference_images"] == 5
    assert "TF Inception-v3 2015-12-05" in results["feature_network"]
    assert math.isfinite(results["fid"]) and results["fid"] > 0 and math.isfinite(results["sfid"])
    assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1
    assert results["inception_score"] is None  # no classifier weights given
    assert len(list((tmp_path / "cache").glob("ref-*.npz"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cache",
        "ref.npz",
        "samples.metrics.json",
        "samples.npz",
    ]
