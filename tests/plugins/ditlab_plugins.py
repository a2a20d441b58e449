"""A user's own design-space entries, outside `src/ditlab`: a fifth block, a size, a sampler, a dataset, an
interpolant path, an objective and a whole new axis (label dropout).
Each is one class (or one registered value) here plus one YAML in `conf/` beside this file."""

from pathlib import Path

import torch
from torch import nn

from ditlab.data.base import ImageDataModule, InMemoryImageDataset, collate_batched
from ditlab.design import group_axis, register_axis
from ditlab.diffusion import GaussianDiffusion, create_diffusion, register_objective
from ditlab.diffusion.interpolant import InterpolantPath, register_path
from ditlab.diffusion.sampling import DDIM, register_sampler
from ditlab.models import DiTBlock, DiTSize, register_block, register_size
from ditlab.models.blocks import Attention, mlp

register_size("DiT-Pico", DiTSize(depth=1, hidden_size=48, num_heads=2, in_paper=False))
# A new axis: its config group conf/label_dropout/ (label_drop_10, the paper's, or no_label_drop).
register_axis("label_dropout", group_axis("label_dropout", "label_drop_10"))


@register_block("film")
class FiLMBlock(DiTBlock):
    """FiLM: a ViT block whose MLP output is scaled and shifted per channel by c (no gates, no adaLN)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = mlp(hidden_size, mlp_ratio)
        self.film = nn.Linear(hidden_size, 2 * hidden_size)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        gamma, beta = self.film(cond)[:, None].chunk(2, dim=-1)  # (N, 1, d) each
        return x + self.mlp(self.norm2(x)) * (1 + gamma) + beta


@register_path("quadratic")
class QuadraticPath(InterpolantPath):
    """α_t = t², σ_t = 1 − t²: from noise at t = 0 to data at t = 1, slower near the noise."""

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return t**2, 1 - t**2, 2 * t, -2 * t


@register_objective("ddpm_x0_cosine")
def ddpm_x0_cosine(learn_sigma: bool = True) -> GaussianDiffusion:
    """The paper's diffusion on the cosine schedule, predicting x0: its own objective, sampled by DDPM/DDIM."""
    return create_diffusion(noise_schedule="cosine", predict="x0", learn_sigma=learn_sigma)


@register_sampler("ddim_noisy")
class NoisyDDIM(DDIM):
    """DDIM with η = 1 (as stochastic as DDPM, on DDIM's strided steps)."""

    def __init__(self) -> None:
        super().__init__(eta=1.0)


class StripesDataModule(ImageDataModule):
    """4 classes of 16×16 grey images: vertical stripes of period 2, 4, 8, 16 at random phases."""

    collate_fn = staticmethod(collate_batched)

    def __init__(
        self, *, num_images: int = 64, random_flip: bool = True, batch_size: int = 16, **loader
    ) -> None:
        super().__init__(batch_size=batch_size, random_flip=random_flip, **loader)
        self.num_images = num_images

    class_names = property(lambda self: ["p2", "p4", "p8", "p16"])
    image_size = property(lambda self: 16)
    channels = property(lambda self: 1)
    source = property(lambda self: str(Path(__file__).resolve()))

    def build_dataset(self, split: str, random_flip: bool) -> InMemoryImageDataset | None:
        if split != "train":
            return None
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(self.num_images) % 4
        phase = torch.randint(16, (self.num_images, 1), generator=g)
        period = (2 ** (labels + 1))[:, None]
        columns = ((torch.arange(16)[None] + phase) // (period // 2)) % 2  # (N, 16)
        images = (columns[:, None, None, :] * 255).expand(-1, 1, 16, -1).to(torch.uint8).contiguous()
        return InMemoryImageDataset(images, labels, random_flip)
