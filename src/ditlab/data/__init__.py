"""Datamodules (Fashion-MNIST, image folders, pre-extracted latents) and latent extraction."""

from ditlab.data.base import ImageDataModule, InMemoryImageDataset, collate_batched
from ditlab.data.extract import extract_latents
from ditlab.data.fashion_mnist import FashionMNISTDataModule, read_idx
from ditlab.data.image_folder import ImageFolderDataModule, ImageFolderTransform, adm_center_crop
from ditlab.data.latents import LatentDataModule, LatentDataset, read_manifest

__all__ = [
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageFolderTransform",
    "InMemoryImageDataset",
    "LatentDataModule",
    "LatentDataset",
    "adm_center_crop",
    "collate_batched",
    "extract_latents",
    "read_idx",
    "read_manifest",
]
