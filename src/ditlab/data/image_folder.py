"""Images in the ImageNet layout (root/<class_name>/<image>.jpg) with the ADM centre crop of the paper."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ditlab.data.base import ImageDataModule


def adm_center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """The ADM centre crop: halve with a box filter while the short side is at least 2 × `image_size`,
    resize bicubically so the short side equals `image_size`, then crop the centre square."""
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


class ImageFolderTransform:
    """PIL image -> float32 (3, S, S) in [-1, 1] through the ADM centre crop."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = adm_center_crop(image.convert("RGB"), self.image_size)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class MirroredImages(Dataset):
    """Index i + N of `dataset` (N = its length) is the left-right mirror of its example i when
    `random_flip` (`num_views` = 2; `GlobalBatchSampler` draws which view a batch gets)."""

    def __init__(self, dataset: Dataset, random_flip: bool):
        self.dataset = dataset
        self.random_flip = random_flip
        self.num_views = 2 if random_flip else 1

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.dataset)
        if index >= n * self.num_views:
            raise IndexError(f"index {index} out of range: {n} images × {self.num_views} views")
        x, y = self.dataset[index % n]
        return (x.flip(-1) if index >= n else x), y


class ReadableImages(Dataset):
    """A torchvision `ImageFolder` whose unreadable files (corrupt, truncated, not an image) raise a
    ValueError naming the file, or, with `skip_corrupt`, are replaced by the next readable image (so
    that batches keep their size and every rank sees the same data) and reported, one line each, with
    the count so far in this process."""

    def __init__(self, folder: Dataset, skip_corrupt: bool = False):
        self.folder = folder
        self.skip_corrupt = skip_corrupt
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(len(self.folder)):
            i = (index + attempt) % len(self.folder)
            try:
                return self.folder[i]
            except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for bad files
                path = self.folder.samples[i][0]
                if not self.skip_corrupt:
                    raise ValueError(
                        f"cannot read image {path} ({err}); remove or replace it, or set "
                        "data.skip_corrupt_images=true to skip unreadable images"
                    ) from None
                if path not in self.skipped:
                    self.skipped.add(path)
                    print(
                        f"[ditlab] skipped unreadable image {path} ({len(self.skipped)} so far)", flush=True
                    )
        raise ValueError(f"no image of {len(self.folder)} in the folder can be read")


def _check_folder(root: Path) -> None:
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; expected the ImageNet layout {root}/<class_name>/<image>.jpg"
        )


class ImageFolderDataModule(ImageDataModule):
    """Class-conditional images from `root/<class_name>/*.jpg` (classes sorted by name), any resolution.

    Validation comes from `val_root` in the same layout and with the same classes, or is absent. An
    unreadable image stops the run with its file named, or is skipped with `skip_corrupt_images`.
    Batches: x float32 (B, 3, image_size, image_size) in [-1, 1], y int64 (B,).
    """

    def __init__(
        self,
        *,
        root: str,
        val_root: str | None = None,
        image_size: int = 256,
        random_flip: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        limit_train_samples: int | None = None,
        skip_corrupt_images: bool = False,
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            random_flip=random_flip,
            limit_train_samples=limit_train_samples,
        )
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = Path(root)
        self.val_root = None if val_root is None else Path(val_root)
        self._image_size = image_size
        self._class_names: list[str] | None = None
        self.skip_corrupt_images = skip_corrupt_images

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            _check_folder(self.root)
            names = sorted(entry.name for entry in self.root.iterdir() if entry.is_dir())
            if not names:
                raise FileNotFoundError(
                    f"{self.root} has no class folders; expected the ImageNet layout "
                    f"{self.root}/<class_name>/<image>.jpg"
                )
            self._class_names = names
        return self._class_names

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def channels(self) -> int:
        return 3

    @property
    def source(self) -> str:
        return str(self.root.resolve())

    def build_dataset(self, split: str, random_flip: bool) -> Dataset | None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        root = self.root if split == "train" else self.val_root
        if root is None:
            return None
        _check_folder(root)
        # torchvision is slow to import and only needed here.
        from torchvision.datasets.folder import IMG_EXTENSIONS, ImageFolder

        transform = ImageFolderTransform(self.image_size)
        try:
            dataset = ImageFolder(str(root), transform=transform, allow_empty=False)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err} Expected the ImageNet layout {root}/<class_name>/<image>.jpg with extensions "
                f"{', '.join(IMG_EXTENSIONS)}."
            ) from err
        if dataset.classes != self.class_names:
            raise ValueError(
                f"the class folders of {root} ({len(dataset.classes)}) differ from those of {self.root} "
                f"({self.num_classes}); both splits must have the same classes"
            )
        return MirroredImages(ReadableImages(dataset, self.skip_corrupt_images), random_flip)
