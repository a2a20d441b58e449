from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ditlab.autoencoders import SDVAE, IdentityAutoencoder

CONF = Path(__file__).resolve().parents[1] / "conf" / "autoencoder"


@pytest.fixture(scope="module")
def tiny_vae(tiny_vae_dir) -> SDVAE:
    return SDVAE(pretrained=str(tiny_vae_dir))


def images(n: int = 2, channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_identity_is_the_identity():
    ae = IdentityAutoencoder()
    x = images(channels=1)
    assert torch.equal(ae.encode(x), x)
    assert torch.equal(ae.decode(x), x)
    assert torch.equal(ae.decode(torch.full((1, 1, 2, 2), 3.0)), torch.ones(1, 1, 2, 2))  # clamped
    assert ae.latent_shape(1, 32) == (1, 32)
    assert ae.latent_shape(3, 256) == (3, 256)
    assert instantiate(ae.config).config == ae.config


def test_sd_vae_shapes_and_frozen(tiny_vae):
    assert tiny_vae.downsample_factor == 2
    assert tiny_vae.latent_shape(3, 32) == (4, 16)
    assert tiny_vae.latent_shape(1, 32) == (4, 16)  # grey is replicated to RGB
    assert all(not p.requires_grad for p in tiny_vae.parameters())
    tiny_vae.train()
    assert not tiny_vae.vae.training  # a parent's .train() must not unfreeze dropout/norm statistics
    z = tiny_vae.encode(images())
    assert z.shape == (2, 4, 16, 16) and not z.requires_grad
    x = tiny_vae.decode(z)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_sd_vae_encode_is_a_scaled_posterior_sample(tiny_vae):
    x = images()
    z = tiny_vae.encode(x, torch.Generator().manual_seed(7))
    posterior = tiny_vae.vae.encode(x).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, 0.18215 * (posterior.mean + posterior.std * eps))
    assert torch.equal(z, tiny_vae.encode(x, torch.Generator().manual_seed(7)))  # seeded: reproducible
    assert not torch.equal(z, tiny_vae.encode(x, torch.Generator().manual_seed(8)))


def test_sd_vae_decode_undoes_the_scale(tiny_vae):
    z = torch.randn(2, 4, 16, 16)
    expected = tiny_vae.vae.decode(z / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(tiny_vae.decode(z), expected)
    torch.testing.assert_close(tiny_vae.decode(z, channels=1), expected.mean(1, keepdim=True))


def test_sd_vae_grey_images_are_replicated_to_rgb(tiny_vae):
    grey = images(channels=1)
    z_grey = tiny_vae.encode(grey, torch.Generator().manual_seed(0))
    z_rgb = tiny_vae.encode(grey.repeat(1, 3, 1, 1), torch.Generator().manual_seed(0))
    torch.testing.assert_close(z_grey, z_rgb)


def test_sd_vae_ignores_autocast(tiny_vae):
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = tiny_vae.encode(x, torch.Generator().manual_seed(0))
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, tiny_vae.encode(x, torch.Generator().manual_seed(0)))


def test_bad_shapes_are_clear_errors(tiny_vae):
    with pytest.raises(ValueError, match="multiple of the autoencoder's downsample factor 2"):
        tiny_vae.latent_shape(3, 33)
    with pytest.raises(ValueError, match="3 channels"):
        tiny_vae.encode(images(channels=2))


def test_missing_vae_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SDVAE(pretrained=str(tmp_path / "no_such_vae"))
    # A hub name that is not cached, without contacting the hub.
    with pytest.raises(FileNotFoundError, match=r"autoencoder\.pretrained=/path/to/that/folder"):
        SDVAE(pretrained="stabilityai/sd-vae-ft-ema", local_files_only=True)
    with pytest.raises(ValueError, match="variant"):
        SDVAE(variant="xl")


def test_configs_instantiate(tiny_vae_dir):
    sd_vae = OmegaConf.load(CONF / "sd_vae.yaml")
    assert sd_vae.pretrained == "stabilityai/sd-vae-ft-ema"
    sd_vae.variant = "mse"
    assert sd_vae.pretrained == "stabilityai/sd-vae-ft-mse"
    sd_vae.pretrained = str(tiny_vae_dir)
    ae = instantiate(sd_vae)
    assert isinstance(ae, SDVAE) and ae.variant == "mse" and ae.scale_factor == 0.18215
    assert ae.config["pretrained"] == str(tiny_vae_dir.resolve())
    again = instantiate(ae.config)  # the config recorded in latent manifests re-creates the autoencoder
    assert all(
        torch.equal(a, b) for a, b in zip(ae.state_dict().values(), again.state_dict().values(), strict=True)
    )
    assert isinstance(instantiate(OmegaConf.load(CONF / "identity.yaml")), IdentityAutoencoder)
