"""Each committed campaign (experiments/results/<preset>/) is what its preset composes to: every committed
run is one job of `python src/train.py -m experiment=<preset>`, with the coordinates, seed, steps, batch,
FID protocol, precision and device its record states, so that rerunning the preset reruns those runs and
not what today's defaults or this machine's `auto` would pick."""

import json
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

from ditlab.design import DesignPoint
from test_report import sweep_jobs

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"
# The committed campaigns run by a preset (experiment=<name>); the sampling study (results/sampling/runs/) is a
# script's, experiments/sampling_study.sh.
PRESETS = RESULTS.parents[1] / "conf" / "experiment"
CAMPAIGNS = sorted(
    {
        path.parent.parent.name
        for path in RESULTS.glob("*/*/results.json")
        if (PRESETS / f"{path.parent.parent.name}.yaml").is_file()
    }
)

# Committed runs launched with more than the preset on the command line (experiments/README.md: the one-layer
# runs of cpu_successors).
EXTRA_SWEEPS = {
    "cpu_successors": [
        ["+design_point=sit_linear_logit_normal", axis, "seed=0,1"]
        for axis in ("pos_embed=sincos_rope", "norm=rmsnorm", "mlp=swiglu")
    ],
}
# (accelerator, precision) of committed records written before results.json held them, as the READMEs
# state, by the prefix of the run's folder: cpu_design_space on the 2-core Xeon in fp32, cpu_successors on
# the 2-core EPYC in bf16-mixed, cpu_bf16 both precisions there.
STATED = {
    "cpu_design_space": {"": ("cpu", "32-true")},
    "cpu_successors": {"": ("cpu", "bf16-mixed")},
    "cpu_bf16": {"fp32-": ("cpu", "32-true"), "bf16-": ("cpu", "bf16-mixed")},
}


def ran_with(campaign: str, folder: str, record: dict[str, Any]) -> tuple[str, str]:
    """(accelerator, precision) of a committed run: from its record where it holds them, else as stated."""
    stated = next(
        (v for prefix, v in STATED.get(campaign, {}).items() if folder.startswith(prefix)), (None, None)
    )
    config = record.get("config") or {}
    accelerator = (config.get("trainer") or {}).get("accelerator") or stated[0]
    return accelerator, record.get("precision") or stated[1]


def is_run_of(job: DictConfig, record: dict[str, Any], precision: str) -> bool:
    coords = DesignPoint.from_config(job).coordinates()
    same_point = all(coords.get(key) == value for key, value in record["coordinates"].items())
    return same_point and job.seed == record["seed"] and job.trainer.precision == precision


@pytest.mark.parametrize("campaign", CAMPAIGNS)
def test_a_campaign_preset_composes_to_its_committed_runs(campaign):
    jobs = [job for extra in [[], *EXTRA_SWEEPS.get(campaign, [])] for job in sweep_jobs(campaign, *extra)]
    for path in sorted((RESULTS / campaign).glob("*/results.json")):
        record = json.loads(path.read_text())
        accelerator, precision = ran_with(campaign, path.parent.name, record)
        job = next((j for j in jobs if is_run_of(j, record, precision)), None)
        assert job is not None, f"{path}: no job of experiment={campaign} has its point, seed and {precision}"
        jobs.remove(job)
        assert job.trainer.accelerator == accelerator, path
        assert (job.optim.max_steps, job.optim.max_time) == (record["step"], None), path  # equal steps
        assert record["images_seen"] == record["step"] * job.optim.global_batch_size, path
        assert job.data._target_.endswith(record["data"]), path
        for key in ("lr", "ema_decay"):
            assert record.get(key, job.optim[key]) == job.optim[key], (path, key)
        fid = job.callbacks.fid
        assert (fid.num_samples, fid.num_reference_images) == (
            record["fid_num_samples"],
            record["fid_reference_images"],
        ), path
        sampler = DesignPoint.from_config(job).sampler  # the FID's, "auto" resolved as training resolves it
        assert f"{sampler} {fid.steps} steps, cfg {fid.cfg_scale}" == record["fid_sampler"], path
        every, last = fid.every_n_steps, record["step"]
        expected = sorted({*range(every, last + 1, every), last}) if every else [last]
        assert [p["step"] for p in record["fid_history"]] == expected, path
    assert not jobs, f"experiment={campaign} runs {len(jobs)} job(s) with no committed record"
