import argparse
import json
import pickle
import re
import urllib.error
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from safetensors import safe_open

from ditlab.diffusion import cfg_model_fn, create_diffusion, get_sampler, space_timesteps
from ditlab.diffusion.sampling import SamplingSpec, image_generators, sample
from ditlab.interop import (
    checkpoints,
    export_safetensors,
    formats,
    infer_config,
    init_from_checkpoint,
    load_dit,
    resolve_checkpoint,
)
from ditlab.interop.diffusers_export import (
    export_diffusers,
    from_diffusers,
    load_diffusers_pipeline,
    make_scheduler,
    to_diffusers,
)
from ditlab.interop.generation import (
    concat_npz,
    generate,
    save_npz,
    to_uint8_rgb,
)
from ditlab.models import BLOCKS, DiT, build_dit

DIFFUSION = {"learn_sigma": True, "noise_schedule": "linear", "diffusion_steps": 1000}
# What load_dit returns for it: every argument of create_diffusion, defaults filled in.
NORMALIZED_DIFFUSION = {**DIFFUSION, "fixed_variance": "large", "predict": "epsilon", "loss": None}
PIXELS = {"name": "identity", "pretrained": None, "scale_factor": 1.0}
# What ditlab's training writes: the Hydra configs of the diffusion and autoencoder.
TRAINED_DIFFUSION = {"_target_": "ditlab.diffusion.create_diffusion", **DIFFUSION}
TRAINED_PIXELS = {"_target_": "ditlab.autoencoders.IdentityAutoencoder"}
# A tiny model (not a named size: ditlab checkpoints declare their config) for fast sampling.
TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)


def randomized(model: DiT, seed: int = 0, std: float = 0.1) -> DiT:
    """Non-zero weights everywhere (the zero-initialised adaLN and final layers would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def save_ditlab_ckpt(path: Path, model: DiT, ema: DiT, **header) -> Path:
    """A checkpoint as ditlab's training writes it, Lightning extras included."""
    header = {
        "version": 1,
        "model_config": model.config,
        "coordinates": {"block": "adaln_zero"},
        "diffusion": TRAINED_DIFFUSION,
        "autoencoder": TRAINED_PIXELS,
        "data": {
            "name": "toy",
            "num_classes": model.num_classes,
            "image_size": model.input_size,
            "channels": model.in_channels,
            "class_names": [f"c{i}" for i in range(model.num_classes)],
        },
    } | header
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    torch.save(
        {
            "state_dict": state,
            "ditlab": header,
            "epoch": 3,
            "global_step": 120,
            "pytorch-lightning_version": "2.6.6",
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-4}]}],
            "rng": {"python": (3, tuple(range(625)), None), "torch": torch.get_rng_state()},
        },
        path,
    )
    return path


def outputs(model: DiT, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, model.in_channels, model.input_size, model.input_size, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([0, 500, 999]), torch.tensor([0, 1, model.num_classes]))


@pytest.fixture
def tiny_ckpt(tmp_path):
    model, ema = randomized(DiT(**TINY), 0), randomized(DiT(**TINY), 1)
    return save_ditlab_ckpt(tmp_path / "tiny.ckpt", model, ema), model, ema


# ---- formats ---------------------------------------------------------------------------------------------


def test_ditlab_checkpoint_loads_with_weights_only_and_ema_by_default(tiny_ckpt):
    path, model, ema = tiny_ckpt
    raw = torch.load(path, weights_only=True)  # the format holds tensors and plain data only
    assert raw["ditlab"]["model_config"] == model.config
    loaded = load_dit(path)
    assert (loaded.source_format, loaded.weights, loaded.guidance_channels) == ("ditlab", "ema", None)
    assert loaded.diffusion == NORMALIZED_DIFFUSION and loaded.autoencoder == PIXELS
    assert loaded.data["class_names"] == ["c0", "c1", "c2"] and not loaded.model.training
    assert torch.equal(outputs(loaded.model), outputs(ema))
    assert torch.equal(outputs(load_dit(path, use_ema=False).model), outputs(model))


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_released_bare_state_dict_config_inferred_from_shapes(tmp_path, prefix):
    model = randomized(build_dit("DiT-Ti/4", input_size=16, in_channels=4, num_classes=3))
    torch.save({prefix + k: v for k, v in model.state_dict().items()}, tmp_path / "bare.pt")
    loaded = load_dit(tmp_path / "bare.pt")
    assert loaded.model.config == model.config
    assert loaded.source_format == "released" and loaded.guidance_channels == 3  # the reference's quirk
    assert loaded.autoencoder == {
        "name": "sd_vae",
        "pretrained": "stabilityai/sd-vae-ft-ema",
        "scale_factor": 0.18215,
    }
    assert loaded.data["image_size"] == 128
    assert torch.equal(outputs(loaded.model), outputs(model))


@pytest.mark.parametrize("block", sorted(BLOCKS))
@pytest.mark.parametrize("name,learn_sigma", [("DiT-S/8", True), ("DiT-B/2", False)])
def test_infer_config_recovers_every_block_and_size(block, name, learn_sigma):
    with torch.device("meta"):
        model = build_dit(name, block, input_size=32, num_classes=7, learn_sigma=learn_sigma)
    assert infer_config(model.state_dict()) == model.config


def test_reference_training_checkpoint_uses_ema_and_args(tmp_path):
    model, ema = (
        randomized(build_dit("DiT-Ti/4", input_size=16), 0),
        randomized(build_dit("DiT-Ti/4", input_size=16), 1),
    )
    args = argparse.Namespace(model="DiT-Ti/4", image_size=128, num_classes=1000, vae="mse", global_seed=0)
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}}, "args": args}
    torch.save(ckpt, tmp_path / "0400000.pt")
    loaded = load_dit(tmp_path / "0400000.pt")
    assert (loaded.source_format, loaded.weights, loaded.guidance_channels) == ("reference_train", "ema", 3)
    assert loaded.autoencoder["pretrained"] == "stabilityai/sd-vae-ft-mse"
    assert torch.equal(outputs(loaded.model), outputs(ema))
    assert torch.equal(outputs(load_dit(tmp_path / "0400000.pt", use_ema=False).model), outputs(model))

    ckpt["args"] = argparse.Namespace(model="DiT-S/4", image_size=128, num_classes=1000, vae="ema")
    torch.save(ckpt, tmp_path / "lying.pt")
    with pytest.raises(
        ValueError, match=r"looks like DiT-Ti/4 \(adaln_zero, input 16.*its args declare DiT-S/4"
    ):
        load_dit(tmp_path / "lying.pt")


def test_safetensors_export_round_trip(tiny_ckpt, tmp_path):
    path, _, ema = tiny_ckpt
    out = export_safetensors(path, tmp_path / "tiny.safetensors")
    with safe_open(out, framework="pt") as f:
        header = json.loads(f.metadata()["ditlab"])
    assert header["model_config"] == ema.config and header["weights"] == "ema"
    loaded = load_dit(out)
    assert loaded.source_format == "safetensors" and loaded.data["class_names"] == ["c0", "c1", "c2"]
    assert torch.equal(outputs(loaded.model), outputs(ema))


def test_wrong_shapes_name_the_lookalike_model(tmp_path):
    ti = randomized(build_dit("DiT-Ti/4", input_size=16, in_channels=4, num_classes=3))
    with torch.device("meta"):
        declared = build_dit("DiT-S/4", input_size=16, in_channels=4, num_classes=3).config
        asked = build_dit("DiT-S/2", input_size=16, in_channels=4, num_classes=3)
    save_ditlab_ckpt(tmp_path / "bad.ckpt", ti, ti, model_config=declared)
    lookalike = r"looks like DiT-Ti/4 \(adaln_zero, input 16, 4 channels, 3 classes, learned sigma\)"
    with pytest.raises(ValueError, match=lookalike + r"; its ditlab header declares DiT-S/4"):
        load_dit(tmp_path / "bad.ckpt")
    torch.save(ti.state_dict(), tmp_path / "ti.pt")
    with pytest.raises(ValueError, match=lookalike + r"; you asked for DiT-S/2"):
        init_from_checkpoint(asked, tmp_path / "ti.pt")


def test_expected_config_is_checked(tiny_ckpt):
    path, _, ema = tiny_ckpt
    assert torch.equal(outputs(load_dit(path, expect=ema.config).model), outputs(ema))
    with pytest.raises(
        ValueError, match=r"looks like DiT\(depth=2, hidden=32\)/2 .*; you asked for .*5 classes"
    ):
        load_dit(path, expect=ema.config | {"num_classes": 5})


def test_header_never_names_code_to_run(tmp_path):
    model = DiT(**TINY)
    save_ditlab_ckpt(
        tmp_path / "evil.ckpt", model, model, autoencoder={"_target_": "os.system", "command": "ls"}
    )
    with pytest.raises(ValueError, match="unknown autoencoder"):
        load_dit(tmp_path / "evil.ckpt")


def test_init_from_checkpoint_keeps_label_table_when_classes_differ(tmp_path):
    source = randomized(build_dit("DiT-Ti/4", input_size=16, in_channels=4, num_classes=1000))
    torch.save(source.state_dict(), tmp_path / "released.pt")
    target = build_dit("DiT-Ti/4", input_size=16, in_channels=4, num_classes=10)
    table = target.y_embedder.embedding_table.weight.clone()
    assert init_from_checkpoint(target, tmp_path / "released.pt") == ["y_embedder.embedding_table.weight"]
    assert torch.equal(target.y_embedder.embedding_table.weight, table)
    assert torch.equal(target.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)


class RunsCode:
    """A pickle payload: unpickling it calls open(marker, "w"), i.e. runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused_not_executed(tmp_path, writer):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    payload = {"model": {"x_embedder.proj.weight": RunsCode(marker)}}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match=r"refused to load|cannot read"):
        load_dit(path)
    assert not marker.exists()


def test_unknown_files_get_a_list_of_supported_formats(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "dict.pt")
    torch.save({"state_dict": {"model.a": torch.zeros(1)}}, tmp_path / "lightning.ckpt")
    for name, message in [
        ("list.pt", "not a checkpoint dict"),
        ("dict.pt", "unknown structure"),
        ("lightning.ckpt", "without a 'ditlab' header"),
    ]:
        with pytest.raises(ValueError, match=message + ".*supported formats"):
            load_dit(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dit(tmp_path / "missing.ckpt")


def test_released_names_download_once_into_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dst, progress=True):
        calls.append(url)
        torch.save({"w": torch.zeros(1)}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    for _ in range(2):
        path = resolve_checkpoint("DiT-XL-2-256x256.pt", cache_dir=tmp_path)
    assert path == tmp_path / "DiT-XL-2-256x256.pt" and path.is_file()
    assert calls == ["https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"]
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_released_names_offline_error_says_what_to_do(tmp_path, monkeypatch):
    def offline(url, dst, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = formats.RELEASED_URL.format(name="DiT-XL-2-512x512.pt")
    with pytest.raises(FileNotFoundError, match=f"{url}.*download it and pass the local path"):
        load_dit("DiT-XL-2-512x512.pt", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_interop_modules_import_one_way():
    """formats ← diffusers_export ← checkpoints (which dispatches to both) ← generation (sample.py's body,
    which loads checkpoints): no import circle."""
    imports = {
        path.stem: set(re.findall(r"from ditlab\.interop\.(\w+) import", path.read_text()))
        for path in Path(checkpoints.__file__).parent.glob("*.py")
    }
    assert imports["formats"] == set()
    assert imports["diffusers_export"] == {"formats"}
    assert imports["checkpoints"] <= {"formats", "diffusers_export"}
    assert imports["generation"] <= {"formats", "checkpoints"}


def test_interop_code_never_unpickles_untrusted_data():
    for path in Path(checkpoints.__file__).parent.glob("*.py"):
        source = path.read_text()
        assert source.count("torch.load(") == source.count("weights_only=True)"), path
        assert "allow_pickle=True" not in source and "pickle.load" not in source, path


# ---- diffusers -------------------------------------------------------------------------------------------

LATENT = dict(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=1000
)


def test_diffusers_transformer_matches_both_ways():
    ours = randomized(DiT(**LATENT))
    theirs = to_diffusers(ours)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([0, 999, 1000])
    with torch.no_grad():
        expected = ours(x, t, y)
        assert (theirs(x, timestep=t, class_labels=y).sample - expected).abs().max() < 1e-5
        assert (from_diffusers(theirs)(x, t, y) - expected).abs().max() < 1e-5
        for block in theirs.transformer_blocks:  # diffusers' own frequencies: a visible difference
            block.norm1.emb.time_proj.downscale_freq_shift = 1
        assert (theirs(x, timestep=t, class_labels=y).sample - expected).abs().max() > 1e-3


def test_diffusers_random_model_imports_exactly():
    torch.manual_seed(0)
    theirs = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_eps=1e-6,
    )
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.1)
    with pytest.raises(ValueError, match="block 1's copy of the embedder"):
        from_diffusers(theirs)
    with torch.no_grad():  # diffusers' DiT repeats one embedder in every block
        theirs.transformer_blocks[1].norm1.emb.load_state_dict(
            theirs.transformer_blocks[0].norm1.emb.state_dict()
        )
        for block in theirs.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([9, 10])
        ours = from_diffusers(theirs)
        assert ours.config["num_classes"] == 10 and ours.learn_sigma
        assert (ours(x, t, y) - theirs(x, timestep=t, class_labels=y).sample).abs().max() < 1e-5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_scheduler_has_our_noise_schedule(schedule):
    ours = create_diffusion(noise_schedule=schedule)
    theirs = make_scheduler({"noise_schedule": schedule, "diffusion_steps": 1000}, "ddim")
    assert torch.allclose(theirs.alphas_cumprod.double(), ours.alphas_cumprod, atol=1e-6)
    theirs.set_timesteps(10)
    assert theirs.timesteps.tolist() == space_timesteps(1000, "ddim10")[::-1]


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder)
    return folder


def test_exported_pipeline_samples_like_ditlab_ddim(tmp_path, tiny_vae_dir):
    model = randomized(DiT(**LATENT), std=0.05)
    vae_spec = {"name": "sd_vae", "pretrained": str(tiny_vae_dir), "scale_factor": 0.5}
    names = [f"class {i}" for i in range(1000)]
    data = {"name": "toy", "num_classes": 1000, "image_size": 16, "channels": 3, "class_names": names}
    ckpt = save_ditlab_ckpt(tmp_path / "latent.ckpt", model, model, autoencoder=vae_spec, data=data)
    folder = export_diffusers(load_dit(ckpt), tmp_path / "pipe")
    assert {p.name for p in folder.iterdir()} >= {
        "model_index.json",
        "transformer",
        "vae",
        "scheduler",
        "ditlab.json",
    }

    pipe = load_diffusers_pipeline(folder)
    assert pipe.vae.config.scaling_factor == 0.5 and pipe.labels["class 7"] == 7
    labels, noise = [1, 7], torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = pipe(
        labels,
        guidance_scale=3.0,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images

    guided = cfg_model_fn(model, 3.0, null_class=1000)  # the pipeline guides all channels
    with torch.no_grad():
        z = get_sampler("ddim").run(
            create_diffusion(), guided, noise, 4, lambda: None, {"y": torch.tensor(labels)}
        )
        expected = (pipe.vae.decode(z / 0.5).sample / 2 + 0.5).clamp(0, 1)
    assert images.shape == (2, 3, 16, 16)
    assert (images - expected).abs().max() < 1e-4

    loaded = load_dit(folder)  # and back
    assert loaded.source_format == "diffusers" and loaded.data["class_names"] == names
    assert loaded.autoencoder["pretrained"] == str((folder / "vae").resolve())
    assert (outputs(loaded.model) - outputs(model)).abs().max() < 1e-5


def test_non_pipeline_models_export_the_transformer_only(tiny_ckpt, tmp_path, caplog):
    path, _, ema = tiny_ckpt
    folder = export_diffusers(load_dit(path), tmp_path / "pixels")
    assert {p.name for p in folder.iterdir()} == {"transformer", "scheduler", "ditlab.json", "README.md"}
    assert "transformer and scheduler only" in caplog.text
    loaded = load_dit(folder)
    assert loaded.autoencoder == PIXELS and loaded.data["class_names"] == ["c0", "c1", "c2"]
    assert (outputs(loaded.model) - outputs(ema)).abs().max() < 1e-5
    with pytest.raises(FileExistsError):
        export_diffusers(load_dit(path), folder)
    adaln = randomized(DiT(**TINY, block="adaln"))
    with pytest.raises(ValueError, match="only adaLN-Zero"):
        to_diffusers(adaln)


# ---- sampling --------------------------------------------------------------------------------------------


def toy_model_fn(x, t, y):
    """A smooth stand-in for a learned-sigma model: (N, C, H, W) -> (N, 2C, H, W)."""
    scale = (1 + t.float() / 1000 + y.float() / 10).view(-1, 1, 1, 1)
    return torch.cat([torch.tanh(x * scale), torch.sin(x)], dim=1)


def test_to_uint8_rgb_rounds_like_the_reference():
    images = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6)
    pixels = to_uint8_rgb(images)
    assert pixels.shape == (1, 1, 6, 3) and pixels.dtype == torch.uint8
    assert pixels[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 255]
    assert torch.equal(pixels[..., 0], pixels[..., 2])  # grey replicated


def test_concat_npz_streams_shards_in_order(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [(rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), np.arange(n) + 10 * n) for n in (3, 1, 2)]
    parts = []
    for i, (images, labels) in enumerate(arrays):
        parts.append(tmp_path / f"{i}.npz")
        save_npz(parts[-1], images, labels)
    assert concat_npz(tmp_path / "all.npz", parts) == (6, 4, 4, 3)
    with np.load(tmp_path / "all.npz", allow_pickle=False) as f:
        assert list(f.keys()) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(f["arr_0"], np.concatenate([a for a, _ in arrays]))
        np.testing.assert_array_equal(f["arr_1"], np.concatenate([b for _, b in arrays]))


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return f["arr_0"], f["arr_1"]


def test_generate_is_independent_of_batches_ranks_and_interruptions(tiny_ckpt, tmp_path):
    loaded = load_dit(tiny_ckpt[0])
    spec = SamplingSpec("ddpm", steps=4, cfg_scale=2.0, seed=3)
    common = dict(spec=spec, num_samples=7, progress=False, png=False)
    generate(loaded, tmp_path / "a", batch_size=4, keep_parts=True, **common)
    images, labels = read_npz(tmp_path / "a.npz")
    assert images.shape == (7, 8, 8, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert set(labels.tolist()) <= {0, 1, 2} and len(set(labels.tolist())) > 1
    assert len(list((tmp_path / "a.parts").glob("*.npz"))) == 2

    generate(loaded, tmp_path / "b", batch_size=3, **common)
    np.testing.assert_array_equal(read_npz(tmp_path / "b.npz")[0], images)
    assert not (tmp_path / "b.parts").exists()
    job = json.loads((tmp_path / "b.json").read_text())
    assert (job["seed"], job["steps"], job["sampler"], job["cfg_scale"]) == (3, 4, "ddpm", 2.0)
    assert job["nfe"] == 8  # 4 guided steps, two evaluations each
    mtime = (tmp_path / "b.npz").stat().st_mtime_ns
    assert generate(loaded, tmp_path / "b", batch_size=3, **common) == {"npz": tmp_path / "b.npz"}
    assert (tmp_path / "b.npz").stat().st_mtime_ns == mtime  # a finished job is not run again

    (tmp_path / "a.npz").unlink()  # an interrupted job: the final file and a shard are missing
    (tmp_path / "a.parts" / "00000004-00000007.npz").unlink()
    generate(loaded, tmp_path / "a", batch_size=4, **common)
    np.testing.assert_array_equal(read_npz(tmp_path / "a.npz")[0], images)
    assert json.loads((tmp_path / "a.json").read_text())["nfe"] == 8  # the kept shard's count too

    for rank in (1, 0):  # two ranks (sequentially here): rank 0 assembles once all shards exist
        written = generate(loaded, tmp_path / "c", batch_size=2, rank=rank, world_size=2, **common)
    assert written == {"npz": tmp_path / "c.npz"}
    np.testing.assert_array_equal(read_npz(tmp_path / "c.npz")[0], images)
    np.testing.assert_array_equal(read_npz(tmp_path / "c.npz")[1], labels)
    assert json.loads((tmp_path / "c.json").read_text())["nfe"] == 8

    generate(loaded, tmp_path / "d", batch_size=4, keep_parts=True, **common)
    with pytest.raises(ValueError, match="seed differ"):
        generate(loaded, tmp_path / "d", batch_size=4, **(common | {"spec": replace(spec, seed=4)}))


def test_generate_rejects_bad_arguments(tiny_ckpt, tmp_path):
    loaded = load_dit(tiny_ckpt[0])
    for sampling, kwargs, message in [
        ({}, {"labels": [0, 5]}, r"labels \[5\] are outside \[0, 3\)"),
        ({"sampler": "euler"}, {"num_samples": 2}, r"use sampler=ddpm \| ddim"),
        ({"guidance_channels": 3}, {"num_samples": 2}, r"guidance_channels=3 must be in \[1, 1\]"),
        ({}, {"num_samples": 2, "npz": False, "png": False}, "nothing to write"),
    ]:
        with pytest.raises(ValueError, match=message):
            spec = SamplingSpec(**{"sampler": "ddpm", "steps": 2} | sampling)
            generate(loaded, tmp_path / "x", spec, progress=False, **kwargs)
    for sampling, message in [  # the spec refuses these itself, before any checkpoint is involved
        ({"sampler": "lms"}, "sampler=lms: unknown"),
        ({"sampler": "ddim", "sampler_options": {"eta": -1}}, "noise level must be"),
        ({"sampler": "ddpm", "sampler_options": {"eta": 0.5}}, "eta is not an option of sampler ddpm"),
        ({"steps": 0}, "steps=0 is out of range: it must be ≥ 1"),
        ({"cfg_scale": -1}, "cfg_scale=-1 is out of range: it must be ≥ 0"),
        ({"cfg_interval": [0.9, 0.1]}, r"cfg_interval=\[0.9, 0.1\] must be \[low, high\]"),
        ({"precision": "fp16"}, "precision=fp16: unknown"),
    ]:
        with pytest.raises(ValueError, match=message):
            SamplingSpec(**sampling)
    assert list(tmp_path.iterdir()) == [tmp_path / "tiny.ckpt"]  # nothing written


def test_generate_decodes_latents_with_the_checkpoint_vae(tmp_path, tiny_vae_dir):
    model = randomized(DiT(**LATENT), std=0.05)
    vae_spec = {"name": "sd_vae", "pretrained": str(tiny_vae_dir), "scale_factor": 0.5}
    data = {"name": "toy", "num_classes": 1000, "image_size": 16, "channels": 3, "class_names": None}
    loaded = load_dit(
        save_ditlab_ckpt(tmp_path / "latent.ckpt", model, model, autoencoder=vae_spec, data=data)
    )
    spec = SamplingSpec("ddim", steps=3, cfg_scale=1.5)
    common = dict(labels=[3, 999], progress=False, png=False)
    images = read_npz(generate(loaded, tmp_path / "fp32", spec, **common)["npz"])[0]
    assert images.shape == (2, 16, 16, 3)

    z, _ = sample(
        model,
        create_diffusion(),
        image_generators(0, range(2), "cpu"),
        (4, 8, 8),
        spec,
        labels=torch.tensor([3, 999]),
    )
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    with torch.no_grad():
        expected = to_uint8_rgb(vae.decode(z / 0.5).sample.clamp(-1, 1)).numpy()
    assert np.abs(images.astype(int) - expected).max() <= 1

    bf16 = read_npz(generate(loaded, tmp_path / "bf16", replace(spec, precision="bf16"), **common)["npz"])[0]
    assert 0 < np.abs(bf16.astype(int) - images).mean() < 2  # autocast changes the numbers, barely


def test_export_writes_safetensors_and_diffusers(tiny_ckpt, tmp_path, capsys):
    from omegaconf import OmegaConf

    from ditlab.interop.export import export

    path, _, ema = tiny_ckpt
    options = OmegaConf.load(Path(__file__).parents[1] / "conf" / "export.yaml")
    del options["defaults"], options["hydra"]
    options.ckpt = str(path)
    export(
        OmegaConf.merge(
            options, {"safetensors": str(tmp_path / "w.safetensors"), "diffusers": str(tmp_path / "d")}
        )
    )
    assert "DiT(depth=2, hidden=32)/2 (adaln_zero" in capsys.readouterr().out
    for exported in (tmp_path / "w.safetensors", tmp_path / "d"):
        assert (outputs(load_dit(exported).model) - outputs(ema)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="nothing to write"):
        export(options)
