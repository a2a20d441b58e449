"""The interface between data and the diffusion model: images in [-1, 1] <-> the space diffusion runs in."""

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class Autoencoder(nn.Module, ABC):
    """Maps images x (N, C, H, W) in [-1, 1] to latents z (N, c, H/f, W/f) and back, f = downsample_factor.

    Latents are already scaled for diffusion (unit-ish variance). `latent_shape` gives the model's
    (in_channels, input_size) from the data's channels and image size, so they are never typed twice.
    """

    downsample_factor: int
    scale_factor: float = 1.0  # latent = scale_factor · (the autoencoder's own latent)

    @abstractmethod
    def latent_channels(self, in_channels: int) -> int:
        """Channels of the latent of an image with `in_channels` channels."""

    @abstractmethod
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x (N, C, H, W) in [-1, 1] -> z (N, c, H/f, W/f), sampled from the posterior with `generator`."""

    @abstractmethod
    def decode(self, z: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        """z (N, c, h, w) -> x (N, channels, h·f, w·f) in [-1, 1]."""

    @property
    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Keyword arguments with `_target_` that re-create this autoencoder via hydra.utils.instantiate."""

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int]:
        """(latent channels, latent size) of square images with `channels` channels and side `image_size`."""
        if image_size % self.downsample_factor:
            raise ValueError(
                f"image size {image_size} is not a multiple of the autoencoder's downsample factor "
                f"{self.downsample_factor}; choose an image size divisible by {self.downsample_factor}"
            )
        return self.latent_channels(channels), image_size // self.downsample_factor


class IdentityAutoencoder(Autoencoder):
    """Pixel-space diffusion: latents are the images themselves."""

    downsample_factor = 1

    def latent_channels(self, in_channels: int) -> int:
        return in_channels

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        if channels is not None and channels != z.shape[1]:
            raise ValueError(f"pixel-space latents have {z.shape[1]} channels, not {channels}")
        return z.clamp(-1.0, 1.0)

    @property
    def config(self) -> dict[str, Any]:
        return {"_target_": "ditlab.autoencoders.IdentityAutoencoder"}
