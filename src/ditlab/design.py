"""The design space's coordinates that every layer shares (training records them, checkpoints carry them,
the report reads them), kept below all of those layers.

`DesignPoint` is the one typed description of a run's point: a field per axis, at the paper's value by
default. A composed run config gives it (`DesignPoint.from_config`), and from it, and only from it, come
the model's and the objective's constructor arguments, the W&B config and tags, the run name (and so the
run folder), `results.json`'s coordinates, the checkpoint header and the report's axes and labels.
"""

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from ditlab.registry import Registry

if TYPE_CHECKING:
    from ditlab.training.masking import Masking


@dataclass(frozen=True)
class Axis:
    """One axis of the design space beyond the paper's (block, size, patch): its value at the paper's point
    (`default`), and how a composed run config gives a run's value (`read`). `in_name`: shown in run
    names when off its default (the FID's sampler scores a run; it does not define the trained model).
    `label`: a number's prefix in those names, when not the axis's own name."""

    default: Any
    read: Callable[[DictConfig], Any]
    in_name: bool = True
    label: str = ""  # a number's prefix in run names (`+mask0.5`); "": the axis's own name


def group_axis(group: str, default: str) -> Axis:
    """An axis that is a config group whose options name themselves (`<group>.name`), like `norm` or a
    user's own: absent from a config (a `+group=` option not chosen), it is at its default."""
    return Axis(default, lambda cfg: (cfg.get(group) or {}).get("name", default))


def _objective_option(options: dict[str, Any], key: str) -> Any:
    """The objective's value of `key`: its config's, else its builder's default; None if it has none."""
    from ditlab.diffusion import PAPER_DIFFUSION, objective_builder  # torch: not on `import ditlab`

    parameters = inspect.signature(objective_builder(options.get("_target_", PAPER_DIFFUSION))).parameters
    default = parameters[key].default if key in parameters else None
    return options.get(key, None if default is inspect.Parameter.empty else default)


def _objective(cfg: DictConfig) -> str:
    from ditlab.diffusion import objective_name

    return objective_name(cfg.diffusion)


def _diffusion_option(key: str, fallback: Any = None) -> Callable[[DictConfig], Any]:
    return lambda cfg: _objective_option(_container(cfg.diffusion), key) or fallback


OBJECTIVE_AXES = ("predict", "time_sampling", "time_shift")  # the objective's options with an axis each


def _objective_args(cfg: DictConfig) -> str:
    """The objective's options that no other axis shows (the objective's name shows its kind and path;
    `predict`, `time_sampling` and `time_shift` are axes of their own) where they differ from its
    builder's defaults: e.g. "noise_schedule=cosine,learn_sigma=false"; "" at the builder's defaults."""
    from ditlab.diffusion import PAPER_DIFFUSION, objective_builder

    options = _container(cfg.diffusion)
    parameters = inspect.signature(objective_builder(options.get("_target_", PAPER_DIFFUSION))).parameters
    shown = {"_target_", "path", "path_module", "timestep_respacing", *OBJECTIVE_AXES}
    changed = [
        f"{key}={str(value).lower() if isinstance(value, bool) else value}"
        for key, value in options.items()
        if key not in shown and key in parameters and value != parameters[key].default
    ]
    return ",".join(changed)


LOSS_TERM_AXES = ("cosine_velocity", "dispersive")  # ditlab's extra loss terms: an axis each (their weights)


def _loss_term_weight(name: str) -> Callable[[DictConfig], float]:
    return lambda cfg: float((cfg.get("loss_terms") or {}).get(name, 0.0))


def _loss_term_args(cfg: DictConfig) -> str:
    """The extra loss terms' settings that their weights' axes do not show: a user's term's weight and each
    active term's options off their defaults, e.g. "dispersive.temperature=1"; "" when there are none."""
    from ditlab.diffusion.loss_terms import LOSS_TERMS  # torch: not on `import ditlab`

    weights, options = _container(cfg.get("loss_terms")), _container(cfg.get("loss_term_options"))
    parts = []
    for name, weight in weights.items():
        if not weight:
            continue
        if name not in LOSS_TERM_AXES:
            parts.append(f"{name}={weight:g}")
        term_options = dict(options.get(name) or {})
        if term_options.get("module"):
            importlib.import_module(term_options.pop("module"))
        parameters = inspect.signature(LOSS_TERMS[name]).parameters
        parts += [
            f"{name}.{key}={str(value).lower() if isinstance(value, bool) else value}"
            for key, value in term_options.items()
            if key in parameters and value != parameters[key].default
        ]
    return ",".join(parts)


def _sample_time_shift(cfg: DictConfig) -> float:
    """The time shift of the FID's sampler (else the run's): its `time_shift` option, 1 without one."""
    fid = (cfg.callbacks or {}).get("fid") or {}
    options = fid.get("sampler_options") if fid else cfg.sampler.get("options")
    return float((options or {}).get("time_shift", 1.0))


# masking.decoder_depth=null: MaskDiT's decoder of 2 blocks with masking (mask_ratio > 0), none without.
MASKED_DECODER_DEPTH = 2


def _masked(mask_ratio: Any) -> bool:
    return isinstance(mask_ratio, int | float) and not isinstance(mask_ratio, bool) and mask_ratio > 0


def natural_decoder_depth(mask_ratio: Any) -> int:
    return MASKED_DECODER_DEPTH if _masked(mask_ratio) else 0


def _masking(cfg: DictConfig) -> Any:
    """The run's `masking` node (values as the config holds them: check_values checks them); none: off."""
    return cfg.get("masking") or {}


def _masked_option(key: str, default: Any) -> Callable[[DictConfig], Any]:
    """A setting of masked training alone (λ, the fine-tune steps). It does nothing without masking, so
    there it is at its default: `-m masking.mask_ratio=0,0.5 masking.finetune_steps=300` names its unmasked
    run as the paper's."""
    return lambda cfg: (
        _masking(cfg).get(key, default) if _masked(_masking(cfg).get("mask_ratio")) else default
    )


def _decoder_depth(cfg: DictConfig) -> Any:
    depth = _masking(cfg).get("decoder_depth")
    return natural_decoder_depth(_masking(cfg).get("mask_ratio")) if depth is None else depth


def _container(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def _axis(
    default: Any,
    read: Callable[[DictConfig], Any],
    *,
    in_name: bool = True,
    argument: str = "",
    label: str = "",
) -> Any:
    """A field of `DesignPoint` that is an axis; `argument`: the model constructor's name for it."""
    return field(
        default=default, metadata={"axis": Axis(default, read, in_name, label), "argument": argument}
    )


PAPER_AXES = ("block", "model", "patch")  # always in a run's name; the report's rows


@dataclass(frozen=True)
class DesignPoint:
    """One point of the design space: the paper's axes (the conditioning block, the size `model`, the
    patch), the later ones (the objective with its prediction, time sampling and shift and other options,
    the position embedding, norm, QK-norm, MLP, U-ViT's long skips, REPA's λ, the extra loss terms'
    weights, MaskDiT's masked training, the FID's sampler and its time shift), each at the paper's value by
    default, and a user's own axes (`register_axis`) in `user_axes`. `objective_options` is the objective's whole config
    (`_target_` and arguments: conf/diffusion). A new axis of ditlab is one field here and its config
    group; a user's is one `register_axis` and its group."""

    block: str = _axis("adaln_zero", lambda cfg: cfg.block.name, argument="block")
    model: str = _axis("DiT-XL", lambda cfg: cfg.model.name, argument="name")
    patch: int = _axis(2, lambda cfg: cfg.patch, argument="patch_size")
    objective: str = _axis("ddpm", _objective)
    predict: str = _axis("epsilon", _diffusion_option("predict"))
    time_sampling: str = _axis(
        "uniform", _diffusion_option("time_sampling", "uniform")
    )  # the paper's: uniform t
    time_shift: float = _axis(1.0, lambda cfg: float(_diffusion_option("time_shift", 1.0)(cfg)))  # SD3's s
    objective_args: str = _axis("", _objective_args)  # its other options off their defaults
    pos_embed: str = _axis("sincos", group_axis("pos_embed", "sincos").read, argument="pos_embed")
    norm: str = _axis("layernorm", group_axis("norm", "layernorm").read, argument="norm")
    qk_norm: bool = _axis(False, lambda cfg: bool(cfg.qk_norm), argument="qk_norm")
    mlp: str = _axis("gelu", group_axis("mlp", "gelu").read, argument="mlp")
    long_skip: bool = _axis(False, lambda cfg: bool(cfg.long_skip), argument="long_skip")  # U-ViT's skips
    repa: float = _axis(0.0, lambda cfg: float(cfg.repa.weight) if cfg.repa else 0.0)  # REPA's λ, 0: none
    cosine_velocity: float = _axis(0.0, _loss_term_weight("cosine_velocity"))  # its weight, 0: none
    dispersive: float = _axis(0.0, _loss_term_weight("dispersive"))  # its weight, 0: none
    loss_term_args: str = _axis("", _loss_term_args)  # the terms' options off their defaults, a user's terms
    # MaskDiT's masked training (`ditlab.training.masking`): the fraction of tokens dropped (0: off), the
    # decoder's blocks (null in the config: 2 with masking, else 0), λ and the unmasked last steps.
    mask_ratio: float = _axis(0.0, lambda cfg: _masking(cfg).get("mask_ratio", 0.0), label="mask")
    decoder_depth: int = _axis(0, _decoder_depth, argument="decoder_depth")
    recon_weight: float = _axis(0.1, _masked_option("recon_weight", 0.1))
    finetune_steps: int = _axis(0, _masked_option("finetune_steps", 0))
    sampler: str = _axis(  # the FID's sampler, else the run's
        "ddim",
        lambda cfg: ((cfg.callbacks or {}).get("fid") or {}).get("sampler") or cfg.sampler.name,
        in_name=False,
    )
    # The FID's sampler's time shift (sampler.options.time_shift): like the sampler, it scores a run.
    sample_time_shift: float = _axis(1.0, _sample_time_shift, in_name=False)
    objective_options: dict[str, Any] = field(default_factory=dict, compare=False)
    user_axes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "DesignPoint":
        """The point a composed run config (conf/train.yaml and its groups) describes."""
        built_in = {f.name: f.metadata["axis"].read(cfg) for f in fields(cls) if "axis" in f.metadata}
        user = {name: axis.read(cfg) for name, axis in AXES.items() if name not in built_in}
        point = cls(**built_in, objective_options=_container(cfg.diffusion), user_axes=user)
        if point.sampler == "auto":  # the objective's own sampler: the coordinate names the one that runs
            point = replace(point, sampler=point.build_objective().default_sampler)
        return point

    def coordinates(self) -> dict[str, Any]:
        """The point as logged to W&B config and tags and kept in results.json and the checkpoint header:
        the paper's axes, then every later axis (`AXES`' order), a user's last."""
        return {f.name: getattr(self, f.name) for f in fields(self) if "axis" in f.metadata} | self.user_axes

    @property
    def name(self) -> str:
        """The run's name (`point_name`): its folder, its W&B run and its record's `run_name`."""
        return point_name(self.coordinates())

    def tags(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.coordinates().items()]

    def model_arguments(self) -> dict[str, Any]:
        """The DiT constructor's arguments that this point fixes (`ditlab.models.build_dit`): its size, block,
        patch and layer axes, and what the objective needs of the model: its output channels (`learn_sigma`)
        and a second time input (`second_time`: an objective class that sets it, MeanFlow's)."""
        from ditlab.diffusion import PAPER_DIFFUSION, objective_builder

        arguments = {argument: getattr(self, axis) for axis, argument in self.model_axes().items()}
        builder = objective_builder(self.objective_options.get("_target_", PAPER_DIFFUSION))
        return arguments | {
            "learn_sigma": bool(_objective_option(self.objective_options, "learn_sigma")),
            "second_time": bool(getattr(builder, "second_time", False)),
        }

    @classmethod
    def model_axes(cls) -> dict[str, str]:
        """Each axis that the model's constructor takes, by its field name: its argument's name."""
        return {f.name: f.metadata["argument"] for f in fields(cls) if f.metadata.get("argument")}

    def masking(self) -> "Masking":
        """The masked training that this point trains with."""
        from ditlab.training.masking import Masking  # torch: not on `import ditlab`

        return Masking(self.mask_ratio, self.recon_weight, self.finetune_steps)

    def build_objective(self) -> Any:
        """The objective (a `GaussianDiffusion`, `Interpolant` or `MeanFlow`, or a user's) that this point
        trains."""
        from ditlab.diffusion import build_objective

        return build_objective(self.objective_options)


# The axes beyond (block, size, patch), in the order names and tables show them: `DesignPoint`'s fields,
# then a user's. A user's axis is one `register_axis("name", Axis(...))` (from any module a config group
# names with `module:`) and its config group: runs then carry it in their coordinates, name, W&B tags,
# results.json and the report.
AXES: Registry[Axis] = Registry(
    "axis",
    {
        f.name: f.metadata["axis"]
        for f in fields(DesignPoint)
        if "axis" in f.metadata and f.name not in PAPER_AXES
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


def point_name(coords: dict[str, Any]) -> str:
    """The name of a run's point: the paper's axes, then each later axis whose value is not the paper's,
    e.g. `adaln_zero-DiT-S-p4+sit_linear+rope`, so that no two points of a sweep share a name. A name-like
    value stands for itself, a flag for its key (`+qk_norm`), a number follows its key or label (`+repa0.5`,
    `+mask0.5`)."""
    objective = coords.get("objective", AXES["objective"].default)
    # Each objective's own prediction is no part of the name: ε for DDPM, the velocity for SiT's
    # interpolants; a user's objective shows what it predicts only when it has the option.
    natural = "epsilon" if objective == "ddpm" else "velocity" if objective.startswith("sit_") else None
    # The decoder's depth is no part of a masked run's name at MaskDiT's default (masking.decoder_depth=null).
    decoder_depth = natural_decoder_depth(coords.get("mask_ratio", 0.0))
    defaults = default_axes() | {"predict": natural, "decoder_depth": decoder_depth}
    parts = [f"{coords['block']}-{coords['model']}-p{coords['patch']}"]
    for key, default in defaults.items():
        value = coords.get(key, default)
        if not AXES[key].in_name or value == default or value is None:
            continue
        if isinstance(value, bool):
            parts.append(key)
        elif isinstance(value, int | float):
            parts.append(f"{AXES[key].label or key}{value:g}")
        else:
            parts.append(f"predict_{value}" if key == "predict" else str(value))
    return "+".join(parts)


def _run_name(*, _root_: DictConfig) -> str:
    import_registering_modules(_root_)  # a user's axis registers itself before the name is made
    return DesignPoint.from_config(_root_).name


# `run_name: ${point_name:}` (conf/train.yaml): the run folder, the sweep job folder and the W&B run name.
OmegaConf.register_new_resolver("point_name", _run_name, replace=True, use_cache=False)
