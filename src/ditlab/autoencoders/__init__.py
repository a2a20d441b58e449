"""Autoencoders: the map between images in [-1, 1] and the space diffusion runs in."""

from ditlab.autoencoders.base import Autoencoder, IdentityAutoencoder
from ditlab.autoencoders.sd_vae import SDVAE, load_autoencoder_kl

__all__ = ["SDVAE", "Autoencoder", "IdentityAutoencoder", "load_autoencoder_kl"]
