"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2, Section 3 and Appendix C): the math, the snapshot files, and the reconstruction `src/posthoc_ema.py` runs.

A power-function EMA averages the weights θ(τ) of training time τ ∈ (0, t] with the profile

    p_{γ,t}(τ) = (γ + 1) τ^γ / t^(γ + 1),

which integrates to 1; its relative standard deviation (of τ/t under p) is
σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3))). Run one step at a time it is the EMA
θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t with β_t = (1 − 1/t)^(γ + 1), t counted from 1 (θ̂_1 = θ_1). That
recursion is exact, not an approximation: it gives step τ the weight (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1),
the profile's integral over (τ − 1, τ], so θ̂_t is the profile applied to the piecewise-constant
trajectory θ(τ) = θ_⌈τ⌉.

Training keeps two such EMAs (`ditlab.training.callbacks.PostHocEMA`) and saves both every N steps. Each
snapshot is linear in the trajectory, so the EMA of another profile (any γ, any step t up to the last
snapshot) is approximated by the combination Σ x_i θ̂_i of the snapshots whose profiles best approximate
its profile in L2 over τ: the normal equations A x = b with A_ij = ⟨p_i, p_j⟩ and b_i = ⟨p_i, p_target⟩,
whose inner products have a closed form (`profile_dot`). Only snapshots taken at or before the target
step enter, so no later weights leak into it.
"""

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from ditlab.io import atomic_write

# σ_rel(γ) rises from 0 at γ = −1 to its maximum at γ* = (√5 − 3)/2 (where d σ_rel/dγ = 0, i.e.
# γ² + 3γ + 1 = 0) and falls back to 0 as γ → ∞: σ_rel up to that maximum has one profile on the falling
# branch γ ≥ γ*, the one whose weight grows with τ (and whose square is integrable: 2γ* + 1 > 0).
GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0
SIGMA_REL_MAX = math.sqrt((GAMMA_AT_MAX + 1) / ((GAMMA_AT_MAX + 2) ** 2 * (GAMMA_AT_MAX + 3)))  # 0.30028…

SNAPSHOT_FOLDER = "posthoc_ema"  # in the run folder
# The relative L2 error of a reconstructed profile above which the command says the fit is poor: with ~30
# snapshots of EDM2's two profiles, a σ_rel in 0.03–0.2 at a snapshot's step fits within ~1.5%.
POOR_FIT = 0.05


# ---- the profiles --------------------------------------------------------------------------------------


def sigma_rel_to_gamma(sigma_rel: float, key: str = "sigma_rel") -> float:
    """The exponent γ of the power-function profile of relative standard deviation `sigma_rel`, in closed
    form: σ² (γ + 2)² (γ + 3) = γ + 1 is the cubic γ³ + 7γ² + (16 − s)γ + (12 − s) = 0 with s = σ⁻²; with
    γ = x − 7/3 it is x³ + px + q = 0, p = −(s + 1/3), q = 4s/3 + 2/27, whose three roots are real for
    0 < σ ≤ SIGMA_REL_MAX, and the largest (trigonometric form) is the profile's. ValueError naming `key`
    outside that range."""
    if (
        isinstance(sigma_rel, bool)
        or not isinstance(sigma_rel, int | float)
        or not 0 < sigma_rel <= SIGMA_REL_MAX
    ):
        raise ValueError(
            f"{key}={sigma_rel} is out of range: it must be a number in (0, {SIGMA_REL_MAX:.4f}], the relative "
            "standard deviation of a power-function EMA profile (EDM2 tracks 0.05 and 0.10)"
        )
    s = sigma_rel**-2.0
    p, q = -(s + 1.0 / 3.0), 4.0 * s / 3.0 + 2.0 / 27.0
    # Clamped: at σ_rel = SIGMA_REL_MAX the argument is −1 up to rounding (a double root).
    cosine = max(-1.0, min(1.0, 1.5 * q / p * math.sqrt(-3.0 / p)))
    return 2.0 * math.sqrt(-p / 3.0) * math.cos(math.acos(cosine) / 3.0) - 7.0 / 3.0


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the profile p_γ: sqrt((γ + 1) / ((γ + 2)² (γ + 3)))."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_profile(tau: np.ndarray, gamma: float, t: float) -> np.ndarray:
    """p_{γ,t}(τ) = (γ + 1) τ^γ / t^(γ + 1) on 0 < τ ≤ t, 0 after t: the weight the EMA of step t gives
    the weights of training time τ. Written as (γ + 1)/t · (τ/t)^γ so that large γ and t do not overflow."""
    tau = np.asarray(tau, dtype=np.float64)
    inside = (tau > 0) & (tau <= t)
    ratio = np.where(inside, tau / t, 1.0)  # outside: any finite value (0^γ is infinite for γ < 0)
    return np.where(inside, (gamma + 1) / t * ratio**gamma, 0.0)


def ema_beta(step: int, gamma: float) -> float:
    """β_t = (1 − 1/t)^(γ + 1): the decay of the power-function EMA at training step t ≥ 1 (0 at t = 1)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_dot(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """⟨p_{γa,ta}, p_{γb,tb}⟩ = ∫ p_a p_b dτ over (0, m], m = min(ta, tb), in closed form:
    (γa + 1)(γb + 1) m^(γa+γb+1) / ((γa + γb + 1) ta^(γa+1) tb^(γb+1)), computed as
    (γa + 1)(γb + 1) / (γa + γb + 1) · (m/ta)^(γa+1) (m/tb)^(γb+1) / m: ratios ≤ 1, no overflow."""
    m = min(t_a, t_b)
    return (
        (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
        * (m / t_a) ** (gamma_a + 1) * (m / t_b) ** (gamma_b + 1) / m
    )  # fmt: skip


def solve_weights(
    profiles: Sequence[tuple[float, float]], target: tuple[float, float]
) -> tuple[np.ndarray, float]:
    """The least-squares weights x of the profiles (t_i, γ_i) whose sum Σ x_i p_i best approximates the
    target profile (t, γ) in L2 (the normal equations, in float64), and the relative L2 error of that
    approximation, ‖p_target − Σ x_i p_i‖ / ‖p_target‖."""
    A = np.array([[profile_dot(*a, *b) for b in profiles] for a in profiles], dtype=np.float64)
    b = np.array([profile_dot(*a, *target) for a in profiles], dtype=np.float64)
    # lstsq rather than solve: a repeated profile (the same step and γ twice) makes A singular, not wrong.
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    norm2 = profile_dot(*target, *target)
    residual2 = norm2 - 2 * x @ b + x @ A @ x
    return x, math.sqrt(max(residual2, 0.0) / norm2)


class PowerFunctionEMA:
    """The power-function EMAs, one per γ, of a list of tensors (a model's parameters), kept at least in
    float32 (a bf16 weight's small updates would round away) and on the tensors' devices."""

    def __init__(self, tensors: Sequence[Tensor], gammas: Sequence[float]) -> None:
        self.gammas = [float(g) for g in gammas]
        self.step = 0  # the training step the averages are at
        self.averages = [
            [t.detach().to(torch.promote_types(t.dtype, torch.float32), copy=True) for t in tensors]
            for _ in self.gammas
        ]

    @torch.no_grad()
    def update(self, tensors: Sequence[Tensor]) -> None:
        """Advances every average by one step with `tensors`, the weights after training step `step + 1`."""
        self.step += 1
        for gamma, averages in zip(self.gammas, self.averages, strict=True):
            sources = [t.detach().to(a.dtype) for t, a in zip(tensors, averages, strict=True)]
            torch._foreach_lerp_(averages, sources, 1.0 - ema_beta(self.step, gamma))


# ---- snapshot files ------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """One saved EMA: a safetensors file of a model's state dict whose parameters are the average of the
    profile `gamma` (σ_rel `sigma_rel`) at training step `step`; the entries named in `copied` (buffers)
    are the model's own. `header` is the run's ditlab header, so a snapshot loads like an export."""

    path: Path
    step: int
    sigma_rel: float
    gamma: float
    copied: list[str]
    header: dict[str, Any]

    def record(self) -> dict[str, Any]:
        """What a reconstruction's header says about the snapshot."""
        return {"file": self.path.name, "step": self.step, "sigma_rel": self.sigma_rel, "gamma": self.gamma}


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"step_{step:07d}-sigma_rel_{sigma_rel:g}.safetensors"


def write_snapshot(
    folder: Path,
    step: int,
    sigma_rel: float,
    gamma: float,
    state_dict: dict[str, Tensor],
    copied: Sequence[str],
    header: dict[str, Any],
) -> Path:
    """`<folder>/step_<step>-sigma_rel_<σ>.safetensors`, written atomically (`ditlab.io.atomic_write`):
    `state_dict` (CPU tensors) with the step, σ_rel, γ (its repr: read back exactly), the copied entries
    and the ditlab header as metadata. The format `read_checkpoint` reads as a ditlab safetensors export."""
    metadata = {
        "format": "pt",
        "ditlab": json.dumps(header),
        "step": str(step),
        "sigma_rel": repr(float(sigma_rel)),
        "gamma": repr(float(gamma)),
        "copied": json.dumps(list(copied)),
    }
    data = save({k: v.contiguous() for k, v in state_dict.items()}, metadata=metadata)
    return atomic_write(folder / snapshot_name(step, sigma_rel), lambda f: f.write(data), fsync=True)


def read_snapshot(path: Path) -> Snapshot:
    """A snapshot's metadata (its tensors stay on disk); ValueError for a file that is not one."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own SafetensorError for a corrupt file
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    missing = [k for k in ("ditlab", "step", "sigma_rel", "gamma", "copied") if k not in metadata]
    if missing:
        raise ValueError(f"{path} is not a post-hoc EMA snapshot: its metadata has no {', '.join(missing)}")
    return Snapshot(
        path=path,
        step=int(metadata["step"]),
        sigma_rel=float(metadata["sigma_rel"]),
        gamma=float(metadata["gamma"]),
        copied=json.loads(metadata["copied"]),
        header=json.loads(metadata["ditlab"]),
    )


def find_snapshots(run: str | Path) -> list[Snapshot]:
    """The snapshots of the run folder `run` (`<run>/posthoc_ema/*.safetensors`), by step then σ_rel."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run={run} is not a folder (the training run's output folder)")
    files = sorted((run / SNAPSHOT_FOLDER).glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"run={run} has no post-hoc EMA snapshots ({run / SNAPSHOT_FOLDER}/*.safetensors): train it with "
            "callbacks.posthoc_ema.enabled=true"
        )
    snapshots = sorted((read_snapshot(f) for f in files), key=lambda s: (s.step, s.sigma_rel))
    configs = {json.dumps(s.header.get("model_config"), sort_keys=True) for s in snapshots}
    if len(configs) > 1:
        raise ValueError(f"{run / SNAPSHOT_FOLDER} holds snapshots of {len(configs)} different models")
    return snapshots


@torch.no_grad()
def reconstruct(snapshots: Sequence[Snapshot], weights: Sequence[float]) -> dict[str, Tensor]:
    """Σ x_i θ̂_i over the snapshots' averaged entries, summed in float64 (the weights alternate in sign, so
    float32 sums would cancel digits) and returned in the snapshots' dtype; the copied entries (buffers)
    are the newest snapshot's. Reads one tensor of every file at a time, not whole files."""
    newest = max(range(len(snapshots)), key=lambda i: snapshots[i].step)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(s.path, framework="pt")) for s in snapshots]
        state_dict = {}
        for key in files[newest].keys():  # noqa: SIM118 (a safetensors file is no mapping)
            first = files[newest].get_tensor(key)
            if key in snapshots[newest].copied:
                state_dict[key] = first
                continue
            total = torch.zeros_like(first, dtype=torch.float64)
            for f, x in zip(files, weights, strict=True):
                total.add_(f.get_tensor(key).double(), alpha=float(x))
            state_dict[key] = total.to(first.dtype)
    return state_dict


# ---- the reconstruction of src/posthoc_ema.py ----------------------------------------------------------------


def _sigma_rels(value: Any) -> list[float]:
    values = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    values = values if isinstance(values, list) else [values]
    if not values:
        raise ValueError("sigma_rel=[] is empty: give one value or a list, e.g. sigma_rel=[0.05,0.1]")
    for v in values:
        sigma_rel_to_gamma(v)  # in range, else one line naming sigma_rel
    return [float(v) for v in values]


def output_name(sigma_rel: float, step: int) -> str:
    return f"posthoc_ema-sigma_rel_{sigma_rel:g}-step_{step:07d}.ckpt"


def write_checkpoint(path: Path, state_dict: dict[str, Tensor], header: dict[str, Any], step: int) -> Path:
    """A checkpoint that `ditlab.interop.checkpoints.load_dit` (so sample.py, fid_nfe.py, export.py and
    init_from=) reads as a ditlab training checkpoint: `state_dict` as its EMA weights (`ema.*`), the
    ditlab `header`, `global_step`. Not a training state: no raw weights, no optimizer, so no resuming."""
    checkpoint = {
        "state_dict": {f"ema.{k}": v for k, v in state_dict.items()},
        "ditlab": header,
        "global_step": step,
    }
    return atomic_write(path, lambda f: torch.save(checkpoint, f), fsync=True)


def run_posthoc_ema(cfg: DictConfig) -> dict[str, Any]:
    """The reconstruction of `src/posthoc_ema.py` (options: conf/posthoc_ema.yaml): for each σ_rel of `cfg.sigma_rel`,
    the EMA of that profile at `cfg.step` (null: the last snapshot's) reconstructed from the snapshots of
    the run `cfg.run`, written as a checkpoint into `cfg.out` (null: `<run>/checkpoints`). Returns {σ_rel: the
    checkpoint's path}. (`fid=true`'s scoring is the report layer's: `ditlab.report.posthoc_ema_fid`.)"""
    sigma_rels = _sigma_rels(cfg.sigma_rel)
    snapshots = find_snapshots(cfg.run)
    last = snapshots[-1].step
    step = last if cfg.step is None else cfg.step
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= last:
        raise ValueError(
            f"step={step} is out of range: it must be a step from 1 to {last}, the last snapshot's"
        )
    used = [s for s in snapshots if s.step <= step]
    if not used:
        raise ValueError(f"step={step} is before the first snapshot (step {snapshots[0].step}) of {cfg.run}")
    out = Path(cfg.out) if cfg.out is not None else Path(cfg.run) / "checkpoints"
    written = {}
    for sigma_rel in sigma_rels:
        gamma = sigma_rel_to_gamma(sigma_rel)
        weights, error = solve_weights([(s.step, s.gamma) for s in used], (step, gamma))
        record = {
            "sigma_rel": sigma_rel,
            "gamma": gamma,
            "step": step,
            "profile_error": error,  # the relative L2 error of the target profile's approximation
            "snapshots": [s.record() | {"weight": float(x)} for s, x in zip(used, weights, strict=True)],
        }
        header = used[-1].header | {"posthoc_ema": record}
        path = write_checkpoint(out / output_name(sigma_rel, step), reconstruct(used, weights), header, step)
        written[sigma_rel] = path
        # The profile's weight after the newest snapshot used is out of reach: far from a snapshot's step
        # (or with few snapshots) the fit is poor, which the error says.
        poor = f"; a poor fit: pick a snapshot's step (the last is {last})" if error > POOR_FIT else ""
        print(
            f"[ditlab] σ_rel {sigma_rel:g} (γ {gamma:.3f}) at step {step}: {path} (from {len(used)} snapshots; "
            f"the profile's relative L2 error {error:.2%}{poor})"
        )
    return written
