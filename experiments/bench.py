"""Training and sampling throughput of one DiT design point: ditlab against the published recipe.

    python experiments/bench.py --model DiT-S/4 --batch 8 --modes reference,ours
    python experiments/bench.py --model DiT-XL/2 --batch 64 --modes reference,ours,ours-bf16,ours-bf16-compile
    python experiments/bench.py --summarize experiments/bench_results/*.json

Work timed:
- train: one optimizer step on random latents (no data loading, no VAE): forward, L_hybrid, backward,
  AdamW step, EMA update;
- sample: steps of ancestral DDPM sampling with classifier-free guidance (conditional and null halves
  in one doubled batch) of a `--sample-steps` process; images/s are for the whole process.

Modes:
- `reference`: the published recipe, `experiments/reference_recipe.py` (what it re-creates is listed
  there): fp32 (TF32 matrix products on CUDA, as the reference sets), eager, explicit attention, default
  AdamW, a Python-loop EMA, host-device copies of the schedule tables, `loss.item()` every step;
  adaLN-Zero only, as published.
- `ours`: ditlab as training runs it: a `DiTModule` fitted by a Lightning `Trainer` (precision 32-true,
  TF32 on CUDA as `train.py` sets): its training_step, per-step seeded noise, fused AdamW with the
  device-side non-finite skip, grad-norm logging and foreach-lerp EMA, Lightning's loop included
  (its progress bar off: see -pbar).
  Sampling: the DDPM sampler's steps (`ditlab.diffusion.sampling`) with `cfg_model_fn` on the module's EMA.
- suffixes of `ours`: `-bf16` (precision bf16-mixed; autocast for sampling), `-compile` (torch.compile
  of the model, of the EMA for sampling; the first block's time is reported as warm-up), `-ckpt`
  (activation checkpointing per block; training only), `-pbar` (Lightning's default progress bar,
  refreshed every step as in `train.py`; it reads the logged metrics with `.item()`, a host-device sync
  per step; training only, off otherwise), `-repa` (REPA's alignment loss against `--repa-encoder`, a
  timm architecture with random weights: the cost of a pretrained one, no download; training only,
  images of 1 or 3 channels). E.g. `ours-bf16-compile`.

Method: every mode first runs one untimed block (its wall time is `warmup_s`: compilation, kernel
selection, first allocations); then `--repeats` rounds in which each mode runs `--warmup` untimed and
`--steps` timed steps, the mode order reversed every other round (A B B A ...) so that drift in the
machine's load falls on all modes alike. Times come from CUDA events (CPU: perf_counter) around the
timed steps; a row reports the median and the range over the rounds, and beside them the process's CPU
time per step (time.process_time, all threads: on a shared machine it barely moves with other
processes' load, where the wall time does), with ratios against `reference` and against `ours` (fp32)
by wall time, paired round by round, and by CPU time. Peak memory = the state the work
keeps (training: weights, EMA, gradients, optimizer state; sampling: the sampled weights) + the largest
rise during a timed block above what was allocated at its start (CUDA: allocator counters; CPU: peak RSS
after resetting it through /proc/self/clear_refs, indicative only). MFU is against a dense matrix
product measured in the same run (bf16 on CUDA, fp32 on CPU), with 3× the forward FLOPs for a training
image and 2× per guided sampling step.

Results go to `<out>/<device>-<date>[-<tag>].json`. Imports only torch, Lightning, timm and ditlab's
models, diffusion and training module (no Hydra, OmegaConf, W&B or diffusers).
"""

import argparse
import contextlib
import copy
import datetime
import gc
import itertools
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import Tensor

from ditlab.autoencoders.base import IdentityAutoencoder
from ditlab.cli import resolve_device
from ditlab.diffusion import cfg_model_fn, create_diffusion, get_sampler
from ditlab.io import atomic_write_text
from ditlab.metrics import forward_flops
from ditlab.models import build_dit
from ditlab.provenance import describe_device
from ditlab.training.module import DiTModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_recipe

KINDS = ("train", "sample")
FLAGS = ("bf16", "compile", "ckpt", "pbar", "repa")


@dataclass(frozen=True)
class Mode:
    name: str
    reference: bool = False
    bf16: bool = False
    compile: bool = False
    ckpt: bool = False
    pbar: bool = False
    repa: bool = False


def parse_mode(name: str) -> Mode:
    """'reference', 'ours' or 'ours' with any of the suffixes -bf16, -compile, -ckpt, -pbar."""
    base, *flags = name.split("-")
    if base == "reference" and not flags:
        return Mode(name, reference=True)
    if base != "ours" or any(f not in FLAGS for f in flags) or len(set(flags)) != len(flags):
        raise ValueError(
            f"unknown mode {name!r}: use 'reference' (the published recipe, as published) or 'ours' with "
            f"any of the suffixes {', '.join('-' + f for f in FLAGS)}, e.g. 'ours-bf16-compile'"
        )
    return Mode(name, **{f: True for f in flags})


# ---- clocks and memory -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """A point in time: on the device's stream (CUDA event) or the host's wall clock, and the process's
    CPU clock (user + system time of all its threads)."""

    wall: torch.cuda.Event | float
    cpu: float


@dataclass(frozen=True)
class Seconds:
    """Wall-clock and process-CPU seconds of some work. On a shared CPU the wall time grows with other
    processes' load while the CPU time stays near the work's own cost."""

    wall: float
    cpu: float

    def __truediv__(self, n: int) -> "Seconds":
        return Seconds(self.wall / n, self.cpu / n)


def mark(device: torch.device) -> Mark:
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return Mark(event, time.process_time())
    return Mark(time.perf_counter(), time.process_time())


def seconds_between(start: Mark, end: Mark) -> Seconds:
    if isinstance(start.wall, float):
        return Seconds(end.wall - start.wall, end.cpu - start.cpu)
    end.wall.synchronize()
    return Seconds(start.wall.elapsed_time(end.wall) / 1000, end.cpu - start.cpu)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith(field + ":"))
    return int(kb) * 1024


class MemoryProbe:
    """`rise`: the largest memory in use during the `with` block minus what was in use at its start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rise = 0

    def __enter__(self) -> "MemoryProbe":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size (VmHWM) to the current one
            self.start = _proc_status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _proc_status_bytes("VmHWM")
        self.rise = max(peak - self.start, 0)


def tensor_bytes(tensors: Iterator[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (None entries skipped)."""
    storages = {}
    for t in tensors:
        if t is not None:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def module_tensors(*modules: torch.nn.Module) -> Iterator[Tensor]:
    """Parameters, their gradients and buffers of `modules`."""
    for module in modules:
        for p in module.parameters():
            yield p
            yield p.grad
        yield from module.buffers()


def matmul_tflops(device: torch.device, size: int) -> tuple[float, str]:
    """Peak rate of a dense size×size×size matrix product (the fastest of several): bf16 on CUDA, fp32 on
    the CPU, where the fastest of several also filters out other processes' load."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    fastest = float("inf")
    for _ in range(10 if device.type == "cuda" else 5):
        start = mark(device)
        a @ b
        fastest = min(fastest, seconds_between(start, mark(device)).wall)
    return 2 * size**3 / fastest / 1e12, str(dtype).removeprefix("torch.")


# ---- the work --------------------------------------------------------------------------------------


class Work(Protocol):
    """One kind of work in one mode: `run` times `steps` steps after `warmup` untimed ones and returns
    seconds per step; `state` lists the tensors the work keeps between steps."""

    def run(self, warmup: int, steps: int) -> Seconds: ...

    def state(self) -> Iterator[Tensor]: ...


class Repeated:
    """An iterable of `length` copies of one batch: Lightning's training loader for the benchmark."""

    def __init__(self, batch: tuple[Tensor, Tensor], length: int):
        self.batch, self.length = batch, length

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return itertools.repeat(self.batch, self.length)

    def __len__(self) -> int:
        return self.length


class StepMarks(L.Callback):
    """Marks the start and the end of every training step on the device's clock."""

    def __init__(self, device: torch.device):
        self.device, self.starts, self.ends = device, [], []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.starts.append(mark(self.device))

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.ends.append(mark(self.device))


class StayOnDevice(SingleDeviceStrategy):
    """Lightning's strategy minus the move of module and optimizer state to the CPU when `fit` ends:
    the benchmark fits many short blocks, and those copies are no part of a training step."""

    def teardown(self) -> None:
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


class OursTrain(Work):
    """Steps of `DiTModule` under a Lightning Trainer, one `fit` per block (a fresh optimizer each time,
    whose first step the untimed warm-up absorbs)."""

    def __init__(
        self, module: DiTModule, eager: torch.nn.Module, mode: Mode, batch: tuple, root: str, backend: str
    ):
        self.module, self.eager, self.mode, self.batch, self.root = module, eager, mode, batch, root
        # A compiled wrapper of the same DiT: the module's own `model.compile()` would compile in place
        # and leave no eager path for the other modes of this run.
        self.model = torch.compile(eager, backend=backend) if mode.compile else eager
        if mode.compile:
            check_compiled_loss(module, eager, self.model, batch, mode)

    def run(self, warmup: int, steps: int) -> Seconds:
        device = self.batch[0].device
        self.module.model = self.model
        self.eager.gradient_checkpointing = self.mode.ckpt
        marks = StepMarks(device)
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            strategy=StayOnDevice(device=device),
            precision="bf16-mixed" if self.mode.bf16 else "32-true",
            max_steps=warmup + steps,
            log_every_n_steps=50,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=self.mode.pbar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            default_root_dir=self.root,
            callbacks=[marks],
        )
        with open(os.devnull, "w") as sink:
            bar_output = contextlib.redirect_stderr(sink) if self.mode.pbar else contextlib.nullcontext()
            with bar_output:
                trainer.fit(self.module, train_dataloaders=Repeated(self.batch, warmup + steps))
        self.module.trainer = None  # drop the Trainer and its optimizer before the next block
        return seconds_between(marks.starts[warmup], marks.ends[-1]) / steps

    def state(self) -> Iterator[Tensor]:
        return module_tensors(self.module)


def check_compiled_loss(
    module: DiTModule, eager: torch.nn.Module, compiled: torch.nn.Module, batch: tuple, mode: Mode
) -> None:
    """The compiled DiT against the eager one on the same batch, times and noise, in the mode's precision
    (printed): the training loss and the norm of its gradient (a fresh DiT's zero-initialised final layer
    outputs zeros whatever the trunk computes; the gradient reaches every block). A compiled graph that
    computes something else is an error here, before its steps are timed, rather than a run of skipped
    non-finite steps inside the timed blocks."""
    x, y = batch
    generator = torch.Generator(x.device).manual_seed(0)
    t = module.diffusion.sample_t(x.shape[0], generator, x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    figures = []
    for model in (eager, compiled):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=mode.bf16):
            loss = module.diffusion.training_losses(model, x, t=t, noise=noise, model_kwargs={"y": y})["loss"]
        grads = torch.autograd.grad(loss.mean(), [p for p in eager.parameters() if p.requires_grad])
        figures.append(
            (float(loss.mean()), float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        )
    (loss_e, grad_e), (loss_c, grad_c) = figures
    tolerance = 5e-2 if mode.bf16 else 1e-4  # relative: bf16 keeps 8 bits of mantissa; fp32 differs by order
    print(
        f"[bench] {mode.name}: one batch, eager loss {loss_e:.6g} gradient norm {grad_e:.6g}; "
        f"compiled {loss_c:.6g}, {grad_c:.6g}"
    )
    for what, e, c in (("loss", loss_e, loss_c), ("gradient norm", grad_e, grad_c)):
        if not math.isfinite(c) or abs(c - e) > tolerance * abs(e):
            raise RuntimeError(
                f"{mode.name}: the compiled DiT's {what} {c:.6g} is not the eager one's {e:.6g} (tolerance "
                f"{tolerance:g} relative): torch.compile computes something else on this machine"
            )


class ReferenceTrain(Work):
    """Steps of the published train.py loop (`reference_recipe.train_step`)."""

    def __init__(self, recipe: "ReferenceObjects", batch: tuple[Tensor, Tensor]):
        self.recipe, self.batch = recipe, batch

    def run(self, warmup: int, steps: int) -> Seconds:
        r, (x, y) = self.recipe, self.batch
        r.model.train()
        for _ in range(warmup):
            reference_recipe.train_step(r.model, r.ema, r.optimizer, r.diffusion, x, y)
        start = mark(x.device)
        for _ in range(steps):
            reference_recipe.train_step(r.model, r.ema, r.optimizer, r.diffusion, x, y)
        return seconds_between(start, mark(x.device)) / steps

    def state(self) -> Iterator[Tensor]:
        r = self.recipe
        yield from module_tensors(r.model, r.ema)
        for state in r.optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, Tensor))


def time_loop(loop: Iterator, device: torch.device, warmup: int, steps: int) -> Seconds:
    """Seconds per step of a sampling loop (a generator of steps), after `warmup` steps."""
    try:
        for _ in range(warmup):
            next(loop)
        start = mark(device)
        for _ in range(steps):
            next(loop)
        return seconds_between(start, mark(device)) / steps
    finally:
        loop.close()


class OursSample(Work):
    """Guided DDPM steps as `DiTModule.sample` takes them, on the module's EMA."""

    def __init__(
        self, module: DiTModule, mode: Mode, labels: Tensor, sample_steps: int, cfg_scale: float, backend: str
    ):
        self.module, self.mode, self.labels = module, mode, labels
        net = module.ema
        self.net = torch.compile(net, backend=backend) if mode.compile else net
        self.solver = get_sampler("ddpm")
        self.process = self.solver.process(module.diffusion, sample_steps)
        channels = net.in_channels
        self.model_fn = cfg_model_fn(
            self.net, cfg_scale, null_class=net.num_classes, guidance_channels=min(3, channels)
        )  # three guided channels, as the reference
        self.shape = (len(labels), channels, net.input_size, net.input_size)

    def run(self, warmup: int, steps: int) -> Seconds:
        device = self.labels.device
        self.module.ema.eval()  # no label dropout
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.mode.bf16):
            return time_loop(self.steps(device), device, warmup, steps)

    @torch.no_grad()
    def steps(self, device: torch.device) -> Iterator[Tensor]:
        """The DDPM sampler's steps (`Sampler.step` on its respaced process), one per `next`."""
        x = torch.randn(self.shape, device=device)
        for i in range(self.process.num_timesteps - 1, -1, -1):
            t = torch.full((self.shape[0],), i, device=device, dtype=torch.long)
            noise = torch.randn(self.shape, device=device)
            x = self.solver.step(self.process, self.model_fn, x, t, noise, {"y": self.labels}, False)
            yield x

    def state(self) -> Iterator[Tensor]:
        return module_tensors(self.module.ema)


class ReferenceSample(Work):
    """sample.py's guided loop: the doubled batch through `forward_with_cfg`, on the reference EMA."""

    def __init__(self, recipe: "ReferenceObjects", labels: Tensor, sample_steps: int, cfg_scale: float):
        self.recipe, self.labels, self.cfg_scale = recipe, labels, cfg_scale
        self.diffusion = reference_recipe.ReferenceDiffusion(str(sample_steps))

    def run(self, warmup: int, steps: int) -> Seconds:
        model, labels = self.recipe.ema.eval(), self.labels
        z = torch.randn(len(labels), model.in_channels, *self.recipe.input_hw, device=labels.device)
        y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
        kwargs = {"y": y, "cfg_scale": self.cfg_scale}
        loop = self.diffusion.p_sample_loop_progressive(model.forward_with_cfg, torch.cat([z, z]), kwargs)
        return time_loop(loop, labels.device, warmup, steps)

    def state(self) -> Iterator[Tensor]:
        return module_tensors(self.recipe.ema)


class ReferenceObjects:
    """The reference model (ditlab's initial weights), its EMA, default AdamW and training diffusion."""

    def __init__(self, args: argparse.Namespace, weights: dict[str, Tensor], device: torch.device):
        with torch.device(device):
            self.model = reference_recipe.reference_dit(
                args.model,
                input_size=args.input_size,
                in_channels=args.channels,
                num_classes=args.num_classes,
                depth=args.depth,
            )
        self.model.load_state_dict(weights)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0)
        self.diffusion = reference_recipe.ReferenceDiffusion()
        self.input_hw = (args.input_size, args.input_size)


def build_ours(args: argparse.Namespace, device: torch.device) -> DiTModule:
    with torch.device(device):
        model = build_dit(
            args.model,
            args.block,
            input_size=args.input_size,
            in_channels=args.channels,
            num_classes=args.num_classes,
            depth=args.depth,
        )
        return DiTModule(model, create_diffusion(), IdentityAutoencoder(), seed=args.seed)


def with_repa(module: DiTModule, args: argparse.Namespace) -> DiTModule:
    """A second module on a copy of the DiT (same weights; its own REPA hook), trained with REPA against a
    randomly initialised `--repa-encoder`."""
    from ditlab.training.repa import REPA

    model = copy.deepcopy(module.model)
    repa = REPA(
        model.config["hidden_size"], args.repa_encoder, model_depth=len(model.blocks), pretrained=False
    ).to(model.pos_embed.device)
    return DiTModule(model, module.diffusion, IdentityAutoencoder(), repa=repa, seed=args.seed)


# ---- the run ---------------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(r\)|\(tm\)", "", text.lower())).strip("-")


Key = tuple[str, str]  # (kind, mode name)


def build_works(
    args: argparse.Namespace,
    modes: list[Mode],
    module: DiTModule,
    recipe: "ReferenceObjects | None",
    batch: tuple[Tensor, Tensor],
    root: str,
) -> dict[Key, Work]:
    """The (kind, mode) pairs to time; sampling skips the training-only modes."""
    x, y = batch
    works: dict[Key, Work] = {}
    for kind, mode in itertools.product(args.kinds, modes):
        if kind == "sample" and (mode.ckpt or mode.pbar or mode.repa):
            continue  # checkpointing and REPA act only when gradients are taken; the bar only in training
        if kind == "train":
            trained = with_repa(module, args) if mode.repa else module
            works[kind, mode.name] = (
                ReferenceTrain(recipe, (x, y))
                if mode.reference
                else OursTrain(trained, trained.model, mode, (x, y), root, args.compile_backend)
            )
        else:
            works[kind, mode.name] = (
                ReferenceSample(recipe, y, args.sample_steps, args.cfg_scale)
                if mode.reference
                else OursSample(module, mode, y, args.sample_steps, args.cfg_scale, args.compile_backend)
            )
    return works


def run_block(work: Work, warmup: int, steps: int) -> tuple[Seconds | None, str | None]:
    """(seconds of the timed steps, None), or (None, why) when the device ran out of memory."""
    try:
        return work.run(warmup, steps), None
    except torch.OutOfMemoryError as e:
        gc.collect()
        torch.cuda.empty_cache()
        return None, f"out of memory: {str(e).splitlines()[0]}"


def run_interleaved(
    works: dict[Key, Work], args: argparse.Namespace, device: torch.device
) -> dict[str, dict]:
    """One untimed block per work (its wall time: `warmup_s`), then `args.repeats` rounds, the order
    reversed every other round. Returns {"times", "cpu_times", "rises", "warmup_s", "errors"}, each by
    key (times: wall seconds per step of each round, cpu_times: the process's CPU seconds)."""
    times: dict[Key, list[float]] = {key: [] for key in works}
    cpu_times: dict[Key, list[float]] = {key: [] for key in works}
    rises: dict[Key, int] = dict.fromkeys(works, 0)
    warmup_s: dict[Key, float] = {}
    errors: dict[Key, str] = {}
    for key, work in works.items():  # first block of each: compilation, kernel choice, first allocations
        gc.collect()
        start = time.perf_counter()
        _, error = run_block(work, args.warmup, args.steps)
        if error:
            errors[key] = error
        if device.type == "cuda":
            torch.cuda.synchronize()
        warmup_s[key] = time.perf_counter() - start
        print(f"[bench] {key[0]} {key[1]}: warm-up block {warmup_s[key]:.1f} s", file=sys.stderr)
    for round_ in range(args.repeats):
        for key in list(works) if round_ % 2 == 0 else list(reversed(works)):
            if key in errors:
                continue
            gc.collect()  # earlier blocks' garbage (Trainers and their optimizers) goes first
            with MemoryProbe(device) as probe:
                seconds, error = run_block(works[key], args.warmup, args.steps)
            if error:
                errors[key] = error
            else:
                times[key].append(seconds.wall)
                cpu_times[key].append(seconds.cpu)
                rises[key] = max(rises[key], probe.rise)
    return {"times": times, "cpu_times": cpu_times, "rises": rises, "warmup_s": warmup_s, "errors": errors}


def result_rows(
    args: argparse.Namespace, works: dict[Key, Work], timing: dict[str, dict], flops: float, rate: float
) -> list[dict[str, Any]]:
    """One row per work: step time (median, range, per block), images/s, memory, MFU, and against the
    reference of its kind (overall and paired round by round)."""
    rows = []
    for (kind, mode), seconds in timing["times"].items():
        row: dict[str, Any] = {"kind": kind, "mode": mode, "model": args.model, "block": args.block}
        row["batch"] = args.batch
        if (kind, mode) in timing["errors"]:
            rows.append({**row, "error": timing["errors"][kind, mode]})
            continue
        # a training image takes one step; a sampled image takes all the process's steps
        per_image_steps = 1 if kind == "train" else args.sample_steps
        step_flops = 3 * flops if kind == "train" else 2 * flops * args.sample_steps
        median = statistics.median(seconds)
        cpu_seconds = timing["cpu_times"][kind, mode]
        state = tensor_bytes(works[kind, mode].state())
        img_s = args.batch / (median * per_image_steps)
        rows.append(
            {
                **row,
                "ms_per_step": 1000 * median,
                "ms_per_step_min": 1000 * min(seconds),
                "ms_per_step_max": 1000 * max(seconds),
                "ms_per_step_blocks": [1000 * s for s in seconds],
                # the process's CPU time (all threads): robust to other processes' load on a shared CPU
                "cpu_ms_per_step": 1000 * statistics.median(cpu_seconds),
                "cpu_ms_per_step_min": 1000 * min(cpu_seconds),
                "cpu_ms_per_step_max": 1000 * max(cpu_seconds),
                "img_s": img_s,
                "img_s_min": args.batch / (max(seconds) * per_image_steps),
                "img_s_max": args.batch / (min(seconds) * per_image_steps),
                "peak_mem_gib": (state + timing["rises"][kind, mode]) / 2**30,
                "state_gib": state / 2**30,
                "mfu": img_s * step_flops / (rate * 1e12),
                "warmup_s": timing["warmup_s"][kind, mode],
            }
        )
    for row in rows:
        for base_mode, field in (("reference", "vs_reference"), ("ours", "vs_ours")):
            base = next((r for r in rows if r["kind"] == row["kind"] and r["mode"] == base_mode), None)
            if base is None or base is row or "img_s" not in row or "img_s" not in base:
                continue
            row[field] = row["img_s"] / base["img_s"]
            row[field + "_cpu"] = base["cpu_ms_per_step"] / row["cpu_ms_per_step"]
            # Per round: the base's time over this mode's, from neighbouring blocks (robust to drift).
            paired = [
                b / m for b, m in zip(base["ms_per_step_blocks"], row["ms_per_step_blocks"], strict=False)
            ]
            row[field + "_paired"] = statistics.median(paired)
            row[field + "_paired_range"] = [min(paired), max(paired)]
        if args.target is not None and row["mode"] != "reference" and "img_s" in row:
            row["target_img_s"], row["meets_target"] = args.target, row["img_s"] >= args.target
    return rows


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every (kind, mode) of `args` interleaved; returns the record written as JSON."""
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # Lightning's strategy needs an index
    if device.type == "cuda":  # the reference's setting and train.py's for fp32 work
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_at_start = os.getloadavg()
    modes = [parse_mode(m) for m in args.modes]
    module = build_ours(args, device)
    recipe = (
        ReferenceObjects(args, module.model.state_dict(), device) if any(m.reference for m in modes) else None
    )
    flops = forward_flops(module.model)  # one image, forward, multiply-adds counted as 2
    rate, rate_dtype = matmul_tflops(device, args.matmul_size or (8192 if device.type == "cuda" else 1024))
    x = torch.randn(args.batch, args.channels, args.input_size, args.input_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    works = build_works(args, modes, module, recipe, (x, y), tempfile.mkdtemp(prefix="ditlab-bench-"))
    timing = run_interleaved(works, args, device)
    return {
        "device": describe_device(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average": {"start": load_at_start, "end": os.getloadavg()},  # 1, 5, 15 minutes
        "command": " ".join(sys.argv),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "summarize")},
        "fwd_gflops": flops / 2e9,  # the paper's convention: multiply-adds counted once
        "matmul_tflops": rate,
        "matmul_dtype": rate_dtype,
        "rows": result_rows(args, works, timing, flops, rate),
    }


# ---- output ----------------------------------------------------------------------------------------


def format_table(record: dict[str, Any]) -> str:
    c = record["config"]
    threads = f", {record['device']['torch_threads']} threads" if "torch_threads" in record["device"] else ""
    head = (
        f"{c['model']} {c['block']}, batch {c['batch']}, {record['device']['name']} "
        f"({record['device_type']}{threads}), torch {record['torch']}; median of {c['repeats']} blocks of "
        f"{c['steps']} steps [range]; matmul {record['matmul_tflops']:.3g} TFLOP/s {record['matmul_dtype']}"
    )
    lines = [
        head,
        f"{'kind':6} {'mode':20} {'ms/step [range]':>24} {'CPU ms/step':>11} {'img/s':>9} {'×ref':>6} "
        f"{'paired ×ref [range]':>20} {'×ref CPU':>8} {'×ours':>6} {'peak GiB':>9} {'MFU':>6} {'warm-up s':>9}",
    ]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"{r['kind']:6} {r['mode']:20} {r['error']}")
            continue
        spread = f"{r['ms_per_step']:.1f} [{r['ms_per_step_min']:.1f}–{r['ms_per_step_max']:.1f}]"
        ratio = f"{r['vs_reference']:.2f}" if "vs_reference" in r else "-"
        paired = "-"
        if "vs_reference_paired" in r:
            low, high = r["vs_reference_paired_range"]
            paired = f"{r['vs_reference_paired']:.2f} [{low:.2f}–{high:.2f}]"
        ratio_cpu = f"{r['vs_reference_cpu']:.2f}" if "vs_reference_cpu" in r else "-"
        vs_ours = f"{r['vs_ours']:.2f}" if "vs_ours" in r else "-"
        lines.append(
            f"{r['kind']:6} {r['mode']:20} {spread:>24} {r['cpu_ms_per_step']:11.1f} {r['img_s']:9.2f} "
            f"{ratio:>6} {paired:>20} {ratio_cpu:>8} {vs_ours:>6} {r['peak_mem_gib']:9.2f} "
            f"{100 * r['mfu']:5.1f}% {r['warmup_s']:9.1f}"
        )
        if "target_img_s" in r:
            lines[-1] += f"  target ≥{r['target_img_s']:g}: {'met' if r['meets_target'] else 'NOT met'}"
    return "\n".join(lines)


def write_json(record: dict[str, Any], out_dir: Path, tag: str) -> Path:
    """Writes `record` atomically to out_dir/<device>-<date>[-<tag>].json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{slug(record['device']['name'])}-{record['date'][:10]}" + (f"-{slug(tag)}" if tag else "")
    path = out_dir / f"{name}.json"
    return atomic_write_text(path, json.dumps(record, indent=1))


def summarize(paths: list[Path]) -> str:
    """One table over several result files, with targets, and throughput ratios between blocks."""
    records = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"no benchmark result at {path}")
        records.append(json.loads(path.read_text()))
    lines = [
        f"{'model':10} {'block':16} {'kind':6} {'mode':20} {'batch':>5} {'img/s':>9} {'×ref':>6} "
        f"{'MFU':>6}  target"
    ]
    groups: dict[tuple, dict[str, tuple[float, float]]] = {}
    for record in records:
        for r in record["rows"]:
            if "error" in r:
                lines.append(f"{r['model']:10} {r['block']:16} {r['kind']:6} {r['mode']:20} {r['error']}")
                continue
            ratio = f"{r['vs_reference']:.2f}" if "vs_reference" in r else "-"
            target = ""
            if "target_img_s" in r:
                target = f"≥{r['target_img_s']:g} {'met' if r['meets_target'] else 'NOT met'}"
            lines.append(
                f"{r['model']:10} {r['block']:16} {r['kind']:6} {r['mode']:20} {r['batch']:5d} "
                f"{r['img_s']:9.2f} {ratio:>6} {100 * r['mfu']:5.1f}%  {target}"
            )
            key = (r["model"], r["kind"], r["mode"], r["batch"])
            groups.setdefault(key, {})[r["block"]] = (r["img_s"], record["fwd_gflops"])
    for (model, kind, mode, batch), blocks in groups.items():
        if len(blocks) > 1 and "adaln_zero" in blocks:
            base_img_s, base_gflops = blocks["adaln_zero"]
            lines.append(f"blocks of {model} {kind} {mode} batch {batch}, relative to adaln_zero:")
            for name, (img_s, gflops) in blocks.items():
                lines.append(
                    f"  {name:16} img/s ×{img_s / base_img_s:.3f}   Gflops ×{gflops / base_gflops:.3f}   "
                    f"time per Gflop ×{(base_img_s / img_s) / (gflops / base_gflops):.3f}"
                )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/4", help="size/patch, e.g. DiT-XL/2")
    p.add_argument("--block", default="adaln_zero", help="in_context, cross_attention, adaln, adaln_zero")
    p.add_argument("--batch", type=int, default=8, help="images per step (sampling: before doubling)")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 for 256×256 images)")
    p.add_argument("--channels", type=int, default=4, help="latent channels")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--depth", type=int, default=None, help="override the size's number of blocks")
    p.add_argument("--modes", default="reference,ours", help="comma-separated, e.g. reference,ours,ours-bf16")
    p.add_argument("--kinds", default="train,sample", help="comma-separated subset of train,sample")
    p.add_argument("--steps", type=int, default=3, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before each block's timed ones")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per mode (rounds)")
    p.add_argument("--sample-steps", type=int, default=250, help="DDPM steps of the sampling process")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale (sample.py's default)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there, else cpu) or a torch device")
    p.add_argument("--matmul-size", type=int, default=None, help="side of the matmul that sets MFU's peak")
    p.add_argument("--target", type=float, default=None, help="images/s the ours rows should reach")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a dry run)"
    )
    p.add_argument(
        "--repa-encoder",
        default="vit_base_patch14_dinov2",
        help="timm encoder of the -repa modes (DINOv2 B/14)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "bench_results")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--summarize", type=Path, nargs="+", help="print a table of these result files and exit")
    args = p.parse_args(argv)
    if args.summarize:
        return args
    args.modes = list(dict.fromkeys(m.strip() for m in args.modes.split(",") if m.strip()))
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for mode in args.modes:
        parse_mode(mode)
    if "reference" in args.modes and args.block != "adaln_zero":
        p.error(
            f"the published reference has only the adaln_zero block; leave 'reference' out for {args.block}"
        )
    if not args.modes or any(k not in KINDS for k in args.kinds) or not args.kinds:
        p.error(f"--kinds must be a comma-separated subset of {','.join(KINDS)} and --modes non-empty")
    if min(args.batch, args.steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--batch, --steps and --repeats must be at least 1, --warmup at least 0")
    if "sample" in args.kinds and args.warmup + args.steps > args.sample_steps:
        p.error(
            f"--warmup + --steps ({args.warmup + args.steps}) exceed --sample-steps ({args.sample_steps})"
        )
    try:
        args.device = str(resolve_device(args.device))  # a string: the record's config is JSON
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return None
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for message in (  # Lightning's notes on the short fits; FlopCounterMode's hooks around a compiled DiT
        "smaller than the logging interval",
        "module\\(s\\) in eval mode",
        "isinstance\\(treespec",
        "Using `torch.compile\\(module\\)` when there are global hooks",
    ):
        warnings.filterwarnings("ignore", message=f".*{message}")
    record = benchmark(args)
    path = write_json(record, args.out, args.tag)
    print(format_table(record))
    print(f"[bench] wrote {path}")
    return record


if __name__ == "__main__":
    main()
