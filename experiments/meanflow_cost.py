"""The cost of a MeanFlow training step against SiT's interpolant (sit_linear) on the CPU demo's model.

    python experiments/meanflow_cost.py [--rounds 5] [--steps 4] [--out experiments/bench_results]

A step: the objective's loss (MeanFlow's with its JVP), backward, AdamW, on random 1-channel 32×32 images,
batch 32, DiT-Ti/4 as each design point builds it, in fp32 and under bf16 autocast. Each round runs every
mode (1 untimed step, then `--steps` timed), the order reversed every other round so that drift in the
machine's load falls on all alike; a row is the median and range over the rounds of seconds per step.
"""

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ditlab.design import DesignPoint
from ditlab.models import build_dit
from ditlab.provenance import describe_device, git_state, versions

TARGETS = {
    "sit_linear": "ditlab.diffusion.interpolant.Interpolant",
    "meanflow": "ditlab.diffusion.meanflow.MeanFlow",
}


def step_timer(objective: str, bf16: bool, batch: int = 32) -> Callable[[int], float]:
    """A function timing `steps` training steps of the objective's design point (seconds per step)."""
    point = DesignPoint(model="DiT-Ti", patch=4, objective_options={"_target_": TARGETS[objective]})
    model = build_dit(**point.model_arguments(), input_size=32, in_channels=1, num_classes=10)
    diffusion, optimizer = point.build_objective(), torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 1, 32, 32, generator=g), torch.randint(10, (batch,), generator=g)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = diffusion.training_losses(model, x, model_kwargs={"y": y}, generator=g)["loss"].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("experiments/bench_results"))
    args = parser.parse_args()
    modes = {f"{o} {p}": step_timer(o, p == "bf16") for o, p in itertools.product(TARGETS, ("fp32", "bf16"))}
    times: dict[str, list[float]] = {name: [] for name in modes}
    for i in range(args.rounds):
        for name in list(modes)[:: 1 if i % 2 == 0 else -1]:
            modes[name](1)  # untimed: this mode's caches and allocations warm again after the others
            times[name].append(modes[name](args.steps))
    rows = {
        name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s)}
        for name, s in times.items()
    }
    print(f"{'mode':<16}{'s/step':>9}{'range':>18}{'× sit_linear':>14}")
    for name, row in rows.items():
        base = rows[name.replace("meanflow", "sit_linear")]["median_s"]
        spread = f"[{row['min_s']:.3f}, {row['max_s']:.3f}]"
        print(f"{name:<16}{row['median_s']:>9.3f}{spread:>18}{row['median_s'] / base:>14.2f}")
    record = {"device": describe_device(torch.device("cpu")), "versions": versions(), "git": git_state()}
    record |= {"model": "DiT-Ti/4", "batch": 32, "rounds": args.rounds, "steps": args.steps, "modes": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"meanflow-cost-{time.strftime('%Y-%m-%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
