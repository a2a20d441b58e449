"""REPA: the alignment loss, the frozen encoder kept out of checkpoints, local weights, bad inputs."""

import pytest
import torch
from safetensors.torch import save_file

from ditlab.models import build_dit
from ditlab.training.repa import REPA

# A tiny random DINOv2-style ViT/14 with 4 registers (5 prefix tokens to strip): builds in well under a second.
ENCODER = "vit_small_patch14_reg4_dinov2"
ENCODER_KWARGS = dict(depth=1, embed_dim=32, num_heads=2, img_size=56)


def make_repa(hidden_size: int = 24, **kwargs) -> REPA:
    torch.manual_seed(0)
    kwargs = dict(model_depth=4, pretrained=False, projector_dim=16, encoder_kwargs=ENCODER_KWARGS) | kwargs
    return REPA(hidden_size, ENCODER, **kwargs)


def test_loss_is_minus_mean_cosine():
    repa = make_repa().double().encoder_to(torch.float64)
    tokens, images = torch.randn(3, 16, 24, dtype=torch.float64), torch.rand(3, 3, 32, 32) * 2 - 1
    loss = repa.loss(tokens, images.double())
    z, f = repa.projector(tokens), repa.encoder_features(images.double(), 4)  # (3, 16, 32) each
    cos = (z * f).sum(-1) / (z.pow(2).sum(-1).sqrt() * f.pow(2).sum(-1).sqrt())
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, -cos.mean(-1), rtol=1e-6, atol=1e-6)
    assert ((loss >= -1) & (loss <= 1)).all()


def test_loss_is_minus_one_when_aligned(monkeypatch):
    repa = make_repa()
    tokens = torch.randn(2, 16, 24)
    target = repa.projector(tokens).detach()
    monkeypatch.setattr(repa, "encoder_features", lambda images, grid: 3 * target)  # aligned, scaled
    torch.testing.assert_close(repa.loss(tokens, torch.zeros(2, 3, 32, 32)), torch.full((2,), -1.0))
    monkeypatch.setattr(repa, "encoder_features", lambda images, grid: -target)
    torch.testing.assert_close(repa.loss(tokens, torch.zeros(2, 3, 32, 32)), torch.full((2,), 1.0))


def test_gradients_reach_projector_and_dit_not_encoder():
    repa = make_repa(hidden_size=192)
    model = build_dit("DiT-Ti/4", input_size=32, in_channels=3, num_classes=10, depth=4)
    captured = {}
    hook = model.blocks[repa.depth - 1].register_forward_hook(
        lambda module, args, out: captured.update(tokens=out[:, : model.num_patches])
    )
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    model(images, torch.tensor([10, 500]), torch.tensor([1, 2]))
    hook.remove()
    repa.loss(captured["tokens"], images).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in repa.encoder.parameters())
    assert not repa.encoder.training


def test_encoder_not_in_state_dict_and_moved_apart():
    repa = make_repa().train()
    keys = repa.state_dict().keys()
    assert keys and all(k.startswith("projector.") for k in keys)
    assert {id(p) for p in repa.parameters()} == {id(p) for p in repa.projector.parameters()}
    assert not repa.encoder.training  # .train() does not reach it
    repa.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in repa.encoder.parameters())
    assert repa.encoder_to(torch.float64) is repa
    assert all(p.dtype == torch.float64 for p in repa.encoder.parameters())


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("grid", [8, 4])
def test_encoder_feature_shape(channels, grid):
    repa = make_repa()
    feats = repa.encoder_features(torch.rand(2, channels, 32, 32) * 2 - 1, grid)
    assert feats.shape == (2, grid * grid, 32)
    assert not feats.requires_grad


def test_grey_is_repeated_to_rgb():
    repa, grey = make_repa(), torch.rand(2, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(
        repa.encoder_features(grey, 4), repa.encoder_features(grey.repeat(1, 3, 1, 1), 4)
    )


@pytest.mark.parametrize("as_folder", [False, True])
def test_loads_local_safetensors(tmp_path, as_folder):
    reference = make_repa()
    save_file(reference.encoder.state_dict(), tmp_path / "model.safetensors")
    torch.manual_seed(1)  # a different random init, overwritten by the file's weights
    path = tmp_path if as_folder else tmp_path / "model.safetensors"
    loaded = REPA(24, ENCODER, model_depth=4, encoder_path=str(path), encoder_kwargs=ENCODER_KWARGS)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.encoder_features(images, 4), reference.encoder_features(images, 4))


def test_bad_inputs():
    repa = make_repa()
    with pytest.raises(ValueError, match="1 or 3"):
        repa.encoder_features(torch.zeros(2, 4, 32, 32), 4)
    with pytest.raises(ValueError, match="square"):
        repa.loss(torch.zeros(2, 15, 24), torch.zeros(2, 3, 32, 32))
    for depth in (0, 5):
        with pytest.raises(ValueError, match=r"repa\.depth"):
            make_repa(depth=depth)
    with pytest.raises(FileNotFoundError, match=r"repa\.encoder_path"):
        make_repa(pretrained=True, encoder_path="/nonexistent/model.safetensors")


@pytest.mark.parametrize(("model_depth", "expected"), [(28, 8), (12, 3), (4, 1), (1, 1)])
def test_default_depth_is_8_of_28(model_depth, expected):
    assert make_repa(model_depth=model_depth).depth == expected


def test_projector_flops():
    assert make_repa().projector_flops(16) == 2 * 16 * (24 * 16 + 16 * 16 + 16 * 32)
