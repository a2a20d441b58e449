"""A sweep is many experiments: one failing point never stops the others, and the sweep ends with a summary.

`ditlab.cli.run_cli` turns a failing job of a multirun into a `JobFailure` (its one line, and the traceback
of an unexpected error) instead of ending the process. `SweepSummary`, a Hydra callback (conf/hydra/
default.yaml), writes each job's outcome to `<job dir>/outcome.json` when the job ends, and when the sweep
ends reads them all back (so it works as well for jobs that a launcher ran on other machines), prints one
line per job, writes `<sweep dir>/summary.json` and exits with status 1 when any job failed.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ditlab.io import atomic_write_text

OUTCOME = "outcome.json"
SUMMARY = "summary.json"
ERROR_LOG = "error.log"


@dataclass
class JobFailure:
    """What a failed job of a sweep returns instead of ending the sweep: its one line, and for an
    unexpected error (not a configuration error) its traceback."""

    error: str
    traceback: str | None = None


def read_outcome(job_dir: str | Path) -> dict[str, Any] | None:
    """The outcome a job of a sweep recorded (status done|failed, error, overrides), or None."""
    path = Path(job_dir) / OUTCOME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class SweepSummary(Callback):
    """Records each job's outcome and summarises the sweep at its end (see the module docstring)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra = config.hydra
        if hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(hydra.runtime.output_dir)
        outcome: dict[str, Any] = {
            "job": hydra.job.num,
            "overrides": list(hydra.overrides.task),
            "dir": str(job_dir),
            "status": "done",
        }
        value = job_return._return_value  # the attribute: the property re-raises a failed job's error
        if job_return.status == JobStatus.FAILED or isinstance(value, JobFailure):
            failure = value if isinstance(value, JobFailure) else JobFailure(repr(value), None)
            outcome |= {"status": "failed", "error": failure.error}
            if failure.traceback:
                atomic_write_text(job_dir / ERROR_LOG, failure.traceback)
                outcome["log"] = str(job_dir / ERROR_LOG)
        atomic_write_text(job_dir / OUTCOME, json.dumps(outcome, indent=1) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = []
        for overrides in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
            job_dir = overrides.parent.parent
            outcome = read_outcome(job_dir) or {
                "job": None,
                "overrides": list(OmegaConf.load(overrides)),
                "dir": str(job_dir),
                "status": "no outcome (killed, or still running elsewhere)",
            }
            jobs.append(outcome)
        jobs.sort(key=lambda o: (o["job"] is None, o["job"] if o["job"] is not None else o["dir"]))
        atomic_write_text(sweep_dir / SUMMARY, json.dumps({"jobs": jobs}, indent=1) + "\n")
        failed = [o for o in jobs if o["status"] != "done"]
        print(f"[ditlab] sweep {sweep_dir}: {len(jobs) - len(failed)} of {len(jobs)} jobs done")
        for o in jobs:
            what = o["status"] if o["status"] != "failed" else f"failed: {o['error']}"
            where = f"  (traceback: {o['log']})" if o.get("log") else ""
            print(
                f"  {o['job'] if o['job'] is not None else '?':>3} {' '.join(o['overrides'])}: {what}{where}"
            )
        if failed:
            print(f"[ditlab] {len(failed)} job(s) failed; summary in {sweep_dir / SUMMARY}", file=sys.stderr)
            sys.exit(1)
