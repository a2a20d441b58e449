"""What the entry points share: bad input ends with one clear line and exit status 2, not a traceback; one
rule for `device=auto` (`resolve_device`)."""

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from ditlab.sweep import JobFailure

HANDLED = (ValueError, OSError, OmegaConfBaseException)


def error_line(error: BaseException) -> str:
    """The one line a user sees for `error`."""
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.strerror:
        where = f" {error.filename}" if error.filename else ""
        return f"{error.strerror}:{where} (check the path, its permissions and the free space)"
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1:  # re-raised from a DataLoader worker: its last line
        return lines[-1].split(": ", 1)[-1]
    return lines[0]


def run_cli(fn: Callable[..., Any], *args: Any) -> Any:
    """Runs `fn(*args)` for an entry point (`src/*.py`, all Hydra apps). Our validation
    (ValueError, FileNotFoundError), a config error, or a file-system error (permissions, a full disk)
    exits with status 2 and one line. HYDRA_FULL_ERROR=1 shows the traceback instead.

    In a sweep (`-m`) no error ends the process: the job prints its line (and the traceback of an
    unexpected error: an OOM, a NaN, a bug) and returns a `JobFailure`, the sweep goes on with the next
    point, and `ditlab.sweep.SweepSummary` lists every job's outcome at the end."""
    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return fn(*args)
    except (*HANDLED, InstantiationException) as error:
        # Hydra's instantiate wraps what a constructor raised (our validation of a callback's values).
        cause = error.__cause__ if isinstance(error, InstantiationException) else error
        expected = isinstance(cause, HANDLED)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not (expected or sweep):
            raise
        if not expected:
            return _failed_job(error)
        print(f"error: {error_line(cause)}", file=sys.stderr)
        if sweep:
            return JobFailure(error=error_line(cause))
        sys.exit(2)
    except Exception as error:
        if not sweep:
            raise
        return _failed_job(error)


def _failed_job(error: BaseException) -> JobFailure:
    """An unexpected error in a sweep's job: its traceback printed and kept, the sweep goes on."""
    trace = "".join(traceback.format_exception(error))
    print(trace, file=sys.stderr)
    return JobFailure(error=f"{type(error).__name__}: {error_line(error)}", traceback=trace)


def resolve_device(name: str) -> torch.device:
    """The device a `device=` option names: "auto" is this process's GPU (cuda:LOCAL_RANK, one per rank
    under torchrun) when CUDA is available, else the CPU; any other name is `torch.device(name)`. A name
    torch does not know, or a CUDA device that is not there, is a ValueError in one line."""
    if name == "auto":
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name} is not a device; use auto, cpu, cuda or cuda:<index>") from None
    count = torch.cuda.device_count()  # 0 without CUDA
    if device.type == "cuda" and (device.index or 0) >= count:
        raise ValueError(
            f"device={name} but this machine sees {count} CUDA GPU(s); use device=auto or device=cpu, or "
            "check CUDA_VISIBLE_DEVICES and the driver"
        )
    return device


def wandb_logged_in() -> bool:
    """Whether W&B has an API key (`WANDB_API_KEY`, or `wandb login`'s netrc entry), checked without the
    network: without one, online W&B calls fail only after wandb's retries."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
