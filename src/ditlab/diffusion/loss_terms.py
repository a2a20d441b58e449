"""Extra loss terms added to an objective's loss, each with its weight (`loss_terms.<name>=<weight>` in a
run's config; 0, the default, leaves the term out and the loss exactly the objective's):

    total loss = objective loss (batch mean) + Σ weight · term (batch mean)

- `cosine_velocity` (LightningDiT, Yao et al. 2025, "Reconstruction vs. Generation", its velocity direction
  loss): 1 − cos(v̂, v) between the predicted velocity (`Interpolant.velocity` of the model's output: any
  prediction) and the true one α'·x1 + σ'·ε. `over="channels"` (LightningDiT's code: the cosine over the
  C channels at each position, averaged over the positions) or `over="image"` (one cosine over all of an
  image's C·H·W values). With one channel (Fashion-MNIST in pixel space) the channel cosine is the sign of
  v̂·v, constant almost everywhere, and gives no gradient: use `over=image` there. Interpolants only.
- `dispersive` (Wang & He 2025, "Diffuse and Disperse", its InfoNCE-ℓ2 variant, the paper's default):
  L = log( (1/N²) Σ_{i,j} exp(−‖z_i − z_j‖² / (D·τ)) ) over the N images of the batch (per process),
  i = j included (the authors' code: the full N×N matrix), z_i the image tokens after block `depth`
  (1-based; in-context's t/y tokens dropped) flattened to D = T·d values. No positive pairs: it only
  pushes the representations of different images apart. Defaults are the paper's (its JAX runs): τ = 0.5,
  block depth//4 (at least 1), weight λ = 0.5 there; the authors' PyTorch release uses τ = 1, the last
  block, λ = 0.25. Any objective.

A term is a `LossTerm` subclass registered with `@register_loss_term("name")` from any module (its config
options: `loss_term_options.<name>.<option>`, and `module:` there to import the module that registers it).
"""

import importlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ditlab.registry import Registry


@dataclass
class LossContext:
    """What a term may read from one training step: the objective, the clean data x1, the noise, the
    times t, the network's input x_t and its output (N, C or 2C, ...)."""

    objective: Any
    x1: Tensor
    noise: Tensor
    t: Tensor
    x_t: Tensor
    out: Tensor


class LossTerm:
    """One extra loss term: `attach(model)` before training (e.g. a forward hook), then `__call__(context)`
    each step gives the term's batch value (a scalar)."""

    name = ""  # set by @register_loss_term

    def attach(self, model: nn.Module) -> None:
        """Called once with the model being trained (the DiT), before the first step."""

    def check(self, objective: Any) -> None:
        """ValueError, before training, when this term cannot be computed for `objective`."""

    def __call__(self, context: LossContext) -> Tensor:
        raise NotImplementedError


LOSS_TERMS: Registry[type[LossTerm]] = Registry("loss term")
register_loss_term = LOSS_TERMS.register


@register_loss_term("cosine_velocity")
class CosineVelocity(LossTerm):
    """LightningDiT's 1 − cos(v̂, v), averaged over the batch (and, `over="channels"`, over positions)."""

    def __init__(self, over: str = "channels", eps: float = 1e-8) -> None:
        if over not in ("channels", "image"):
            raise ValueError(
                f"loss_term_options.cosine_velocity.over={over!r} is unknown; valid: channels, image"
            )
        self.over, self.eps = over, eps

    def check(self, objective: Any) -> None:
        if not hasattr(objective, "velocity"):
            raise ValueError(
                "loss_terms.cosine_velocity needs a velocity: it is a term of the interpolants (diffusion=sit_linear, "
                f"sit_gvp), not of {type(objective).__name__}"
            )

    def __call__(self, context: LossContext) -> Tensor:
        objective = context.objective
        predicted = objective.velocity(context.out, context.x_t, context.t)
        _, target = objective.interpolate(context.x1, context.t, context.noise)
        if self.over == "image":
            predicted, target = predicted.flatten(1), target.flatten(1)
        return (1 - F.cosine_similarity(predicted, target, dim=1, eps=self.eps)).mean()


@register_loss_term("dispersive")
class Dispersive(LossTerm):
    """Diffuse and Disperse's InfoNCE-ℓ2 term on the image tokens after block `depth` (1-based; None: the
    paper's depth//4, at least 1), temperature `temperature` (τ, the paper's 0.5)."""

    def __init__(self, depth: int | None = None, temperature: float = 0.5) -> None:
        if not temperature > 0:
            raise ValueError(
                f"loss_term_options.dispersive.temperature={temperature} must be > 0 (the paper's: 0.5)"
            )
        self.depth, self.temperature = depth, temperature
        self.tokens: Tensor | None = None
        self._num_patches = 0

    def attach(self, model: nn.Module) -> None:
        blocks = len(model.blocks)
        self.depth = max(1, blocks // 4) if self.depth is None else self.depth
        if not 1 <= self.depth <= blocks:
            raise ValueError(
                f"loss_term_options.dispersive.depth={self.depth} must be in [1, {blocks}] (the model's depth)"
            )
        self._num_patches = model.num_patches
        model.blocks[self.depth - 1].register_forward_hook(self._catch)

    def _catch(self, block: nn.Module, inputs: Any, output: Tensor) -> None:
        self.tokens = output[:, : self._num_patches]  # (N, T, d): in-context's t/y tokens dropped

    def __call__(self, context: LossContext) -> Tensor:
        if self.tokens is None:
            raise RuntimeError("the dispersive term read no tokens: attach it to the model it trains")
        return dispersive_loss(self.tokens, self.temperature)


def dispersive_loss(z: Tensor, temperature: float) -> Tensor:
    """log mean_{i,j} exp(−‖z_i − z_j‖² / (D·τ)) of the N rows of z (N, ...) flattened to D values, i = j
    included; at least float32 under autocast."""
    z = z.flatten(1)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    n, dim = z.shape
    squared = z.pow(2).sum(1)
    # ‖z_i − z_j‖² from the Gram matrix (no N×N×D tensor), exactly 0 on the diagonal: no NaN gradient there.
    distances = (squared[:, None] + squared[None, :] - 2 * z @ z.T).clamp_min(0)
    distances = torch.where(torch.eye(n, dtype=torch.bool, device=z.device), 0, distances)
    return torch.logsumexp(-distances.flatten() / (dim * temperature), dim=0) - 2 * math.log(n)


def build_loss_terms(
    weights: dict[str, Any] | None, options: dict[str, Any] | None = None
) -> dict[str, tuple[float, LossTerm]]:
    """{name: (weight, term)} for every term of `weights` (name → weight) whose weight is not 0, each built
    from its `options` (name → keyword arguments; a `module` there is imported first, to register it)."""
    terms = {}
    for name, weight in (weights or {}).items():
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"loss_terms.{name}={weight!r} must be a number (the term's weight; 0: off)")
        if weight == 0:
            continue
        kwargs = dict((options or {}).get(name) or {})
        module = kwargs.pop("module", None)
        if module:
            importlib.import_module(module)
        cls = LOSS_TERMS[name]
        terms[name] = (float(weight), cls(**kwargs))
    return terms
