"""FD-DINOv2: the protocol's resizing and normalisation, the CLS features with the hub's position embedding,
statistics and distance against float64 closed forms, reference statistics, local weights, and what a run
does without weights (auto: one line and FID alone; true: a refusal before the first step).

A small random DINOv2-style ViT/14 stands in for ViT-L/14: no test downloads anything."""

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from ditlab.encoders import EncoderWeightsMissing, encoder_weights
from ditlab.io import content_sha256
from ditlab.metrics.dinov2 import DINOv2Features, fd_dinov2_network, parse_fd_dinov2, preprocess
from ditlab.metrics.evaluation import evaluate_samples, format_metrics
from ditlab.metrics.fid import PrecomputedFeatures, frechet_metric
from ditlab.metrics.reference import load_reference, reference_from_images
from ditlab.training.callbacks import FIDMonitor
from test_metrics import StubFeatures, frechet_closed_form, random_images
from test_train import needs_fashion_mnist, run_train

ENCODER = "vit_small_patch14_dinov2"  # DINOv2's layout (CLS token, layer scale, 37×37 positions at 518²)
KWARGS = dict(depth=1, embed_dim=32, num_heads=2)
# The protocol's constants, typed here rather than imported: ImageNet's mean and std.
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def tiny_dinov2(**kwargs) -> DINOv2Features:
    torch.manual_seed(0)
    return DINOv2Features(ENCODER, pretrained=False, encoder_kwargs=KWARGS, **kwargs)


def timm_twin() -> torch.nn.Module:
    """The same random ViT as `tiny_dinov2`'s before its position embedding is resampled (same seed)."""
    torch.manual_seed(0)
    return timm.create_model(ENCODER, pretrained=False, num_classes=0, **KWARGS).eval()


def protocol_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 → (N, 3, 224, 224) as the protocol says, computed independently of ditlab: each
    channel resized by PIL's bicubic filter on float values (dgm-eval's resize, without its uint8 rounding),
    grey replicated to RGB, then /255 and ImageNet's normalisation, in float64."""
    out = []
    for image in images:
        channels = [image[..., c].astype(np.float32) for c in range(image.shape[-1])]
        resized = [
            np.asarray(Image.fromarray(c, mode="F").resize((224, 224), Image.Resampling.BICUBIC), np.float64)
            for c in channels
        ]
        rgb = np.stack(resized * 3 if len(resized) == 1 else resized)
        out.append((rgb / 255 - MEAN[:, None, None]) / STD[:, None, None])
    return torch.from_numpy(np.stack(out))


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


# the protocol ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "channels"), [(32, 3), (28, 1), (256, 3)])
def test_preprocess_is_the_stated_protocol(size, channels):
    images = np.random.default_rng(size).integers(0, 256, (2, size, size, channels), dtype=np.uint8)
    expected = protocol_pixels(images)
    got = preprocess(as_tensor(images))
    assert got.shape == (2, 3, 224, 224) and got.dtype == torch.float32
    # PyTorch's antialiased bicubic is PIL's filter: within 5e-3 of 255 of it, 1e-4 after normalisation.
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=0)
    # Float images in [0, 1] (training's samples, not rounded) go the same way.
    torch.testing.assert_close(preprocess(as_tensor(images).float() / 255), got, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess(as_tensor(images).float())


def test_features_are_the_normed_cls_token_with_the_hubs_position_embedding():
    net, twin = tiny_dinov2(), timm_twin()
    assert net.num_features == 32 and "random weights: not for results" in net.identity
    # The hub's DINOv2 resamples its 37×37 positions to 16×16 bicubically at scale (16 + 0.1)/37, without
    # antialiasing; the class token's position is kept.
    grid = twin.pos_embed[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    hub = F.interpolate(grid, scale_factor=16.1 / 37, mode="bicubic", antialias=False)
    hub = torch.cat([twin.pos_embed[:, :1], hub.permute(0, 2, 3, 1).reshape(1, 256, 32)], 1)
    torch.testing.assert_close(net.net.pos_embed.data, hub)
    # timm's own resampling to the exact size, antialiased, would differ.
    assert not torch.allclose(hub[:, 1:], timm.layers.resample_abs_pos_embed(twin.pos_embed, (16, 16))[:, 1:])

    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    twin.pos_embed = torch.nn.Parameter(hub)
    twin.patch_embed.set_input_size(img_size=(224, 224))
    with torch.no_grad():
        expected = twin(protocol_pixels(images).float())  # timm's pooled output: the normed CLS token
    torch.testing.assert_close(net(as_tensor(images)), expected, atol=1e-4, rtol=1e-4)
    grey = as_tensor(images[..., :1])
    torch.testing.assert_close(net(grey), net(grey.expand(-1, 3, -1, -1)))


# statistics and distance ----------------------------------------------------------------------------------


def dinov2_features(net: DINOv2Features, images: np.ndarray) -> np.ndarray:
    return net(as_tensor(images)).double().numpy()


def test_statistics_and_distance_against_float64(tmp_path):
    net = tiny_dinov2()
    real_images, fake_images = (
        random_images(40, seed=1, size=16),
        random_images(30, seed=2, size=16, high=160),
    )
    real, fake = dinov2_features(net, real_images), dinov2_features(net, fake_images)

    reference = reference_from_images(as_tensor(real_images).split(16), net, source="toy", num_pr_images=0)
    np.testing.assert_allclose(reference.mu, real.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(reference.sigma, np.cov(real, rowvar=False), rtol=1e-8, atol=1e-12)
    assert reference.mu_s is None and reference.pool_features is None and reference.num_images == 40

    metric = frechet_metric(PrecomputedFeatures(32), reference.mu, reference.sigma, reference.num_images)
    metric.update(torch.from_numpy(fake), real=False)
    expected = frechet_closed_form(real, fake)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)

    # evaluate.py's route: one pass over the samples feeds FID (the stub Inception) and FD-DINOv2.
    np.savez(tmp_path / "samples.npz", arr_0=fake_images)
    inception_ref = load_reference(tmp_path / "samples.npz", StubFeatures(), cache_dir=None)
    results = evaluate_samples(
        tmp_path / "samples.npz",
        inception_ref,
        StubFeatures(),
        batch_size=7,
        dinov2=net,
        dinov2_reference=reference,
    )
    assert results["fd_dinov2"] == pytest.approx(expected, rel=1e-6)
    assert abs(results["fid"]) < 1e-6  # the stub's FID of the samples against themselves
    assert results["fd_dinov2_network"] == net.identity and results["fd_dinov2_reference"] == "toy"
    assert "FD-DINOv2" in format_metrics(results)


def test_reference_of_an_adm_npz_uses_its_images_not_its_inception_statistics(tmp_path):
    net, images = tiny_dinov2(), random_images(12, seed=3, size=16)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048))
    reference = load_reference(tmp_path / "ref.npz", net, cache_dir=tmp_path, num_pr_images=0, stored=False)
    np.testing.assert_allclose(reference.mu, dinov2_features(net, images).mean(0), rtol=1e-10, atol=1e-12)
    assert load_reference(tmp_path / "ref.npz", net, cache_dir=tmp_path, num_pr_images=0, stored=False).source
    assert len(list(tmp_path.glob("ref-*.npz"))) == 1  # cached under the network's identity
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="needs `arr_0` images for DINOv2"):
        load_reference(tmp_path / "stats.npz", net, cache_dir=None, stored=False)


# weights ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_folder", [False, True])
def test_local_weights_load_and_are_named_by_content(tmp_path, as_folder):
    save_file(timm_twin().state_dict(), tmp_path / "model.safetensors")
    torch.manual_seed(1)  # another random init, overwritten by the file
    path = tmp_path if as_folder else tmp_path / "model.safetensors"
    loaded = DINOv2Features(ENCODER, path, encoder_kwargs=KWARGS)
    images = as_tensor(random_images(2, seed=4, size=16))
    torch.testing.assert_close(loaded(images), tiny_dinov2()(images))
    assert f"sha256 {content_sha256(path)[:12]}" in loaded.identity
    assert "random" not in loaded.identity


def test_encoder_weights_found_or_missing_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    key = "callbacks.fid.fd_dinov2_"
    with pytest.raises(
        EncoderWeightsMissing, match=r"^callbacks\.fid\.fd_dinov2_encoder_path /nowhere/m\.st"
    ):
        encoder_weights(ENCODER, "/nowhere/m.st", key=key)
    (tmp_path / "m.safetensors").touch()
    assert encoder_weights(ENCODER, tmp_path / "m.safetensors") == {"file": str(tmp_path / "m.safetensors")}

    cache = {}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, f, **_: cache.get((repo, f)))

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("downloaded"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    name = "vit_large_patch14_dinov2.lvd142m"
    with pytest.raises(EncoderWeightsMissing, match="not in the Hugging Face cache\\); give callbacks"):
        encoder_weights(name, key=key, download=False)  # auto: what is here, never the network
    with pytest.raises(EncoderWeightsMissing, match="cannot be reached: \\[Errno -2\\]"):
        encoder_weights(name, key=key, download=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderWeightsMissing, match="HF_HUB_OFFLINE is set"):
        encoder_weights(name, key=key, download=True)
    cache[("timm/vit_large_patch14_dinov2.lvd142m", "model.safetensors")] = "/cache/model.safetensors"
    assert encoder_weights(name, key=key, download=False) == {"file": "/cache/model.safetensors"}


def test_auto_on_a_cpu_or_without_weights_and_explicit_without_weights(tmp_path):
    # evaluate.py's and the FID callback's decision (the callback's lines: the tests below).
    missing = tmp_path / "none.safetensors"
    net, why = fd_dinov2_network("auto", ENCODER, missing, device="cpu")
    assert net is None and why == (
        f"FD-DINOv2 left out, FID alone: fd_dinov2_encoder_path {missing} does not exist (fd_dinov2=true "
        "downloads them, fd_dinov2=false silences this)"
    )
    with pytest.raises(EncoderWeightsMissing, match=r"^fd_dinov2=true, but fd_dinov2_encoder_path"):
        fd_dinov2_network(True, ENCODER, missing)
    weights = tmp_path / "model.safetensors"
    save_file(timm_twin().state_dict(), weights)
    net, why = fd_dinov2_network("auto", ENCODER, weights, device="cpu")
    assert net is None and why.startswith("FD-DINOv2 left out on the CPU, FID alone: DINOv2 ViT-L/14 takes")
    for mode, device in (("auto", "cuda"), (True, "cpu")):  # weights here, and no CPU or asked for
        net, why = fd_dinov2_network(mode, ENCODER, weights, device=device, encoder_kwargs=KWARGS)
        assert isinstance(net, DINOv2Features) and why == ""
    assert fd_dinov2_network(False) == (None, "")


def test_parse_fd_dinov2():
    assert [parse_fd_dinov2(v, "k") for v in (True, False, "auto", "TRUE", "false")] == [
        True,
        False,
        "auto",
        True,
        False,
    ]
    with pytest.raises(ValueError, match=r"^k=maybe: must be auto"):
        parse_fd_dinov2("maybe", "k")


# the FID callback without weights -------------------------------------------------------------------------


def monitor(tmp_path, **kwargs) -> FIDMonitor:
    return FIDMonitor(str(tmp_path), fd_dinov2_encoder_path=str(tmp_path / "missing.safetensors"), **kwargs)


def test_auto_without_weights_says_so_in_one_line_and_goes_on(tmp_path, capsys):
    fid = monitor(tmp_path)  # fd_dinov2: auto, the default
    assert fid.prepare_fd_dinov2() is False and fid._dinov2 is None
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("[ditlab] FD-DINOv2 left out, FID alone: ")
    assert (
        "callbacks.fid.fd_dinov2_encoder_path" in lines[0]
        and "missing.safetensors does not exist" in lines[0]
    )
    assert fid.prepare_fd_dinov2() is False and capsys.readouterr().out == ""  # once
    assert monitor(tmp_path, fd_dinov2=False).prepare_fd_dinov2() is False
    assert capsys.readouterr().out == ""


def test_explicit_fd_dinov2_without_weights_is_refused(tmp_path):
    with pytest.raises(
        EncoderWeightsMissing, match=r"^callbacks\.fid\.fd_dinov2=true, but callbacks\.fid\.fd"
    ):
        monitor(tmp_path, fd_dinov2=True).prepare_fd_dinov2()
    with pytest.raises(ValueError, match=r"callbacks\.fid\.fd_dinov2=sometimes: must be auto"):
        monitor(tmp_path, fd_dinov2="sometimes")


@needs_fashion_mnist
def test_train_refuses_explicit_fd_dinov2_without_weights_before_the_first_step(tmp_path):
    proc = run_train(
        tmp_path,
        "debug=tiny",
        "logger=none",
        "callbacks.fid.fd_dinov2=true",
        "callbacks.fid.fd_dinov2_encoder_path=/nonexistent/dinov2.safetensors",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: callbacks.fid.fd_dinov2=true, but callbacks.fid.fd_dinov2_encoder_path "
        "/nonexistent/dinov2.safetensors does not exist, or set callbacks.fid.fd_dinov2=auto for FID alone"
    )
    # Refused in the FID callback's setup: after Checkpointing's made its (empty) folder, before any step.
    assert not list(tmp_path.glob("checkpoints/*")) and not (tmp_path / "results.json").exists()
    assert "train/loss" not in proc.stdout


def test_results_json_of_a_run_with_fd_dinov2_is_recorded(tmp_path):
    # What the callback records, through its FID pass (see test_fid_protocol.py for the fake model).
    from test_fid_protocol import FakeModule, fake_trainer, stub_reference

    fid = FIDMonitor(
        str(tmp_path),
        num_samples=12,
        batch_size=5,
        reference=str(stub_reference(tmp_path)),
        cache_dir=str(tmp_path / "cache"),
        fd_dinov2=True,
        fd_dinov2_encoder=ENCODER,
        fd_dinov2_pretrained=False,
        fd_dinov2_encoder_kwargs=KWARGS,
    )
    fid._net = StubFeatures()
    torch.manual_seed(0)
    assert fid.prepare_fd_dinov2() is True
    module = FakeModule()
    fid.evaluate(fake_trainer(), module)
    record = json.loads((tmp_path / "results.json").read_text())
    net, ref_images = fid._dinov2, np.load(tmp_path / "ref.npz")["arr_0"]
    fake = module.images(0, range(12))
    expected = frechet_closed_form(dinov2_features(net, ref_images), net((fake + 1) / 2).double().numpy())
    assert record["fd_dinov2"] == pytest.approx(expected, rel=1e-5)
    assert record["fd_dinov2_per_seed"] == [record["fd_dinov2"]] and record["fd_dinov2_std"] is None
    assert record["fd_dinov2_network"] == net.identity and record["fd_dinov2_reference_images"] == 20
    assert record["fid_history"][-1]["fd_dinov2"] == record["fd_dinov2"]
