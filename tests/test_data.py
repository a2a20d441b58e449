import gzip
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

from ditlab.autoencoders import IdentityAutoencoder
from ditlab.data import (
    FashionMNISTDataModule,
    ImageFolderDataModule,
    InMemoryImageDataset,
    adm_center_crop,
    fashion_mnist,
    read_idx,
)
from ditlab.data.fashion_mnist import DEBIAN_DIR, FILES
from ditlab.data.resumable import GlobalBatchSampler

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
HAS_DEBIAN_FASHION_MNIST = all(
    (DEBIAN_DIR / f"{name}.gz").is_file() for pair in FILES.values() for name in pair
)


def write_idx(file: Path, array: np.ndarray) -> None:
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    file.write_bytes(gzip.compress(data) if file.suffix == ".gz" else data)


def write_fake_fashion_mnist(folder: Path, n_train: int = 20, n_val: int = 10, gz: bool = True) -> dict:
    """Idx files of random 28×28 images with labels 0..9 cycling; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for name, array in zip(FILES[split], (images, labels), strict=True):
            write_idx(folder / (f"{name}.gz" if gz else name), array)
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "not_installed")


# ---------------------------------------------------------------- Fashion-MNIST


def test_read_idx(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.gz", "a"):
        write_idx(tmp_path / name, images)
        assert np.array_equal(read_idx(tmp_path / name), images)
    (tmp_path / "bad").write_bytes(b"\0\0\x0d\x01" + bytes(8))  # type 0x0d is float32
    with pytest.raises(ValueError, match="not an idx file of uint8"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a").read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short")


@pytest.mark.skipif(not HAS_DEBIAN_FASHION_MNIST, reason=f"Fashion-MNIST is not installed in {DEBIAN_DIR}")
def test_fashion_mnist_from_debian():
    dm = FashionMNISTDataModule(batch_size=64, random_flip=False)
    assert (dm.num_classes, dm.image_size, dm.channels) == (10, 32, 1)
    assert dm.class_names[0] == "T-shirt/top" and dm.class_names[9] == "Ankle boot"
    assert dm.model_input_shape(IdentityAutoencoder()) == (1, 32)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (60000, 10000)
    assert torch.equal(dm.train_set.labels.bincount(), torch.full((10,), 6000))
    assert torch.equal(dm.val_set.labels.bincount(), torch.full((10,), 1000))
    # Each image is the raw one, padded by 2 on every side with black, scaled to [-1, 1].
    raw = torch.tensor(read_idx(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")[:5]).float() / 127.5 - 1
    x, y = dm.val_set.__getitems__(range(5))
    assert torch.equal(x[:, 0, 2:30, 2:30], raw)
    assert torch.equal(y, torch.tensor(read_idx(DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz")[:5]).long())

    loader = dm.train_dataloader()
    assert len(loader) == 60000 // 64  # drop_last
    x, y = next(iter(loader))
    assert x.shape == (64, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 9
    assert x.min() >= -1 and x.max() <= 1 and x.max() > 0.9 and x.min() == -1


@pytest.mark.skipif(not HAS_DEBIAN_FASHION_MNIST, reason=f"Fashion-MNIST is not installed in {DEBIAN_DIR}")
def test_fashion_mnist_epoch_is_not_data_bound():
    dm = FashionMNISTDataModule(batch_size=256)
    dm.setup()
    # One thread: timings of tiny parallel ops are erratic when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        n = sum(len(x) for x, _ in dm.train_dataloader())
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    # ~0.3 s on one core (~200k images/s): far above what any training step consumes.
    assert n == 60000 // 256 * 256 and seconds < 3.0


def test_padding_is_symmetric_black(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    for image_size, pad in ((32, 2), (30, 1), (28, 0)):
        dm = FashionMNISTDataModule(root=str(tmp_path), image_size=image_size, random_flip=False)
        x, _ = dm.build_dataset("val", random_flip=False).__getitems__(range(10))
        assert x.shape == (10, 1, image_size, image_size)
        border = torch.ones_like(x, dtype=torch.bool)
        border[..., pad : image_size - pad, pad : image_size - pad] = False
        assert torch.all(x[border] == -1)
    with pytest.raises(ValueError, match="even padding"):
        FashionMNISTDataModule(image_size=31)


def test_flips_flip():
    images = torch.randint(0, 256, (400, 1, 4, 4), dtype=torch.uint8)
    expected = images.float() / 127.5 - 1
    # Index i + N is the mirror of example i; GlobalBatchSampler draws the views.
    x, y = InMemoryImageDataset(images, torch.zeros(400), random_flip=True).__getitems__(
        [*range(400), 3, 403]
    )
    assert torch.equal(x[:400], expected) and torch.equal(x[400], expected[3])
    assert torch.equal(x[401], expected[3].flip(-1)) and not torch.equal(x[401], expected[3])
    assert y.dtype == torch.int64
    sampler = GlobalBatchSampler(400, 400, rank=0, world_size=1, seed=0, num_views=2)
    indices = next(iter(sampler))
    assert sorted(i % 400 for i in indices) == list(range(400))
    assert 150 < sum(i >= 400 for i in indices) < 250  # each view with probability 1/2
    x, _ = InMemoryImageDataset(images, torch.zeros(400), random_flip=False).__getitems__(range(400))
    assert torch.equal(x, expected)


def test_limit_train_samples_is_a_fixed_subset(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    subsets = []
    for _ in range(2):
        dm = FashionMNISTDataModule(root=str(tmp_path), limit_train_samples=7, batch_size=7)
        dm.setup()
        assert len(dm.train_set) == 7 and len(dm.val_set) == 10
        subsets.append(dm.train_set.indices)
    assert subsets[0] == subsets[1] and subsets[0] != list(range(7))


def test_train_loader_splits_global_batches_across_ranks(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    batches = {}
    for world_size in (1, 2):
        for rank in range(world_size):
            dm = FashionMNISTDataModule(root=str(tmp_path), random_flip=False, batch_size=8 // world_size)
            dm.global_batch_size, dm.seed = 8, 3
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
            loader = dm.train_dataloader()
            assert len(loader) == 20 // 8  # the last partial global batch is dropped
            batches[world_size, rank] = [x for x, _ in loader]
    for one, *shards in zip(batches[1, 0], batches[2, 0], batches[2, 1], strict=True):
        assert torch.equal(one, torch.cat(shards))  # the same examples per step on any number of ranks


def test_missing_fashion_mnist_is_a_clear_error(tmp_path, no_debian):
    for dm in (
        FashionMNISTDataModule(data_dir=str(tmp_path), download=False),
        FashionMNISTDataModule(root=str(tmp_path / "empty")),
    ):
        dm.prepare_data()  # nothing to download: no download allowed, or an explicit root
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            dm.setup()


def test_download_goes_to_data_dir(tmp_path, no_debian, monkeypatch):
    import torchvision

    def no_network(root, train, download):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)
    with pytest.raises(FileNotFoundError, match=r"Downloading Fashion-MNIST .* failed .*Name or service"):
        FashionMNISTDataModule(data_dir=str(tmp_path)).prepare_data()

    def fake_download(root, train, download):  # torchvision keeps the .gz and writes the uncompressed files
        write_fake_fashion_mnist(Path(root) / "FashionMNIST" / "raw", gz=False)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup()
    assert dm.source == str(tmp_path / "FashionMNIST" / "raw") and len(dm.train_set) == 20


# ---------------------------------------------------------------- ADM centre crop and image folders


def test_adm_center_crop_hand_computed(monkeypatch):
    # 600×400 to 64: box-halve while the short side >= 128 (400 -> 200 -> 100), bicubic to short side 64
    # (150×100 -> 96×64), crop the centre 64 columns (16..80).
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8))
    calls = []
    resize = Image.Image.resize

    def spy(self, size, resample=None, *args, **kwargs):
        calls.append((self.size, size, resample))
        return resize(self, size, resample, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    out = adm_center_crop(image, 64)
    assert calls == [
        ((600, 400), (300, 200), Image.BOX),
        ((300, 200), (150, 100), Image.BOX),
        ((150, 100), (96, 64), Image.BICUBIC),
    ]
    monkeypatch.undo()
    by_hand = image.resize((300, 200), Image.BOX).resize((150, 100), Image.BOX)
    by_hand = by_hand.resize((96, 64), Image.BICUBIC).crop((16, 0, 80, 64))
    assert out.size == (64, 64) and np.array_equal(np.asarray(out), np.asarray(by_hand))


def test_adm_center_crop_keeps_the_centre():
    # Red and blue bands at the left and right edges (outside the centre square), green in between.
    array = np.zeros((400, 600, 3), dtype=np.uint8)
    array[:, :75, 0] = 255
    array[:, 75:525, 1] = 255
    array[:, 525:, 2] = 255
    out = np.asarray(adm_center_crop(Image.fromarray(array), 64)).astype(int)
    assert np.all(np.abs(out - [0, 255, 0]) <= 2)
    # Portrait: the crop is vertical. Small images are upsampled: 40×50 -> 64×80, rows 8..72.
    assert adm_center_crop(Image.new("RGB", (100, 300)), 64).size == (64, 64)
    small = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 40, 3), dtype=np.uint8))
    expected = small.resize((64, 80), Image.BICUBIC).crop((0, 8, 64, 72))
    assert np.array_equal(np.asarray(adm_center_crop(small, 64)), np.asarray(expected))


def make_image_folder(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
            array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(array).save(root / name / f"{i}.png")


def test_image_folder_datamodule(tmp_path):
    make_image_folder(tmp_path / "train", {"zebra": 3, "ant": 2})
    dm = ImageFolderDataModule(
        root=str(tmp_path / "train"), image_size=16, batch_size=5, random_flip=False, num_workers=0
    )
    assert dm.class_names == ["ant", "zebra"] and dm.num_classes == 2 and dm.channels == 3
    assert dm.build_dataset("val", random_flip=False) is None  # no val_root: no validation set
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert sorted(y.tolist()) == [0, 0, 1, 1, 1]
    image, label = dm.train_set[2]  # sorted: ant/0, ant/1, zebra/0, ...
    expected = np.asarray(adm_center_crop(Image.open(tmp_path / "train" / "zebra" / "0.png"), 16))
    expected = torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert label == 1 and torch.equal(image, expected)
    flippable = dm.build_dataset("train", random_flip=True)
    mirrored, _ = flippable[2 + len(flippable)]  # view 1: the mirror image
    assert torch.equal(mirrored, expected.flip(-1))


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*<class_name>"):
        ImageFolderDataModule(root=str(tmp_path / "missing")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        _ = ImageFolderDataModule(root=str(tmp_path / "empty")).num_classes
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="ImageNet layout"):
        ImageFolderDataModule(root=str(tmp_path / "no_images")).setup()
    make_image_folder(tmp_path / "train", {"a": 1, "b": 1})
    make_image_folder(tmp_path / "val", {"a": 1, "c": 1})
    with pytest.raises(ValueError, match="same classes"):
        ImageFolderDataModule(root=str(tmp_path / "train"), val_root=str(tmp_path / "val")).setup()


# ---------------------------------------------------------------- configs


def test_data_configs_instantiate(tmp_path):
    # data_dir comes from conf/paths when composed; given here, as the YAML is loaded alone
    dm = instantiate(OmegaConf.load(CONF / "fashion_mnist.yaml"), root=str(tmp_path), data_dir=str(tmp_path))
    assert isinstance(dm, FashionMNISTDataModule) and dm.image_size == 32 and dm.random_flip
    dm = instantiate(OmegaConf.load(CONF / "image_folder.yaml"), root=str(tmp_path))
    assert isinstance(dm, ImageFolderDataModule) and dm.image_size == 256
    with pytest.raises(MissingMandatoryValue):
        instantiate(OmegaConf.load(CONF / "image_folder.yaml"))
    with pytest.raises(MissingMandatoryValue):
        instantiate(OmegaConf.load(CONF / "latents.yaml"))
