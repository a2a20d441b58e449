"""One short training run per value of each axis the paper's successors added, on this machine: does it
train (its loss falls) and sample? Every run is the CPU demo's point (DiT-Ti/4 adaLN-Zero on Fashion-MNIST,
the demo's optimiser) for `--steps` steps with one axis changed; the interpolant's samplers each sample the
`sit_linear` run's checkpoint through `src/sample.py`.

    python experiments/successor_smoke.py [--steps 300] [--out experiments/results/successor_axes]

Writes `<out>/smoke.json` and `smoke.md` (per run: the mean loss of the first and of the last 10% of the
logged steps, seconds, the final guided grid) and `<out>/grids/`. A run's loss is its objective's own
(DDPM's L_simple + L_vlb, the interpolant's velocity/noise/score MSE): compare a run with itself, not
across objectives.
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ditlab.io import atomic_write_text
from ditlab.provenance import cpu_name

ROOT = Path(__file__).resolve().parents[1]
RUNS: dict[str, list[str]] = {  # name -> the overrides that set the axis value
    "paper (ddpm, sincos, layernorm, gelu)": [],
    "diffusion=sit_linear": ["diffusion=sit_linear"],
    "diffusion=sit_gvp": ["diffusion=sit_gvp"],
    "diffusion.predict=noise": ["diffusion=sit_linear", "diffusion.predict=noise"],
    "diffusion.predict=score": ["diffusion=sit_linear", "diffusion.predict=score"],
    "diffusion.time_sampling=logit_normal": ["diffusion=sit_linear", "diffusion.time_sampling=logit_normal"],
    "pos_embed=rope": ["pos_embed=rope"],
    "pos_embed=sincos_rope": ["pos_embed=sincos_rope"],
    "norm=rmsnorm": ["norm=rmsnorm"],
    "qk_norm=true": ["qk_norm=true"],
    "mlp=swiglu": ["mlp=swiglu"],
    "repa=random_vit": ["repa=random_vit"],
}
SAMPLERS = {"euler": 50, "heun": 25, "dopri5": 50, "euler_maruyama": 50}  # steps: ~50 model evaluations


def losses(run_dir: Path) -> list[float]:
    """train/loss of every logged step (CSV logger)."""
    values = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with path.open() as f:
            values += [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    return values


def train(name: str, overrides: list[str], steps: int, run_dir: Path) -> dict:
    args = [
        sys.executable,
        str(ROOT / "src" / "train.py"),
        *overrides,
        f"optim.max_steps={steps}",
        "optim.max_time=null",
        "logger=csv",
        "trainer.log_every_n_steps=10",
        "~callbacks.fid",
        "callbacks.sample_grid.per_class=4",
        f"hydra.run.dir={run_dir}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"name": name, "overrides": overrides, "error": proc.stderr.strip().splitlines()[-1:]}
    curve = losses(run_dir)
    tenth = max(1, len(curve) // 10)
    first, last = float(np.mean(curve[:tenth])), float(np.mean(curve[-tenth:]))
    return {
        "name": name,
        "overrides": overrides,
        "steps": steps,
        "seconds": seconds,
        "loss_first": first,
        "loss_last": last,
        "loss_falls": last < first,
        "grid": str(run_dir / "samples" / "final.png"),
    }


def sample_with(sampler: str, steps: int, ckpt: Path, out: Path) -> dict:
    args = [
        sys.executable,
        str(ROOT / "src" / "sample.py"),
        f"ckpt={ckpt}",
        f"out={out.with_suffix('')}",
        "classes=[0,1,2,3,4,5,6,7,8,9]",
        "per_class=4",
        f"sampler={sampler}",
        f"steps={steps}",
        "cfg_scale=4",
        f"hydra.run.dir={out.parent}",
        "progress=false",
    ]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"sampler": sampler, "error": proc.stderr.strip().splitlines()[-1:]}
    seconds = time.perf_counter() - start
    return {"sampler": sampler, "steps": steps, "seconds": seconds, "grid": str(out.with_suffix(".png"))}


def markdown(record: dict) -> str:
    lines = [
        f"Short runs, {record['steps']} steps each, on {record['machine']} ({record['date']}).",
        "",
        "| run | loss, first 10% of steps | loss, last 10% | falls | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in record["runs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {' '.join(r['error'])} | | | |")
        else:
            lines.append(
                f"| {r['name']} | {r['loss_first']:.4f} | {r['loss_last']:.4f} | "
                f"{'yes' if r['loss_falls'] else 'NO'} | {r['seconds']:.0f} |"
            )
    lines += ["", "Samplers on the `diffusion=sit_linear` run (cfg 4, 4 per class):", ""]
    lines += ["| sampler | steps | seconds |", "|---|---|---|"]
    for s in record["samplers"]:
        if "error" in s:
            lines.append(f"| {s['sampler']} | error: {' '.join(s['error'])} | |")
        else:
            lines.append(f"| {s['sampler']} | {s['steps']} | {s['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "successor_axes")
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "successor_smoke")
    args = p.parse_args()
    grids = args.out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, (name, overrides) in enumerate(RUNS.items()):
        run_dir = args.work / f"{i:02d}"
        result = train(name, overrides, args.steps, run_dir)
        if "grid" in result:
            shutil.copy(result["grid"], grids / f"{i:02d}.png")
            result["grid"] = f"grids/{i:02d}.png"
        print(json.dumps(result), flush=True)
        runs.append(result)
    flow_ckpt = args.work / "01" / "checkpoints" / "last.ckpt"
    samplers = []
    for sampler, steps in SAMPLERS.items():
        result = sample_with(sampler, steps, flow_ckpt, args.work / "samplers" / f"{sampler}.npz")
        if "grid" in result:
            shutil.copy(result["grid"], grids / f"sampler-{sampler}.png")
            result["grid"] = f"grids/sampler-{sampler}.png"
        print(json.dumps(result), flush=True)
        samplers.append(result)
    record = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "runs": runs,
        "samplers": samplers,
    }
    atomic_write_text(args.out / "smoke.json", json.dumps(record, indent=1))
    atomic_write_text(args.out / "smoke.md", markdown(record))
    print(markdown(record))


if __name__ == "__main__":
    main()
