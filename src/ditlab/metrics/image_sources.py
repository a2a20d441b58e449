"""Image sets for evaluation, read in batches of (B, C, H, W) uint8 tensors with bounded memory.

- `.npz` files in the ADM layout (`arr_0`: N×H×W×3 uint8, or N×H×W / N×H×W×1 grey), streamed out of the
  zip archive: 50k samples at 256×256 are 9.8 GB, more than `np.load` should hold at once.
- image folders (searched recursively; PNG, JPEG, ...), converted to RGB.
"""

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _to_tensor(images: np.ndarray) -> Tensor:
    """(B, H, W, C) uint8 numpy → (B, C, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)


def npz_image_shape(path: str | Path, key: str = "arr_0") -> tuple[int, int, int, int]:
    """(N, H, W, C) of the uint8 images stored under `key` in an `.npz`, read from the header only."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"Image file {path} does not exist.")
    with _open_zip(path) as archive, _open_npy(archive, key, path) as f:
        return _read_image_header(f, key, path)


def iter_npz_images(path: str | Path, batch_size: int, key: str = "arr_0") -> Iterator[Tensor]:
    """Batches (B, C, H, W) uint8 of the images under `key` in an `.npz`, in order, without loading all of them."""
    with _open_zip(path) as archive, _open_npy(archive, key, path) as f:
        n, h, w, c = _read_image_header(f, key, path)
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            data = bytearray(f.read(count * h * w * c))  # writable, as torch.from_numpy wants
            if len(data) != count * h * w * c:
                raise ValueError(
                    f"{path} is truncated: `{key}` ends before image {start + len(data) // (h * w * c)}."
                )
            yield _to_tensor(np.frombuffer(data, dtype=np.uint8).reshape(count, h, w, c))


def _open_zip(path: str | Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:  # an image, a truncated download, a .npy saved without np.savez
        raise ValueError(
            f"{path} is not an .npz archive ({err}): expected an ADM-format .npz with `arr_0` holding "
            "N×H×W×3 uint8 images (np.savez(path, images)), as src/sample.py writes"
        ) from None


def _open_npy(archive: zipfile.ZipFile, key: str, path: str | Path):
    if f"{key}.npy" not in archive.namelist():
        names = [name.removesuffix(".npy") for name in archive.namelist()]
        raise ValueError(f"{path} has no array `{key}` (it has {names}).")
    return archive.open(f"{key}.npy")


def _read_image_header(f, key: str, path: str | Path) -> tuple[int, int, int, int]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"`{key}` in {path} uses .npy format {version}; save it with numpy's np.savez.")
    if len(shape) == 3:
        shape = (*shape, 1)
    if dtype != np.uint8 or fortran_order or len(shape) != 4 or shape[3] not in (1, 3):
        raise ValueError(
            f"`{key}` in {path} must be uint8 images of shape N×H×W×3 (or N×H×W×1, N×H×W for grey) in C order, "
            f"got {dtype} {shape}{' in Fortran order' if fortran_order else ''}. Convert float samples in [-1, 1] "
            "with np.clip(127.5 * x + 128, 0, 255).astype(np.uint8)."
        )
    return shape


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder {folder} does not exist.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}.")
    return files


def iter_image_files(files: list[Path], batch_size: int) -> Iterator[Tensor]:
    """Batches (B, 3, H, W) uint8 of image files as RGB; a batch ends early where the image size changes."""
    batch: list[np.ndarray] = []
    for path in files:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        if batch and (len(batch) == batch_size or array.shape != batch[0].shape):
            yield _to_tensor(np.stack(batch))
            batch = []
        batch.append(array)
    if batch:
        yield _to_tensor(np.stack(batch))
