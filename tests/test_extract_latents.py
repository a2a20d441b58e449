import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from ditlab.autoencoders import SDVAE, IdentityAutoencoder
from ditlab.data import FashionMNISTDataModule, LatentDataModule, extract_latents, read_manifest
from ditlab.data.extract import _chunk_generator
from ditlab.data.fashion_mnist import FILES

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN = 50  # 7 chunks of 8, the last one partial
SETTINGS = {"chunk_size": 8, "batch_size": 3, "wait_timeout_s": 60}


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory) -> Path:
    """A Fashion-MNIST look-alike: random 28×28 images, labels 0..9 cycling, idx files."""
    import gzip
    import struct

    folder = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("val", 12)):
        arrays = (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8))
        for name, array in zip(FILES[split], arrays, strict=True):
            header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
            (folder / f"{name}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fashion_root, tiny_vae_dir) -> tuple[Path, int]:
    """One uninterrupted single-rank extraction, and the number of encoder calls it made."""
    path = tmp_path_factory.mktemp("reference") / "latents"
    vae = SDVAE(pretrained=str(tiny_vae_dir))
    calls = count_calls(vae)
    manifest = extract_latents(datamodule(fashion_root), vae, path, **SETTINGS)
    assert manifest["complete"]
    return path, calls["n"]


def datamodule(root: Path) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(root=str(root))


def count_calls(vae: SDVAE, fail_at: int | None = None) -> dict[str, int]:
    """Count the calls of vae.encode; with `fail_at`, raise at that call (a simulated crash)."""
    calls = {"n": 0}
    encode = vae.encode

    def counting_encode(x, generator=None):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return encode(x, generator)

    vae.encode = counting_encode
    return calls


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.load(path / "latents.npy"), np.load(path / "labels.npy")


def test_identity_extraction_stores_the_images_and_their_mirrors(tmp_path, fashion_root):
    manifest = extract_latents(
        datamodule(fashion_root), IdentityAutoencoder(), tmp_path / "pixels", dtype="float32", **SETTINGS
    )
    assert manifest["complete"] and manifest["done_chunks"] == manifest["num_chunks"] == 7
    latents, labels = load(tmp_path / "pixels")
    x, y = datamodule(fashion_root).build_dataset("train", random_flip=False).__getitems__(range(N_TRAIN))
    assert latents.shape == (N_TRAIN, 2, 1, 32, 32) and latents.dtype == np.float32
    assert np.array_equal(latents[:, 0], x.numpy()) and np.array_equal(latents[:, 1], x.flip(-1).numpy())
    assert labels.dtype == np.int64 and np.array_equal(labels, y.numpy())

    extract_latents(
        datamodule(fashion_root),
        IdentityAutoencoder(),
        tmp_path / "val",
        split="val",
        dtype="float32",
        **SETTINGS,
    )
    dm = LatentDataModule(path=str(tmp_path / "pixels"), val_path=str(tmp_path / "val"), batch_size=12)
    assert dm.model_input_shape(IdentityAutoencoder()) == (1, 32)
    z, y = dm.build_dataset("val", random_flip=False).__getitems__(list(range(12)))  # val split, unflipped
    x, expected_y = datamodule(fashion_root).build_dataset("val", random_flip=False).__getitems__(range(12))
    assert torch.equal(z, x) and torch.equal(y, expected_y)


def test_vae_extraction_and_read_back(reference, fashion_root, tiny_vae_dir):
    path, _ = reference
    latents, labels = load(path)
    manifest = read_manifest(path)
    assert latents.shape == (N_TRAIN, 2, 4, 16, 16) and latents.dtype == np.float16
    assert manifest["latents"]["shape"] == list(latents.shape) and manifest["scale_factor"] == 0.18215
    assert manifest["autoencoder"]["pretrained"] == str(tiny_vae_dir.resolve())
    assert manifest["data"]["source"] == str(fashion_root) and manifest["data"]["split"] == "train"

    # Chunk 1 (rows 8..15) by hand: its own seeded generator, micro-batches of 3, original then mirror.
    vae = SDVAE(pretrained=str(tiny_vae_dir))
    x, y = datamodule(fashion_root).build_dataset("train", random_flip=False).__getitems__(range(8, 16))
    generator = _chunk_generator(0, 1)
    original = torch.cat([vae.encode(part, generator) for part in x.split(3)])
    mirrored = torch.cat([vae.encode(part, generator) for part in x.flip(-1).split(3)])
    torch.testing.assert_close(torch.from_numpy(latents[8:16, 0]).float(), original, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(torch.from_numpy(latents[8:16, 1]).float(), mirrored, atol=2e-3, rtol=1e-3)
    assert np.array_equal(labels[8:16], y.numpy())

    # The datamodule serves them back: the original or the mirrored latent of each example.
    dm = LatentDataModule(path=str(path), batch_size=10)
    assert (dm.num_classes, dm.channels, dm.image_size, dm.latent_shape) == (10, 1, 32, (4, 16))
    assert dm.is_latent and dm.model_input_shape(vae) == (4, 16)
    with pytest.raises(ValueError, match="configure the autoencoder the latents were extracted with"):
        dm.model_input_shape(IdentityAutoencoder())
    dm.setup()
    torch.manual_seed(0)
    z, y = dm.train_set.__getitems__(list(range(N_TRAIN)))
    assert (
        z.dtype == torch.float32
        and z.shape == (N_TRAIN, 4, 16, 16)
        and torch.equal(y, torch.from_numpy(labels))
    )
    assert torch.equal(z, torch.from_numpy(latents[:, 0]).float())  # indices < N: view 0
    z1, _ = dm.train_set.__getitems__([i + N_TRAIN for i in range(N_TRAIN)])  # i + N: the mirror's latent
    assert torch.equal(z1, torch.from_numpy(latents[:, 1]).float())
    z, _ = next(iter(dm.train_dataloader()))
    assert z.shape == (10, 4, 16, 16) and len(dm.train_dataloader()) == N_TRAIN // 10
    copy = pickle.loads(pickle.dumps(dm.train_set))  # as sent to a worker: no arrays inside, mapped again
    assert copy._arrays is None and torch.equal(copy[3][1], torch.tensor(labels[3]))

    no_flip = LatentDataModule(path=str(path), random_flip=False).build_dataset("train", random_flip=False)
    z, _ = no_flip.__getitems__(list(range(N_TRAIN)))
    assert torch.equal(z, torch.from_numpy(latents[:, 0]).float())


def test_resume_after_an_interruption_gives_the_same_array(tmp_path, reference, fashion_root, tiny_vae_dir):
    reference_path, reference_calls = reference
    path = tmp_path / "latents"
    vae = SDVAE(pretrained=str(tiny_vae_dir))
    calls = count_calls(vae, fail_at=10)  # chunk 0 takes 6 calls (3 micro-batches × 2 views): dies in chunk 1
    with pytest.raises(KeyboardInterrupt):
        extract_latents(datamodule(fashion_root), vae, path, **SETTINGS)
    with pytest.raises(ValueError, match=r"unfinished \(1 of 7 chunks\)"):
        LatentDataModule(path=str(path)).setup()
    torn = np.load(path / "latents.npy", mmap_mode="r+")
    torn[8:] = np.nan  # rows of unfinished chunks hold whatever the crash left there
    torn.flush()
    del torn

    vae = SDVAE(pretrained=str(tiny_vae_dir))
    calls = count_calls(vae)
    manifest = extract_latents(datamodule(fashion_root), vae, path, **SETTINGS)
    assert manifest["complete"]
    assert calls["n"] == reference_calls - 6  # chunk 0 was not encoded again
    for resumed, expected in zip(load(path), load(reference_path), strict=True):
        assert np.array_equal(resumed, expected)
    assert json.loads((path / "manifest.json").read_text()) == read_manifest(reference_path)

    calls = count_calls(vae)
    assert extract_latents(datamodule(fashion_root), vae, path, **SETTINGS)["complete"]
    assert calls["n"] == 0  # finished: nothing to do


def test_two_ranks_write_the_same_file_as_one(tmp_path, reference, fashion_root, tiny_vae_dir):
    reference_path, _ = reference
    path = tmp_path / "latents"

    def run(rank: int) -> dict:
        vae = SDVAE(pretrained=str(tiny_vae_dir))
        return extract_latents(datamodule(fashion_root), vae, path, rank=rank, world_size=2, **SETTINGS)

    with ThreadPoolExecutor(2) as pool:
        second = pool.submit(run, 1)  # started first: it waits for rank 0 to create the folder
        first = pool.submit(run, 0)
        manifests = [first.result(), second.result()]
    assert any(m["complete"] for m in manifests)
    for two_ranks, one_rank in zip(load(path), load(reference_path), strict=True):
        assert np.array_equal(two_ranks, one_rank)
    assert read_manifest(path) == read_manifest(reference_path)


def test_conflicts_are_clear_errors(tmp_path, reference, fashion_root, tiny_vae_dir):
    reference_path, _ = reference
    vae = IdentityAutoencoder()
    with pytest.raises(ValueError, match=r"other settings .*autoencoder"):
        extract_latents(datamodule(fashion_root), vae, reference_path, **SETTINGS)
    (tmp_path / "notes.txt").write_text("not latents")
    with pytest.raises(FileExistsError, match="choose an empty or new folder"):
        extract_latents(datamodule(fashion_root), vae, tmp_path, **SETTINGS)
    with pytest.raises(TimeoutError, match="start rank 0"):
        extract_latents(
            datamodule(fashion_root),
            vae,
            tmp_path / "alone",
            rank=1,
            world_size=2,
            chunk_size=8,
            wait_timeout_s=0.1,
        )
    with pytest.raises(FileNotFoundError, match="extract latents first"):
        _ = LatentDataModule(path=str(tmp_path / "nothing")).num_classes


@pytest.mark.slow
def test_command_line(tmp_path, reference, fashion_root, tiny_vae_dir):
    reference_path, _ = reference
    path = tmp_path / "latents"
    args = [
        f"data.root={fashion_root}",
        f"autoencoder.pretrained={tiny_vae_dir}",
        f"path={path}",
        "chunk_size=8",
        "batch_size=3",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "src" / "extract_latents.py"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"data=latents data.path={path} autoencoder=sd_vae autoencoder.pretrained=" in result.stdout
    for cli, api in zip(load(path), load(reference_path), strict=True):
        assert np.array_equal(cli, api)
