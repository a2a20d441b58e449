"""The design space's coordinates that every layer shares (training records them, checkpoints carry them,
the report reads them), kept below all of those layers."""

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ditlab.registry import Registry


@dataclass(frozen=True)
class Axis:
    """One axis of the design space beyond the paper's (block, size, patch): its value at the paper's point
    (`default`), and how a composed run config gives a run's value (`read`). `in_name`: shown in run
    names when off its default (the FID's sampler scores a run; it does not define the trained model)."""

    default: Any
    read: Callable[[DictConfig], Any]
    in_name: bool = True


def group_axis(group: str, default: str) -> Axis:
    """An axis that is a config group whose options name themselves (`<group>.name`), like `norm` or a
    user's own: absent from a config (a `+group=` option not chosen), it is at its default."""
    return Axis(default, lambda cfg: (cfg.get(group) or {}).get("name", default))


def _objective_option(cfg: DictConfig, key: str) -> Any:
    """The objective's value of `key`: the config's, else its builder's default; None if it has none."""
    from ditlab.diffusion import PAPER_DIFFUSION, objective_builder  # torch: not on `import ditlab`

    diffusion = cfg.diffusion
    options = inspect.signature(objective_builder(diffusion.get("_target_", PAPER_DIFFUSION))).parameters
    default = options[key].default if key in options else None
    return diffusion.get(key, None if default is inspect.Parameter.empty else default)


def _objective(cfg: DictConfig) -> str:
    from ditlab.diffusion import objective_name

    return objective_name(cfg.diffusion)


# The axes beyond (block, size, patch), in the order names and tables show them. A new axis is one
# `register_axis("name", Axis(...))` (from any module a config group names with `module:`) and its config
# group: runs then carry it in their coordinates, name, W&B tags, results.json and the report.
AXES: Registry[Axis] = Registry(
    "axis",
    {
        "objective": Axis("ddpm", _objective),
        "predict": Axis("epsilon", lambda cfg: _objective_option(cfg, "predict")),
        # the paper's diffusion draws t uniformly
        "time_sampling": Axis("uniform", lambda cfg: _objective_option(cfg, "time_sampling") or "uniform"),
        "pos_embed": group_axis("pos_embed", "sincos"),
        "norm": group_axis("norm", "layernorm"),
        "qk_norm": Axis(False, lambda cfg: bool(cfg.qk_norm)),
        "mlp": group_axis("mlp", "gelu"),
        "repa": Axis(0.0, lambda cfg: float(cfg.repa.weight) if cfg.repa else 0.0),  # REPA's λ, 0: none
        # the FID's sampler, else the run's
        "sampler": Axis(
            "ddim",
            lambda cfg: ((cfg.callbacks or {}).get("fid") or {}).get("sampler") or cfg.sampler.name,
            in_name=False,
        ),
    },
)
register_axis = AXES.register


def default_axes() -> dict[str, Any]:
    """Every registered axis at the paper's value: a run keeps in the report's `axes` only the coordinates
    that differ, so the paper's runs keep their labels."""
    return {name: axis.default for name, axis in AXES.items()}


def import_registering_modules(cfg: Any) -> None:
    """Imports the module each config group of the run names (`module:`: conf/block, conf/model, conf/norm,
    conf/sampler, ... or a user's own group), so that what it defines (a block, a size, a sampler, a whole
    axis) registers itself before it is looked up by name."""
    for group in cfg:
        if group == "hydra" or OmegaConf.is_interpolation(cfg, group):  # run_name's resolver reads this
            continue
        node = cfg.get(group)
        module = node.get("module") if isinstance(node, DictConfig) else None
        if module:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ValueError(
                    f"{group}.module={module} cannot be imported ({err}); put its package on the Python path"
                ) from None


def coordinates(cfg: DictConfig) -> dict[str, Any]:
    """The run's point in the design space, as logged to W&B config and tags and kept in results.json:
    the paper's axes (block, model, patch), then every registered axis (`AXES`): the successors'
    (objective, prediction, time sampling, position embedding, norm, QK-norm, MLP, REPA's λ), the FID's
    sampler, and a user's own."""
    point = {"block": cfg.block.name, "model": cfg.model.name, "patch": cfg.patch}
    return point | {name: axis.read(cfg) for name, axis in AXES.items()}


def point_name(coords: dict[str, Any]) -> str:
    """The name of a run's point: the paper's axes, then each later axis whose value is not the paper's,
    e.g. `adaln_zero-DiT-S-p4+sit_linear+rope`, so that no two points of a sweep share a name. A name-like
    value stands for itself, a flag for its key (`+qk_norm`), a number follows its key (`+repa0.5`)."""
    objective = coords.get("objective", AXES["objective"].default)
    # Each objective's own prediction is no part of the name: ε for DDPM, the velocity for SiT's
    # interpolants; a user's objective shows what it predicts only when it has the option.
    natural = "epsilon" if objective == "ddpm" else "velocity" if objective.startswith("sit_") else None
    defaults = default_axes() | {"predict": natural}
    parts = [f"{coords['block']}-{coords['model']}-p{coords['patch']}"]
    for key, default in defaults.items():
        value = coords.get(key, default)
        if not AXES[key].in_name or value == default or value is None:
            continue
        if isinstance(value, bool):
            parts.append(key)
        elif isinstance(value, int | float):
            parts.append(f"{key}{value:g}")
        else:
            parts.append(f"predict_{value}" if key == "predict" else str(value))
    return "+".join(parts)


def _run_name(*, _root_: DictConfig) -> str:
    import_registering_modules(_root_)  # a user's axis registers itself before the name is made
    return point_name(coordinates(_root_))


# `run_name: ${point_name:}` (conf/train.yaml): the run folder, the sweep job folder and the W&B run name.
OmegaConf.register_new_resolver("point_name", _run_name, replace=True, use_cache=False)
