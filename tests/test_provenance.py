"""What a record says about how it was made (`ditlab.provenance`): the source commit, the device, versions.
A training run's record holding them is tested in tests/test_train.py (the FID run)."""

import subprocess
from pathlib import Path

import lightning
import torch

from ditlab.provenance import cpu_name, describe_device, device_name, git_state, versions


def git(repo: Path, *args: str) -> str:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_git_state_is_the_commit_and_whether_the_tree_has_changes(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "pkg" / "a.py").write_text("x = 1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")
    assert git_state(repo / "pkg") == {"commit": head, "dirty": False}
    (repo / "pkg" / "a.py").write_text("x = 2\n")
    assert git_state(repo / "pkg") == {"commit": head, "dirty": True}
    # Untracked code inside a checkout (a wheel in a virtualenv there) is not that commit's.
    (repo / "venv" / "pkg").mkdir(parents=True)
    (repo / "venv" / "pkg" / "b.py").write_text("")
    assert git_state(repo / "venv" / "pkg") == {"commit": None, "dirty": None}
    assert git_state(tmp_path / "missing") == {"commit": None, "dirty": None}


def test_cpu_and_device_names_and_versions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core Processor\nflags\t\t: fpu\n")
    assert cpu_name(str(cpuinfo)) == "AMD EPYC 9R14 96-Core Processor"
    assert cpu_name(str(tmp_path / "missing"))  # platform's answer off Linux
    assert device_name("cpu") == cpu_name() == describe_device(torch.device("cpu"))["name"]
    found = versions()
    assert (found["torch"], found["lightning"]) == (torch.__version__, lightning.__version__)
    assert found["python"].count(".") == 2
