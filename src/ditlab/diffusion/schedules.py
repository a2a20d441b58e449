"""Noise schedules and timestep respacing (Ho et al. 2020; Nichol & Dhariwal 2021)."""

import itertools
import math

import torch

SCHEDULES = ("linear", "cosine")


def make_betas(schedule: str, num_timesteps: int) -> torch.Tensor:
    """The β_t of a named schedule: a float64 tensor of shape (num_timesteps,).

    "linear": evenly spaced from 1e-4 to 0.02 at T=1000, both ends scaled by 1000/T so that other step
    counts keep the same total noise. "cosine": ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2) with s = 0.008 and
    β capped at 0.999 to avoid the singularity at t = T.
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
    if schedule == "linear":
        scale = 1000 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {schedule!r}; choose one of {SCHEDULES}")


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
    """The sorted timesteps of the original process that a respaced process keeps (ADM's rule).

    `section_counts` is a step count ("250" or 250), a comma-separated list of per-section counts
    ("10,15,20": the T steps are cut into three equal sections, the first keeping 10 evenly spaced
    steps, and so on), or "ddimN" for DDIM's fixed integer stride giving exactly N steps. Within a
    section the positions are accumulated in floating point and rounded, as the reference does, so
    that the kept steps (and hence FID numbers) match it exactly: "250" of 1000 keeps
    round(i·999/249), i = 0..249.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        count = int(section_counts.removeprefix("ddim"))
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"no integer stride gives exactly {count} of {num_timesteps} steps")
    if isinstance(section_counts, int):
        counts = [section_counts]
    else:
        try:
            counts = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep respacing {section_counts!r} must be a step count like '250', "
                "per-section counts like '10,15,20', or 'ddimN'"
            ) from None
    size, extra = divmod(num_timesteps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if not 1 <= count <= section:
            raise ValueError(f"cannot keep {count} steps of a section of {section} (of {num_timesteps})")
        stride = (section - 1) / (count - 1) if count > 1 else 1.0
        positions = itertools.accumulate([stride] * (count - 1), initial=0.0)
        steps += [start + round(p) for p in positions]
        start += section
    return steps
