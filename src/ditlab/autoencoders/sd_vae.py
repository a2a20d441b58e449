"""Stable Diffusion's VAE, the latent space of the DiT paper (256×256×3 -> 32×32×4)."""

from pathlib import Path
from typing import Any

import torch

from ditlab.autoencoders.base import Autoencoder

VARIANTS = ("ema", "mse")  # stabilityai/sd-vae-ft-ema and -mse; both share one encoder, decoders differ


def load_autoencoder_kl(pretrained: str, local_files_only: bool = False) -> Any:
    """A diffusers AutoencoderKL from a local folder (save_pretrained layout) or a hub name."""
    from diffusers import AutoencoderKL  # slow to import; only needed when a VAE is used

    # low_cpu_mem_usage needs `accelerate`, which ditlab does not depend on; the VAE is small anyway.
    if Path(pretrained).expanduser().is_dir():
        return AutoencoderKL.from_pretrained(Path(pretrained).expanduser(), low_cpu_mem_usage=False)
    if pretrained.startswith(("/", ".", "~")) or pretrained.count("/") != 1:
        raise FileNotFoundError(
            f"VAE folder {pretrained} does not exist (and is not a hub name like stabilityai/sd-vae-ft-ema); "
            "pass autoencoder.pretrained=/path/to/a/folder/with/config.json/and/weights"
        )
    try:
        return AutoencoderKL.from_pretrained(
            pretrained, local_files_only=local_files_only, low_cpu_mem_usage=False
        )
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load the VAE {pretrained!r}: it is not a local folder and the Hugging Face hub did not "
            f"provide it ({err}). Without internet here, download it where there is "
            f"(`hf download {pretrained} --local-dir {pretrained.split('/')[1]}`), copy that "
            "folder here and pass autoencoder.pretrained=/path/to/that/folder"
        ) from err


class SDVAE(Autoencoder):
    """A frozen diffusers AutoencoderKL: z = scale_factor · (posterior sample), x = decode(z / scale_factor).

    `pretrained` is a hub name or a local folder; when None it is `stabilityai/sd-vae-ft-{variant}`.
    The VAE stays in eval mode, without gradients, and runs in its own dtype with autocast off, so the
    latents do not depend on the training precision. Grey images (1 channel) are replicated to RGB before
    encoding; `decode(z, channels=1)` returns the mean of the decoded RGB.
    """

    def __init__(
        self,
        *,
        pretrained: str | None = None,
        variant: str = "ema",
        scale_factor: float = 0.18215,
        local_files_only: bool = False,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        pretrained = pretrained or f"stabilityai/sd-vae-ft-{variant}"
        if Path(pretrained).expanduser().is_dir():  # recorded absolute, so latent manifests name it exactly
            pretrained = str(Path(pretrained).expanduser().resolve())
        self.pretrained = pretrained
        self.variant = variant
        self.scale_factor = scale_factor
        self.local_files_only = local_files_only
        self.vae = load_autoencoder_kl(self.pretrained, local_files_only).requires_grad_(False).eval()
        self.downsample_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def train(self, mode: bool = True) -> "SDVAE":
        super().train(mode)
        self.vae.eval()  # frozen: stays in eval mode when a parent module switches to training
        return self

    def latent_channels(self, in_channels: int) -> int:
        self._check_channels(in_channels)
        return self.vae.config.latent_channels

    def _check_channels(self, channels: int) -> None:
        if channels not in (1, self.vae.config.in_channels):
            raise ValueError(
                f"the VAE takes images with {self.vae.config.in_channels} channels (or 1, replicated), "
                f"got {channels}"
            )

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self._check_channels(x.shape[1])
        if x.shape[1] == 1:
            x = x.expand(-1, self.vae.config.in_channels, -1, -1)
        with torch.autocast(x.device.type, enabled=False):
            posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
            return posterior.sample(generator) * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        if channels is not None:
            self._check_channels(channels)
        with torch.autocast(z.device.type, enabled=False):
            x = self.vae.decode(z.to(self.vae.dtype) / self.scale_factor).sample.clamp(-1.0, 1.0)
        return x.mean(dim=1, keepdim=True) if channels == 1 else x

    @property
    def config(self) -> dict[str, Any]:
        return {
            "_target_": "ditlab.autoencoders.SDVAE",
            "pretrained": self.pretrained,
            "variant": self.variant,
            "scale_factor": self.scale_factor,
            "local_files_only": self.local_files_only,
        }
