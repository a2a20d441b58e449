"""Fashion-MNIST (60k train + 10k test, 28×28 grey, 10 classes), padded to 32×32 by default so that
its token counts at patch 2/4/8 (256/64/16) are those of the paper's 32×32 latents."""

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ditlab.data.base import ImageDataModule, InMemoryImageDataset, collate_batched

# Where Debian's `dataset-fashion-mnist` package installs the original idx .gz files.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file of uint8 (plain or .gz), e.g. images (N, 28, 28) or labels (N,)."""
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    # Header: two zero bytes, a type code (0x08 = uint8), the number of dims, then each dim as big-endian int32.
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(
            f"{path} is not an idx file of uint8; it may be corrupt: delete it and fetch it again"
        )
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(data) != offset + math.prod(dims):
        raise ValueError(
            f"{path} holds {len(data) - offset} bytes of data, its header says {dims}; it may be truncated: "
            "delete it and fetch it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _has_all_files(folder: Path) -> bool:
    return all(_find(folder, name) is not None for names in FILES.values() for name in names)


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST from its idx files, held in memory as uint8 and served in whole batches.

    Files are looked up in `root` when given (the folder itself or `root/FashionMNIST/raw`); otherwise
    in Debian's package folder, then in `data_dir/FashionMNIST/raw`, where `prepare_data` downloads them
    with torchvision when `download` is true. Images are padded symmetrically with black (-1) to
    `image_size`, scaled to [-1, 1] and, with `random_flip`, flipped left-right with probability 1/2.
    Batches: x float32 (B, 1, image_size, image_size), y int64 (B,).
    """

    collate_fn = staticmethod(collate_batched)

    def __init__(
        self,
        *,
        data_dir: str = "data",
        root: str | None = None,
        download: bool = True,
        image_size: int = 32,
        random_flip: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = True,
        limit_train_samples: int | None = None,
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            random_flip=random_flip,
            limit_train_samples=limit_train_samples,
        )
        if image_size < 28 or (image_size - 28) % 2:
            raise ValueError(
                f"image_size must be 28 plus an even padding (28, 30, 32, ...), got {image_size}"
            )
        self.data_dir = Path(data_dir)
        self.root = None if root is None else Path(root)
        self.download = download
        self._image_size = image_size

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES)

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def channels(self) -> int:
        return 1

    @property
    def source(self) -> str:
        return str(self.raw_dir())

    def _candidates(self) -> list[Path]:
        if self.root is not None:
            return [self.root, self.root / "FashionMNIST" / "raw"]
        return [DEBIAN_DIR, self.data_dir / "FashionMNIST" / "raw"]

    def raw_dir(self) -> Path:
        """The folder holding the four idx files."""
        for folder in self._candidates():
            if _has_all_files(folder):
                return folder
        names = [name for pair in FILES.values() for name in pair]
        raise FileNotFoundError(
            f"Fashion-MNIST not found: looked for {names} (.gz or not) in "
            f"{', '.join(str(c) for c in self._candidates())}. Get it with one of: "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs to "
            f"{DEBIAN_DIR}); `data.download=true` (torchvision downloads it into "
            f"{self.data_dir / 'FashionMNIST' / 'raw'}); or `data.root=/folder/with/the/idx/files`."
        )

    def prepare_data(self) -> None:
        """Download with torchvision if the files are nowhere (Lightning runs this on one process per node)."""
        if not self.download or self.root is not None or any(map(_has_all_files, self._candidates())):
            return
        import torchvision  # slow to import; only needed here

        try:
            torchvision.datasets.FashionMNIST(root=str(self.data_dir), train=True, download=True)
        except Exception as err:  # no network, a refused mirror, a full disk: all end in the same advice
            raise FileNotFoundError(
                f"Downloading Fashion-MNIST into {self.data_dir} failed ({err}). Install "
                "`dataset-fashion-mnist` (apt-get) or point `data.root=` at a folder with the idx files."
            ) from err

    def build_dataset(self, split: str, random_flip: bool) -> InMemoryImageDataset:
        if split not in FILES:
            raise ValueError(f"split must be one of {list(FILES)}, got {split!r}")
        folder = self.raw_dir()
        image_file, label_file = (_find(folder, name) for name in FILES[split])
        images = torch.tensor(read_idx(image_file)).unsqueeze(1)  # (N, 1, 28, 28) uint8
        labels = torch.tensor(read_idx(label_file)).long()
        if images.ndim != 4 or images.shape[2:] != (28, 28) or labels.ndim != 1:
            raise ValueError(f"{image_file} and {label_file} do not hold 28×28 images and their labels")
        if len(labels) != len(images) or labels.max() >= len(CLASS_NAMES):
            raise ValueError(f"{label_file} does not hold one label in [0, 10) per image of {image_file}")
        pad = (self.image_size - 28) // 2
        images = F.pad(images, (pad, pad, pad, pad))  # zeros, i.e. black, i.e. -1 after scaling
        return InMemoryImageDataset(images, labels, random_flip)
