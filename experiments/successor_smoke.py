"""One short training run per value of each axis the paper's successors added, on this machine: does it
train (its loss falls) and sample? Every run is the CPU demo's point (DiT-Ti/4 adaLN-Zero on Fashion-MNIST,
the demo's optimiser) for `--steps` steps with one axis changed; the interpolant's samplers each sample the
`sit_linear` run's checkpoint, MeanFlow's one- and two-step sampler the `meanflow` run's, through
`src/sample.py`.

    python experiments/successor_smoke.py [--steps 300] [--out experiments/results/successor_axes]

Writes `<out>/smoke.json` and `smoke.md` (per run: the mean of train/mse over the first and over the last
10% of the logged steps, seconds, the final guided grid) and `<out>/grids/`. train/mse is the prediction's
squared error against its objective's own target (DDPM's L_simple, the interpolant's velocity/noise/score/data
error, MeanFlow's unweighted ‖Δ‖²: its adaptively weighted loss sits near 1 by design; with masking the visible
pixels' error, the fine-tune's over all): compare a run with itself, not across objectives.
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
    "diffusion.predict=data": ["diffusion=sit_linear", "diffusion.predict=data"],
    "diffusion.predict=data, patch=8": ["diffusion=sit_linear", "diffusion.predict=data", "patch=8"],
    "diffusion.predict=data, diffusion.loss=x": [
        "diffusion=sit_linear",
        "diffusion.predict=data",
        "diffusion.loss=x",
    ],
    "diffusion.time_shift=3": ["diffusion=sit_linear", "diffusion.time_shift=3"],
    "loss_terms.cosine_velocity=1": ["diffusion=sit_linear", "loss_terms.cosine_velocity=1"],
    "loss_terms.dispersive=0.5": ["loss_terms.dispersive=0.5"],
    "long_skip=true": ["long_skip=true"],
    "masking.mask_ratio=0.5 (last 10% unmasked)": [
        "masking.mask_ratio=0.5",
        "masking.finetune_steps={tenth}",
    ],
    "callbacks.posthoc_ema.enabled=true": ["callbacks.posthoc_ema.enabled=true"],
    "diffusion=meanflow": ["diffusion=meanflow"],
}
# (run, sampler, steps, sampler options): the interpolant's samplers at ~50 model evaluations on the
# sit_linear run, its Euler grid shifted towards the noise, and MeanFlow's one- and two-step sampling.
SAMPLERS: list[tuple[str, str, int, dict[str, int | float]]] = [
    ("diffusion=sit_linear", "euler", 50, {}),
    ("diffusion=sit_linear", "heun", 25, {}),
    ("diffusion=sit_linear", "dopri5", 50, {}),
    ("diffusion=sit_linear", "euler_maruyama", 50, {}),
    ("diffusion=sit_linear", "euler", 50, {"time_shift": 3}),
    ("diffusion=meanflow", "meanflow", 1, {}),
    ("diffusion=meanflow", "meanflow", 2, {}),
]


def losses(run_dir: Path) -> list[float]:
    """train/mse of every logged step (CSV logger)."""
    values = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with path.open() as f:
            values += [float(row["train/mse"]) for row in csv.DictReader(f) if row.get("train/mse")]
    return values


def train(name: str, overrides: list[str], steps: int, run_dir: Path) -> dict:
    overrides = [o.format(tenth=max(1, steps // 10)) for o in overrides]
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


def sample_with(sampler: str, steps: int, options: dict[str, int | float], ckpt: Path, out: Path) -> dict:
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
        *(f"++sampler.options.{key}={value}" for key, value in options.items()),
    ]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"sampler": sampler, "options": options, "error": proc.stderr.strip().splitlines()[-1:]}
    seconds = time.perf_counter() - start
    return {
        "sampler": sampler,
        "options": options,
        "steps": steps,
        "seconds": seconds,
        "grid": str(out.with_suffix(".png")),
    }


def markdown(record: dict) -> str:
    lines = [
        f"Short runs, {record['steps']} steps each, on {record['machine']} ({record['date']}).",
        "",
        "| run | MSE, first 10% of steps | MSE, last 10% | falls | seconds |",
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
    lines += ["", "Samplers on the runs' checkpoints (cfg 4, 4 per class):", ""]
    lines += ["| run | sampler | steps | seconds |", "|---|---|---|---|"]
    for s in record["samplers"]:
        name = s["sampler"] + "".join(f", {key} {value}" for key, value in s["options"].items())
        if "error" in s:
            lines.append(f"| {s['run']} | {name} | error: {' '.join(s['error'])} | |")
        else:
            lines.append(f"| {s['run']} | {name} | {s['steps']} | {s['seconds']:.0f} |")
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
    samplers = []
    for run, sampler, steps, options in SAMPLERS:
        ckpt = args.work / f"{list(RUNS).index(run):02d}" / "checkpoints" / "last.ckpt"
        name = f"{sampler}-{steps}" + "".join(f"-{key}{value}" for key, value in options.items())
        result = {
            "run": run,
            **sample_with(sampler, steps, options, ckpt, args.work / "samplers" / f"{name}.npz"),
        }
        if "grid" in result:
            shutil.copy(result["grid"], grids / f"sampler-{name}.png")
            result["grid"] = f"grids/sampler-{name}.png"
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
