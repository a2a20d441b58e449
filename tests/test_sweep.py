"""A sweep outlives its failing points: the others run, every job's outcome is on disk, and the sweep ends
with a summary and an exit status that says some failed (ditlab.sweep)."""

import json

from ditlab.report import load_records
from test_train import TINY, needs_fashion_mnist, run_train

QUICK = [*TINY, "~callbacks.sample_grid", "logger=none"]


@needs_fashion_mnist
def test_a_bad_point_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(tmp_path, "-m", "patch=3,8", *QUICK, f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("error: patch size 3 does not divide the input size 32") == 1
    assert "Traceback" not in proc.stderr
    # The patch-8 job ran to its end after the patch-3 job failed.
    done = sweep / "1_adaln_zero-DiT-Ti-p8"
    assert (done / "checkpoints" / "last.ckpt").is_file() and (done / "results.json").is_file()
    summary = json.loads((sweep / "summary.json").read_text())["jobs"]
    assert [(j["job"], j["status"]) for j in summary] == [(0, "failed"), (1, "done")]
    assert (
        summary[0]["error"].startswith("patch size 3 does not divide")
        and summary[0]["overrides"][0] == "patch=3"
    )
    assert "log" not in summary[0]  # a configuration error has its one line, no traceback
    lines = proc.stdout.splitlines()
    at = lines.index(
        next(line for line in lines if line.startswith(f"[ditlab] sweep {sweep}: 1 of 2 jobs done"))
    )
    assert "0 patch=3" in lines[at + 1] and "failed: patch size 3" in lines[at + 1]
    assert "1 patch=8" in lines[at + 2] and lines[at + 2].endswith(": done")


@needs_fashion_mnist
def test_an_unexpected_error_keeps_its_traceback_and_the_sweep_goes_on(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    proc = run_train(
        tmp_path,
        "-m",
        "optim.lr=1e30,1e-3",
        *QUICK,
        "trainer.max_steps=7",
        f"hydra.sweep.dir={sweep}",
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    jobs = {j["overrides"][0]: j for j in json.loads((sweep / "summary.json").read_text())["jobs"]}
    diverged, fine = jobs["optim.lr=1e+30"], jobs["optim.lr=0.001"]
    assert diverged["status"] == "failed" and diverged["error"].startswith(
        "RuntimeError: the loss was NaN/inf"
    )
    with open(diverged["log"]) as f:  # the traceback, kept in the job's folder
        assert f.read().startswith("Traceback")
    assert fine["status"] == "done"
    assert json.loads((sweep / "1_adaln_zero-DiT-Ti-p8" / "outcome.json").read_text())["status"] == "done"

    # The report reads the run that finished and names the one it skips.
    records = load_records(sweep)
    assert [r.source for r in records] == [str(sweep / "1_adaln_zero-DiT-Ti-p8" / "results.json")]
    assert (sweep / "0_adaln_zero-DiT-Ti-p8" / "results.json").is_file()  # written part-way, not read
    assert "skipped 1 failed run(s)" in capsys.readouterr().out
