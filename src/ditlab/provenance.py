"""How a result was made: the source tree's git commit, the machine, the library versions. One home for
the run record (`results.json`) and the benchmark scripts (`experiments/bench.py`)."""

import contextlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def git_state(path: str | Path = PACKAGE_DIR) -> dict[str, Any]:
    """`{"commit": <sha>, "dirty": <bool>}` of the git checkout that tracks `path` (the ditlab sources by
    default), dirty when it holds uncommitted changes or untracked files; both None when `path` is not
    tracked by one (an installed wheel), git is missing or slow. Never raises: provenance must not fail a
    run."""

    def git(*args: str) -> str:
        command = ["git", "-C", str(path), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        # Tracked, not merely inside some checkout (a wheel installed in a virtualenv under one).
        git("ls-files", "--error-unmatch", ".")
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def cpu_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model ("AMD EPYC 9R14 96-Core Processor") from /proc/cpuinfo; elsewhere what `platform`
    knows (on Linux `platform.processor()` is only the architecture)."""
    with contextlib.suppress(OSError), open(cpuinfo) as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device | str) -> str:
    """The GPU's name for a CUDA device, else the CPU's model."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def describe_device(device: torch.device) -> dict[str, Any]:
    """The device's name and what else bounds its speed: the CUDA version, or the cores and torch threads."""
    if device.type == "cuda":
        return {"name": device_name(device), "cuda": torch.version.cuda}
    return {"name": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def versions() -> dict[str, str | None]:
    """Python, torch and Lightning versions, and CUDA's where torch was built with it."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": metadata.version("lightning"),  # without importing it: bench scripts may not
        "cuda": torch.version.cuda,
    }
