"""Builds and runs one training job from a composed Hydra config (the body of `src/train.py`)."""

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_object, instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ditlab.cli import resolve_device, wandb_logged_in
from ditlab.design import DesignPoint, import_registering_modules
from ditlab.diffusion.loss_terms import build_loss_terms
from ditlab.diffusion.sampling import SamplingSpec, check_fits, get_sampler, guide_options
from ditlab.registry import unknown_options
from ditlab.training.callbacks import Checkpointing, RunRecord, SampleGrid
from ditlab.training.checkpoint_io import AtomicCheckpointIO
from ditlab.training.module import DiTModule
from ditlab.training.quiet import silence_library_messages


class ConfigError(ValueError):
    """A configuration that cannot run, with what to change."""


def check_values(cfg: DictConfig) -> None:
    """The values a run reads, in range; else one line naming the key, the value and the valid range."""

    def need(ok: bool, key: str, value: Any, valid: str) -> None:
        if not ok:
            raise ConfigError(f"{key}={value} is out of range: it must be {valid}")

    optim = cfg.optim
    need(optim.lr > 0, "optim.lr", optim.lr, "> 0 (the paper's: 1e-4)")
    need(optim.global_batch_size >= 1, "optim.global_batch_size", optim.global_batch_size, "≥ 1")
    need(optim.max_steps >= 1, "optim.max_steps", optim.max_steps, "≥ 1")
    need(0 <= optim.ema_decay < 1, "optim.ema_decay", optim.ema_decay, "in [0, 1) (the paper's: 0.9999)")
    need(optim.warmup_steps >= 0, "optim.warmup_steps", optim.warmup_steps, "≥ 0")
    need(optim.weight_decay >= 0, "optim.weight_decay", optim.weight_decay, "≥ 0")
    need(all(0 <= b < 1 for b in optim.betas), "optim.betas", list(optim.betas), "two values in [0, 1)")
    need(
        optim.grad_clip is None or optim.grad_clip > 0,
        "optim.grad_clip",
        optim.grad_clip,
        "> 0, or null (off)",
    )
    need(
        isinstance(cfg.patch, int) and cfg.patch >= 1,
        "patch",
        cfg.patch,
        "a whole number ≥ 1 (2, 4 or 8 in the paper)",
    )
    need(
        0 <= cfg.net.class_dropout_prob < 1, "net.class_dropout_prob", cfg.net.class_dropout_prob, "in [0, 1)"
    )
    # Lightning would run no step and report the run finished.
    max_steps = cfg.trainer.max_steps
    need(isinstance(max_steps, int) and max_steps >= 1, "trainer.max_steps", max_steps, "a whole number ≥ 1")
    need(isinstance(cfg.qk_norm, bool), "qk_norm", cfg.qk_norm, "true or false")
    need(isinstance(cfg.long_skip, bool), "long_skip", cfg.long_skip, "true or false")
    check_masking(cfg.get("masking") or {}, max_steps, need)
    if cfg.repa:
        need(
            cfg.repa.weight > 0, "repa.weight", cfg.repa.weight, "> 0 (REPA's λ: 0.5); repa=none turns it off"
        )
    for group in ("diffusion", "repa", "data", "autoencoder"):
        check_target_keys(cfg.get(group), group)
    # Autoguidance's guide node, named as the user wrote it (the callbacks read it as callbacks.*.guide);
    # whether the guide fits the model is checked by the callbacks' setup, before the first step.
    SamplingSpec(**guide_options(cfg.get("guide"), "guide"))


def check_masking(masking: Any, max_steps: int, need: Callable[[bool, str, Any, str], None]) -> None:
    """The `masking` node's values (MaskDiT's masked training), through check_values' `need`."""

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    ratio = masking.get("mask_ratio", 0.0)
    need(number(ratio) and 0 <= ratio < 1, "masking.mask_ratio", ratio, "in [0, 1) (MaskDiT's 0.5; 0: off)")
    depth = masking.get("decoder_depth")
    need(
        depth is None or (whole(depth) and depth >= (1 if ratio else 0)),
        "masking.decoder_depth",
        depth,
        f"a whole number ≥ {1 if ratio else 0}, or null (2 blocks with masking, none without)",
    )
    weight = masking.get("recon_weight", 0.1)
    need(number(weight) and weight >= 0, "masking.recon_weight", weight, "≥ 0 (MaskDiT's λ: 0.1)")
    steps = masking.get("finetune_steps", 0)
    need(
        whole(steps) and 0 <= steps <= max_steps,
        "masking.finetune_steps",
        steps,
        f"a whole number in [0, trainer.max_steps={max_steps}] (the last steps, trained unmasked)",
    )


def check_target_keys(node: Any, key: str) -> None:
    """ConfigError when `node` (a `_target_` config) holds a key its target does not take: e.g.
    `+diffusion.time_sampling=...` on the paper's DDPM objective, which only the interpolant has."""
    if not node or "_target_" not in node:
        return
    unknown, valid = unknown_options(get_object(node._target_), (k for k in node if not k.startswith("_")))
    if unknown:
        raise ConfigError(
            f"{key}.{unknown[0]} is not an option of this {key} ({node._target_}); its options: {', '.join(valid)}"
        )


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX-BF16, or AVX512-BF16 as on AMD Zen 4
    and later): there bf16 autocast trains the CPU demo 1.7× faster than fp32 and as well
    (experiments/results/cpu_bf16/); elsewhere bf16 is emulated and no faster."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_devices(cfg: DictConfig) -> None:
    """accelerator/precision "auto": GPU with bf16 autocast when CUDA is there; else the CPU, with bf16
    autocast where it has native bf16 matrix products (`cpu_has_native_bf16`) and fp32 elsewhere."""
    trainer = cfg.trainer
    wants_gpu = trainer.accelerator in ("gpu", "cuda")
    if wants_gpu and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={trainer.accelerator} but no CUDA GPU is visible; run on CPU with "
            "trainer=cpu (or trainer.accelerator=cpu), or check CUDA_VISIBLE_DEVICES and the driver"
        )
    with open_dict(trainer):
        on_gpu = wants_gpu or (trainer.accelerator == "auto" and resolve_device("auto").type == "cuda")
        if trainer.accelerator == "auto":
            trainer.accelerator = "gpu" if on_gpu else "cpu"
        if trainer.precision == "auto":
            trainer.precision = "bf16-mixed" if on_gpu or cpu_has_native_bf16() else "32-true"
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # the reference's setting for fp32 work
        torch.backends.cudnn.allow_tf32 = True


def world_size(cfg: DictConfig) -> int:
    devices = cfg.trainer.devices
    if devices in (-1, "auto"):
        devices = torch.cuda.device_count() if cfg.trainer.accelerator == "gpu" else 1
    elif isinstance(devices, str | list):
        devices = len(devices) if isinstance(devices, list) else len(devices.split(","))
    return int(devices) * int(cfg.trainer.num_nodes)


def isolate_ddp_children_from_sweep() -> None:
    """Under a Hydra multirun, Lightning's DDP launcher re-executes sys.argv (which holds the whole
    sweep) in each child process. Make the children run only this job, in this job's folder."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def build_loggers(cfg: DictConfig, point: DesignPoint, group: str | None) -> list[Any]:
    loggers = []
    for logger_cfg in (cfg.logger or {}).values():
        if "WandbLogger" in logger_cfg._target_:
            if os.environ.get("WANDB_MODE") == "disabled":
                continue
            offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_logged_in()
            logger = instantiate(
                logger_cfg, name=cfg.run_name, group=group, tags=point.tags(), offline=offline
            )
            logger.log_hyperparams(
                OmegaConf.to_container(cfg, resolve=True) | {"coordinates": point.coordinates()}
            )
        else:
            logger = instantiate(logger_cfg)
        loggers.append(logger)
    return loggers


def build_module(cfg: DictConfig, point: DesignPoint, datamodule: Any, autoencoder: Any) -> DiTModule:
    """The model and objective of `point`, with the run's other settings (`net`: the DiT's options that are
    no axis, the optimiser, EMA, REPA's encoder, ...)."""
    in_channels, input_size = datamodule.model_input_shape(autoencoder)
    model = instantiate(
        cfg.net,
        **point.model_arguments(),
        input_size=input_size,
        in_channels=in_channels,
        num_classes=datamodule.num_classes,
    )
    diffusion = point.build_objective()
    check_fits(
        get_sampler(cfg.sampler.name, **(cfg.sampler.get("options") or {})), diffusion
    )  # before training
    repa = None
    if cfg.repa:
        if datamodule.is_latent:
            raise ConfigError(
                "repa needs the images for its encoder, and data=latents holds only latents: train REPA on "
                "images (data=image_folder with autoencoder=sd_vae encodes them in the loop) or use repa=none"
            )
        repa = instantiate(cfg.repa, hidden_size=model.config["hidden_size"], model_depth=len(model.blocks))
        repa.check_encodes(datamodule.channels, datamodule.image_size, input_size // point.patch)
    loss_terms = build_loss_terms(  # name → weight, and each term's options (conf/train.yaml)
        OmegaConf.to_container(cfg.get("loss_terms") or OmegaConf.create()),
        OmegaConf.to_container(cfg.get("loss_term_options") or OmegaConf.create()),
    )
    info = {
        "coordinates": point.coordinates(),
        "diffusion": point.objective_options,
        "autoencoder": autoencoder.config,
        "data": {
            "name": type(datamodule).__name__,
            "num_classes": datamodule.num_classes,
            "image_size": datamodule.image_size,
            "channels": datamodule.channels,
            "class_names": list(datamodule.class_names),
        },
    }
    module = DiTModule(
        model,
        diffusion,
        autoencoder,
        encode_batches=not datamodule.is_latent,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler),
        ema_decay=cfg.optim.ema_decay,
        repa=repa,
        loss_terms=loss_terms,
        masking=point.masking(),
        compile=cfg.compile,
        seed=cfg.seed,
        info=info,
    )
    if cfg.init_from:
        from ditlab.interop import init_from_checkpoint

        # A different class count keeps the fresh label table (fine-tuning to another dataset).
        init_from_checkpoint(module.model, cfg.init_from)
        module.ema.load_state_dict(module.model.state_dict())
    return module


def check_callbacks_fit(callbacks: list[Any], module: DiTModule, guide: str | None = None) -> None:
    """Before the first step: each sampling callback's sampler solves the run's objective (else a run would
    fail at its first grid or FID), and the run's autoguidance guide (`guide`: guide.ckpt) fits its model,
    named as the user wrote it (the callbacks' `setup` checks a guide of their own: callbacks.*.guide.ckpt)."""
    for callback in callbacks:
        spec = getattr(callback, "sampling", None)
        if isinstance(spec, SamplingSpec):
            spec.resolve(module.diffusion)
            if spec.guide is not None and spec.guide == guide:
                module.guide_model(guide, "guide.ckpt")  # loaded once: the callbacks find it loaded


def train(cfg: DictConfig) -> dict[str, Any]:
    """Trains one point of the design space; returns where its outputs are."""
    silence_library_messages()
    check_values(cfg)
    import_registering_modules(cfg)
    resolve_devices(cfg)
    n_processes = world_size(cfg)
    if cfg.optim.global_batch_size % n_processes:
        raise ConfigError(
            f"optim.global_batch_size={cfg.optim.global_batch_size} is not divisible by the "
            f"{n_processes} processes (devices × nodes); pick a multiple of {n_processes}"
        )
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.batch_size = cfg.optim.global_batch_size // n_processes
    datamodule.global_batch_size = cfg.optim.global_batch_size
    datamodule.seed = cfg.seed
    autoencoder = instantiate(cfg.autoencoder)
    point = DesignPoint.from_config(cfg)  # its `sampler` coordinate: the one that runs ("auto" resolved)
    if cfg.sampler.name == "auto":  # the objective's own; the grid and FID callbacks read sampler.name
        with open_dict(cfg):
            cfg.sampler.name = point.build_objective().default_sampler
    module = build_module(cfg, point, datamodule, autoencoder)

    hydra_cfg = HydraConfig.get()
    group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    loggers = build_loggers(cfg, point, group)
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    for callback in callbacks:
        if isinstance(callback, RunRecord):  # the config as run: devices, precision and sampler resolved
            callback.config = OmegaConf.to_container(cfg, resolve=True)
    check_callbacks_fit(callbacks, module, (cfg.get("guide") or {}).get("ckpt"))
    # The checkpoint first: its on_train_end writes last.ckpt before the FID, the grids and the run record.
    callbacks.sort(key=lambda c: not isinstance(c, Checkpointing))
    isolate_ddp_children_from_sweep()
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()]
    )
    output_dir = Path(cfg.paths.output_dir)
    result: dict[str, Any] = {"output_dir": str(output_dir)}
    environ_before = dict(os.environ)
    try:
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        except SIGTERMException:
            saved = next((c.saved for c in callbacks if isinstance(c, Checkpointing)), None)
            print(
                f"[ditlab] SIGTERM at step {trainer.global_step}: saved {saved}; resume with ckpt_path={saved}"
            )
            result["preempted_checkpoint"] = str(saved)
        if trainer.is_global_zero:
            result.update(print_outputs(callbacks, loggers, output_dir))
    finally:
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()  # one W&B run per Hydra job, also in a multirun
        # The next job of a multirun must start afresh: Lightning's launcher leaves its process group and
        # its variables (LOCAL_RANK, WORLD_SIZE, MASTER_PORT, ...) behind, and with LOCAL_RANK set the next
        # job would wait for children it never launches.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ_before)
    return result


def print_outputs(callbacks: list[Any], loggers: list[Any], output_dir: Path) -> dict[str, Any]:
    """Prints where the run's outputs are; returns them by name."""
    found: dict[str, Any] = {"results": str(output_dir / "results.json")}
    saved = next((c.saved for c in callbacks if isinstance(c, Checkpointing)), None)
    if saved is not None and saved.exists():
        found["checkpoint"] = str(saved)
    for c in callbacks:
        if isinstance(c, SampleGrid) and c.last_path is not None:
            found["samples"] = str(c.last_path)
        if hasattr(c, "last_result") and c.last_result:
            found["fid"] = c.last_result
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run_dir = Path(logger.experiment.dir).parent if logger.experiment else None
            found["wandb"] = str(run_dir)
            if logger._offline:
                found["wandb_sync"] = f"wandb sync {run_dir}"
        else:
            found[type(logger).__name__] = getattr(logger, "log_dir", None)
    print("[ditlab] finished:")
    for key, value in found.items():
        print(f"  {key:>16}: {value}")
    return found
