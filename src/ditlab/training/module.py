"""The LightningModule: a DiT trained with the diffusion objective, with an EMA copy for sampling."""

import copy
import functools
import random
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from ditlab.design import default_axes
from ditlab.diffusion.loss_terms import LossContext, LossTerm
from ditlab.diffusion.sampling import (
    Evaluations,
    Objective,
    SamplingSpec,
    image_generators,
    sample,
    seeded_generator,
)
from ditlab.io import checkpoint_header
from ditlab.metrics import count_params, forward_flops
from ditlab.models import DiT, complete_config
from ditlab.training.masking import Masking, draw_keep, num_kept, reconstruction_loss, visible_pixels
from ditlab.training.schedules import linear_warmup

# The coordinates (`ditlab.design.DesignPoint`) a resumed run may change: the FID's sampler (and its time
# shift) scores the model, it is no part of the model or its training. Every other coordinate must be the
# checkpoint's.
RESUME_MAY_CHANGE = ("sampler", "sample_time_shift")


class DiTModule(L.LightningModule):
    """Trains `model` (a DiT) on `diffusion.training_losses` (the paper's Gaussian diffusion, SiT's
    interpolant or MeanFlow) with `optimizer` (a partial taking the
    parameters; default: the paper's AdamW, lr 1e-4, no weight decay, fused) under `scheduler` (a partial taking the optimizer; default:
    constant) and an EMA of its weights.

    Batches are (x, y): images in [-1, 1] encoded by `autoencoder` in the loop when `encode_batches`,
    or latents already (pixel space, or pre-extracted latents). `info` is plain data describing the run
    (data, autoencoder, design-space coordinates); it is stored in every checkpoint under "ditlab" next
    to the model config, so that a checkpoint alone rebuilds the model.

    The EMA is an extra frozen copy of the model, updated after every optimizer step with one
    `_foreach_lerp_` (rather than Lightning's EMAWeightAveraging, whose per-tensor update and
    checkpoint-swapping layout fit large models and exact resumption less well). It is saved in the
    checkpoint as `ema.*`, so resumption restores it exactly.

    `repa` (optional, `ditlab.training.repa.REPA`): representation alignment of the tokens after block
    `repa.depth` to a frozen encoder's features of the same images, added to the loss with weight λ; its
    projector trains with the model (and is saved), its encoder stays frozen and out of checkpoints.

    `loss_terms` (optional, `ditlab.diffusion.loss_terms.build_loss_terms`): {name: (weight, term)}, each
    term's batch value added to the batch loss with its weight and logged as `train/<name>`; none (the
    default) leaves the loss the objective's.

    `masking` (optional, `ditlab.training.masking.Masking`): MaskDiT's masked training. Each image of a
    masked step drops a random fraction of its tokens (`step_keep`); the loss is the objective's on the
    visible patches plus λ times the reconstruction loss on the masked ones (logged as `train/recon`);
    the last `finetune_steps` steps train unmasked. None (the default): every step unmasked, as the paper.

    Non-finite losses: the fused AdamW step is skipped on the device (its `found_inf` input), so no
    host sync is needed per step; the run aborts with a clear message once `max_nonfinite_steps`
    steps in a row were skipped (checked at logging steps).
    """

    def __init__(
        self,
        model: DiT,
        diffusion: Objective,
        autoencoder: nn.Module,
        *,
        encode_batches: bool = False,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        ema_decay: float = 0.9999,
        repa: nn.Module | None = None,
        loss_terms: dict[str, tuple[float, LossTerm]] | None = None,
        masking: Masking | None = None,
        max_nonfinite_steps: int = 5,
        compile: bool = False,
        seed: int = 0,
        info: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        # Left in train mode like the rest (Lightning warns of eval-mode modules at the start of training):
        # it is only ever run through `sample`, which puts it in eval mode.
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.diffusion = diffusion
        # Frozen, and kept out of the submodules so that checkpoints do not carry the (84M-parameter)
        # VAE; it is moved to the device in `on_fit_start`.
        object.__setattr__(self, "autoencoder", autoencoder.requires_grad_(False).eval())
        self.encode_batches = encode_batches
        # `_partial_` configs (conf/optim): the optimizer takes the parameters, the schedule the optimizer.
        self.optimizer_factory = optimizer or functools.partial(
            torch.optim.AdamW, lr=1e-4, weight_decay=0.0, fused=True
        )
        self.scheduler_factory = scheduler or linear_warmup
        self.ema_decay = ema_decay
        self.repa = repa
        self._repa_tokens: torch.Tensor | None = None
        if repa is not None:
            # The tokens after block k, caught on their way through (no change to the model's forward).
            self.model.blocks[repa.depth - 1].register_forward_hook(self._catch_repa_tokens)
        self.loss_terms = dict(loss_terms or {})
        for _, term in self.loss_terms.values():
            term.check(diffusion)
            term.attach(self.model)  # after the EMA copy: its hooks stay on the trained model
        # An objective that trains in a way some settings cannot follow (MeanFlow's JVP) refuses them here.
        check_training = getattr(diffusion, "check_training", None)
        if check_training is not None:
            check_training(model, repa=repa is not None, loss_terms=list(self.loss_terms))
        self.masking = masking or Masking()
        if self.masking.mask_ratio:
            self.masking.check(model, diffusion, repa=repa is not None, loss_terms=list(self.loss_terms))
        self.max_nonfinite_steps = max_nonfinite_steps
        self.compile_model = compile
        self.seed = seed
        self.info = dict(info or {})
        self.register_buffer("nonfinite_in_a_row", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("nonfinite_total", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("found_inf", torch.zeros(()), persistent=False)
        # Read by ditlab's Throughput callback for MFU: the pass of the step just run (a masked one costs less).
        self.flops_per_batch: int | None = None
        self._flops_per_batch: tuple[int, int] | None = None  # (unmasked, masked) steps'
        self._rng_to_restore: dict[str, Any] | None = None
        # Autoguidance's guides by path (`guide_model`): a plain dict, so no submodules, not in checkpoints.
        self._guides: dict[str, nn.Module] = {}

    # ---- training ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit":
            # The paper's per-rank seed (label dropout, flips); diffusion noise is seeded per step below.
            torch.manual_seed(self.seed * self.trainer.world_size + self.global_rank)
            if self.compile_model:
                self.model.compile()  # in place: state-dict keys stay free of `_orig_mod.`

    def _catch_repa_tokens(self, block: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._repa_tokens = output[:, : self.model.num_patches]  # (N, T, d): in-context's t/y tokens dropped

    def on_fit_start(self) -> None:
        # "In a row" counts within one fit: a module fitted again (a benchmark's blocks) starts afresh, as a
        # resumed run does (the counter is not in checkpoints).
        self.nonfinite_in_a_row.zero_()
        self.autoencoder.to(self.device)
        if self.repa is not None:
            self.repa.encoder_to(self.device)
        batch_size = self.trainer.datamodule.batch_size if self.trainer.datamodule else 1
        unmasked = masked = 3 * forward_flops(self.model) * batch_size  # forward + backward ≈ 3×
        if self.masking.mask_ratio:
            visible = num_kept(self.model.num_patches, self.masking.mask_ratio)
            masked = 3 * forward_flops(self.model, visible_tokens=visible) * batch_size
        self._flops_per_batch = (unmasked, masked)
        self.flops_per_batch = unmasked

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        images = x
        if self.encode_batches:
            with torch.no_grad():
                x = self.autoencoder.encode(x)
        t, noise = self.step_noise(x)
        keep = self.step_keep(x)
        model_fn, seen = self.model, {}
        if self.loss_terms or keep is not None:  # the terms and the reconstruction read its input and output

            def model_fn(x_t: torch.Tensor, t_model: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                seen.update(x_t=x_t, t=t_model, out=self.model(x_t, t_model, **kwargs))
                return seen["out"]

        model_kwargs, masked = {"y": y}, {}
        if keep is not None:
            grid = self.model.input_size // self.model.patch_size
            model_kwargs["keep"] = keep
            masked["loss_mask"] = visible_pixels(keep, grid, self.model.patch_size)
        losses = self.diffusion.training_losses(
            model_fn, x, t=t, noise=noise, model_kwargs=model_kwargs, **masked
        )
        if keep is not None:
            prediction = seen["out"][:, : x.shape[1]]
            losses["recon"] = reconstruction_loss(prediction, seen["x_t"], keep, self.model.patch_size)
            losses["loss"] = losses["loss"] + self.masking.recon_weight * losses["recon"]
        elif self.model.mask_token is not None:
            # An unmasked step leaves the mask token out, and DDP (static_graph) wants every parameter's
            # gradient at every step: a zero from it, as MaskDiT adds.
            losses["loss"] = losses["loss"] + 0 * self.model.mask_token.sum()
        if self.masking.mask_ratio:
            self.flops_per_batch = self._flops_per_batch[keep is not None] if self._flops_per_batch else None
            visible = self.model.num_patches if keep is None else keep.shape[1]
            self.log("train/mask_ratio", 1 - visible / self.model.num_patches)  # 0 in the fine-tune phase
            # No masked patch in the fine-tune phase: its reconstruction loss is 0 (the logs would otherwise
            # repeat the last masked step's value).
            losses.setdefault("recon", torch.zeros_like(losses["loss"]))
        if self.repa is not None:
            losses["repa"] = self.repa.loss(self._repa_tokens, images)  # (N,)
            losses["loss"] = losses["loss"] + self.repa.weight * losses["repa"]
        loss = losses["loss"].mean()
        if self.loss_terms:
            context = LossContext(self.diffusion, x, noise, seen["t"], seen["x_t"], seen["out"])
            for name, (weight, term) in self.loss_terms.items():
                losses[name] = term(context)
                loss = loss + weight * losses[name]
        nonfinite = ~torch.isfinite(loss)
        self.found_inf.copy_(nonfinite)  # AdamW(fused) skips its update when this is 1
        self.nonfinite_in_a_row.copy_(torch.where(nonfinite, self.nonfinite_in_a_row + 1, 0))
        self.nonfinite_total.add_(nonfinite)
        metrics = {"train/loss": loss, "train/mse": losses["mse"].mean()}
        for term in ("vb", "repa", "recon", *self.loss_terms):
            if term in losses:
                metrics[f"train/{term}"] = losses[term].mean()
        self.log_dict(metrics, prog_bar=True)
        self.log("train/nonfinite_steps", self.nonfinite_total.float())
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])  # a Python float: no sync
        return loss

    def step_noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (N,) (MeanFlow's: (N, 2), its t and r) and noise like x for this rank's share of the
        global batch.

        Drawn for the whole global batch from a generator seeded by (seed, step), then sliced by rank:
        the same examples get the same t and noise on any number of processes, and a resumed run
        draws what the uninterrupted one did.
        """
        n, world, rank = x.shape[0], self.trainer.world_size, self.global_rank
        generator = seeded_generator(self.seed, self.global_step, x.device)
        t = self.diffusion.sample_t(n * world, generator, x.device)
        noise = torch.randn((n * world, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
        return t[rank * n : (rank + 1) * n], noise[rank * n : (rank + 1) * n]

    def step_keep(self, x: torch.Tensor) -> torch.Tensor | None:
        """The visible tokens (N, K) of this rank's images at this step, each row ascending; None on an
        unmasked step (no masking, or its fine-tune phase: `Masking.ratio_at`).

        Drawn like `step_noise`'s for the whole global batch, then sliced by rank, from the generator of
        index −1 − step of the run's seed: a stream apart from the steps' noise (index step), so a masked
        run draws the times and noise of the unmasked run, and reproduces and resumes as exactly."""
        if not self.masking.mask_ratio:  # no masking: nothing to draw (and no trainer read)
            return None
        ratio = self.masking.ratio_at(self.global_step, self.trainer.max_steps)
        if not ratio:
            return None
        n, world, rank = x.shape[0], self.trainer.world_size, self.global_rank
        tokens = self.model.num_patches
        generator = seeded_generator(self.seed, -1 - self.global_step, x.device)
        keep = draw_keep(n * world, tokens, num_kept(tokens, ratio), generator, x.device)
        return keep[rank * n : (rank + 1) * n]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the global norm ourselves: Lightning's mixed-precision plugin refuses any clipping with a
        fused optimizer because of fp16's loss scaling, which bf16-mixed does not use; under 16-mixed the
        gradients are still scaled here, so that combination is refused with what to change."""
        if not gradient_clip_val:
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):  # the norm over all shards: FSDP's own clipping
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "optim.grad_clip with trainer.precision=16-mixed: the fused AdamW unscales the gradients inside "
                "its step, after clipping would act; use trainer.precision=bf16-mixed or optim.grad_clip=null"
            )
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(
                f"trainer.gradient_clip_algorithm={gradient_clip_algorithm}: only 'norm' is supported"
            )
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()
        if self.global_step % self.trainer.log_every_n_steps == 0:  # a host sync: only at logging steps
            self.check_nonfinite()

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema ← decay·ema + (1 − decay)·model, in one foreach kernel per dtype."""
        ema_params = list(self.ema.parameters())
        model_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, model_params, 1.0 - self.ema_decay)

    def check_nonfinite(self) -> None:
        in_a_row = int(self.nonfinite_in_a_row)
        if in_a_row >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"the loss was NaN/inf for {in_a_row} steps in a row (step {self.global_step}, "
                f"{int(self.nonfinite_total)} in all); those updates were skipped. Lower optim.lr, set "
                "optim.grad_clip (e.g. 1.0), or use trainer.precision=bf16-mixed rather than 16-mixed."
            )

    def configure_optimizers(self) -> dict[str, Any]:
        parameters = list(self.model.parameters())
        if self.repa is not None:
            parameters += list(self.repa.parameters())  # the projector (the encoder is not a submodule)
        optimizer = self.optimizer_factory(parameters)
        # Read by fused AdamW/Adam kernels: skip the step on a bad loss (other optimizers ignore it).
        optimizer.found_inf = self.found_inf
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor | None,
        spec: SamplingSpec,
        *,
        indices: Sequence[int] | None = None,
        use_ema: bool = True,
        evaluations: Evaluations | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (N, C, H, W) in [-1, 1] and their labels (N,), from the EMA weights by default, as `spec`
        says (in the trainer's precision: callers run it in its forward context; the guide too).

        Image k is image `indices[k]` (default k) of the job `spec.seed`: drawn from its own generator (see
        `ditlab.diffusion.sampling`), with its label from `labels` (N,) or drawn uniformly. `evaluations`
        counts the network's evaluations (`ditlab.diffusion.sampling.Evaluations`: an FID's NFE). With
        `spec.guide`, autoguidance by that checkpoint (`guide_model`).
        """
        net = (self.ema if use_ema else self.model).eval()
        if indices is None:
            indices = range(len(labels))
        shape = (net.in_channels, net.input_size, net.input_size)
        z, labels = sample(
            net,
            self.diffusion,
            image_generators(spec.seed, indices, self.device),
            shape,
            spec,
            labels=labels,
            num_classes=net.num_classes,
            evaluations=evaluations,
            guide=None if spec.guide is None else self.guide_model(spec.guide, f"{spec.key}guide.ckpt"),
        )
        return self.autoencoder.to(self.device).decode(z).clamp(-1, 1), labels

    def guide_model(self, path: str, key: str = "guide.ckpt") -> nn.Module:
        """The guide of autoguidance at `path` (a weaker checkpoint of this run's objective: an earlier one of
        the run, a smaller model's), loaded once per path through `ditlab.interop.checkpoints.load_guide`
        (EMA weights, eval mode, frozen; refused in one line naming `key` when its objective, input shape or
        classes do not fit this model) and returned on the module's device in the EMA model's dtype. The
        sampling callbacks call it in their `setup`, so that a bad guide fails before the first step."""
        guide = self._guides.get(path)
        if guide is None:
            from ditlab.interop.checkpoints import load_guide

            if "diffusion" not in self.info:
                raise ValueError(
                    f"{key}={path}: this module's info has no diffusion config (its objective) to check the "
                    "guide against; build it with info={'diffusion': <the objective's config>, ...}"
                )
            guide = load_guide(
                path,
                self.model.config,
                self.info["diffusion"],
                key=key,
                autoencoder=self.info.get("autoencoder"),
            )
            self._guides[path] = guide
        return guide.to(device=self.device, dtype=next(self.ema.parameters()).dtype)

    # ---- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ditlab"] = checkpoint_header(self.model.config, **self.info)
        checkpoint["rng"] = {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        checkpoint["nonfinite_total"] = int(self.nonfinite_total)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_resumable(checkpoint.get("ditlab", {}), self.trainer.ckpt_path)
        self._rng_to_restore = checkpoint.get("rng")
        self.nonfinite_total.fill_(checkpoint.get("nonfinite_total", 0))

    def check_resumable(self, header: dict[str, Any], path: Any) -> None:
        """Refuses to resume from the checkpoint `path` (`header`: its "ditlab" entry) of another design point
        or model, in one line naming each difference. Lightning calls `on_load_checkpoint` before it loads
        weights or optimizer state, so a mismatch neither trains on under the new name nor fails in a
        state-dict load."""
        saved: dict[str, Any] = {}
        ours: dict[str, Any] = {}
        if "coordinates" in header and "coordinates" in self.info:
            # A checkpoint saved before an axis existed was trained at the paper's value of it.
            saved |= default_axes() | header["coordinates"]
            ours |= self.info["coordinates"]
        if header.get("model_config") is not None:  # shares some names (block, norm, ...) and their values
            saved |= complete_config(header["model_config"])
            ours |= self.model.config
        differences = [
            f"{key}: {saved.get(key)!r} vs {ours.get(key)!r}"
            for key in dict.fromkeys([*saved, *ours])
            if key not in RESUME_MAY_CHANGE and saved.get(key) != ours.get(key)
        ]
        if differences:
            raise ValueError(
                f"cannot resume from {path}: it was trained at another design point or with another model "
                f"(checkpoint vs this run: {', '.join(differences)}); resume with the checkpoint's overrides, or, "
                "to change the objective or the architecture on purpose, start a new run from its weights with "
                f"init_from={path} rather than ckpt_path="
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # RNG states are restored right before the first resumed step, after Lightning has set up the
        # loaders, so the resumed run draws exactly the noise and timesteps the uninterrupted one did.
        if self._rng_to_restore is not None:
            rng, self._rng_to_restore = self._rng_to_restore, None
            random.setstate(rng["python"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def complexity(self) -> dict[str, float]:
        """Forward Gflops per sample (the paper's convention) and parameters in millions. `gflops` is the
        unmasked forward (sampling's: the number of the paper's tables); with masked training,
        `gflops_train_forward` is the masked training pass's (the blocks on the visible tokens, the decoder
        on all)."""
        summary = {"gflops": forward_flops(self.model) / 2e9, "params_m": count_params(self.model) / 1e6}
        if self.masking.mask_ratio:
            visible = num_kept(self.model.num_patches, self.masking.mask_ratio)
            summary["gflops_train_forward"] = forward_flops(self.model, visible_tokens=visible) / 2e9
        return summary

    def train_compute_gflop(self, steps: int, images_per_step: int) -> float:
        """Training compute of the first `steps` steps of `images_per_step` images each (the global batch):
        3 × forward Gflops (forward and backward) × images, each step at the forward it runs: the masked
        pass (`gflops_train_forward`) before masked training's fine-tune phase, the unmasked one (`gflops`)
        otherwise. The paper's Figure 9 counts training compute; FID against it then compares a masked run
        with an unmasked one at what each cost."""
        summary = self.complexity()
        masked = self.masking.masked_steps(steps, self.trainer.max_steps)
        unmasked_compute = summary["gflops"] * 3 * ((steps - masked) * images_per_step)
        return unmasked_compute + summary.get("gflops_train_forward", 0.0) * 3 * (masked * images_per_step)
