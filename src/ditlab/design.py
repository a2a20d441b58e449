"""The design space's coordinates that every layer shares (training records them, checkpoints carry them,
the report reads them), kept below all of those layers."""

import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

# The default values of the coordinates beyond (block, model, patch) (`ditlab.training.run.coordinates`):
# the paper's choices for the successors' axes, and the training FID's sampler (DDIM). A run keeps in
# `axes` only the coordinates that differ, so the paper's runs keep their labels.
DEFAULT_AXES: dict[str, Any] = {
    "objective": "ddpm",
    "predict": "epsilon",
    "time_sampling": "uniform",
    "pos_embed": "sincos",
    "norm": "layernorm",
    "qk_norm": False,
    "mlp": "gelu",
    "repa": 0.0,
    "sampler": "ddim",
}

# Left out of run names: the FID's sampler scores a run, it does not define the trained model.
NOT_IN_NAMES = ("sampler",)


def coordinates(cfg: DictConfig) -> dict[str, Any]:
    """The run's point in the design space, as logged to W&B config and tags and kept in results.json:
    the paper's axes (block, model, patch) and its successors' (objective, what the model predicts, how
    training times are drawn, position embedding, norm, QK-norm, MLP, REPA's weight λ or 0) and the
    sampler of its FID."""
    from ditlab.diffusion import PAPER_DIFFUSION, objective_builder, objective_name  # torch: not on import

    diffusion = cfg.diffusion
    options = inspect.signature(objective_builder(diffusion.get("_target_", PAPER_DIFFUSION))).parameters

    def option(key: str) -> Any:
        """The objective's value of `key`: the config's, else its builder's default; None if it has none."""
        default = options[key].default if key in options else None
        return diffusion.get(key, None if default is inspect.Parameter.empty else default)

    return {
        "block": cfg.block.name,
        "model": cfg.model.name,
        "patch": cfg.patch,
        "objective": objective_name(diffusion),
        "predict": option("predict"),
        "time_sampling": option("time_sampling") or "uniform",  # the paper's diffusion draws t uniformly
        "pos_embed": cfg.pos_embed.name,
        "norm": cfg.norm.name,
        "qk_norm": bool(cfg.qk_norm),
        "mlp": cfg.mlp.name,
        "repa": float(cfg.repa.weight) if cfg.repa else 0.0,
        "sampler": ((cfg.callbacks or {}).get("fid") or {}).get("sampler") or cfg.sampler.name,  # the FID's
    }


def point_name(coords: dict[str, Any]) -> str:
    """The name of a run's point: the paper's axes, then each later axis whose value is not the paper's,
    e.g. `adaln_zero-DiT-S-p4+sit_linear+rope`, so that no two points of a sweep share a name. A name-like
    value stands for itself, a flag for its key (`+qk_norm`), a number follows its key (`+repa0.5`)."""
    objective = coords.get("objective", DEFAULT_AXES["objective"])
    # Each objective's own prediction is no part of the name: ε for DDPM, the velocity for SiT's
    # interpolants; a user's objective shows what it predicts only when it has the option.
    natural = "epsilon" if objective == "ddpm" else "velocity" if objective.startswith("sit_") else None
    defaults = DEFAULT_AXES | {"predict": natural}
    parts = [f"{coords['block']}-{coords['model']}-p{coords['patch']}"]
    for key, default in defaults.items():
        value = coords.get(key, default)
        if key in NOT_IN_NAMES or value == default or value is None:
            continue
        if isinstance(value, bool):
            parts.append(key)
        elif isinstance(value, int | float):
            parts.append(f"{key}{value:g}")
        else:
            parts.append(f"predict_{value}" if key == "predict" else str(value))
    return "+".join(parts)


# `run_name: ${point_name:}` (conf/train.yaml): the run folder, the sweep job folder and the W&B run name.
OmegaConf.register_new_resolver(
    "point_name", lambda *, _root_: point_name(coordinates(_root_)), replace=True, use_cache=False
)
