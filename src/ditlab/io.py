"""Files: atomic writes, the cache folder, reading PyTorch files without running their code, and the
"ditlab" header that training checkpoints and exports carry.

The bottom layer of ditlab: it imports nothing of ditlab, and every module that writes a result, a
checkpoint or a cache entry, or reads a `.pt`/`.ckpt`, goes through it.
"""

import contextlib
import errno
import hashlib
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch


class CheckpointFileError(ValueError):
    """A file that cannot be read as a checkpoint: what it is instead, in one line."""


# Of the header `checkpoint_header` builds; a reader refuses a file of a newer version.
HEADER_VERSION = 1


def checkpoint_header(model_config: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The "ditlab" header of a training checkpoint or an export (plain data): its version, the model's
    `DiT.config` and `fields` (diffusion, autoencoder, data, coordinates, ...), so that the file alone
    rebuilds the model."""
    return {"version": HEADER_VERSION, "model_config": dict(model_config), **fields}


def cache_folder(sub: str = "") -> Path:
    """ditlab's cache folder: `$DITLAB_CACHE`, else `$XDG_CACHE_HOME/ditlab`, else `~/.cache/ditlab`;
    `sub` names a folder inside it (e.g. "fid_stats")."""
    root = os.environ.get("DITLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "ditlab"
    return Path(root).expanduser() / sub


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (an image, a zip, a memory map, a
    download) or makes a folder: renamed over `path` when the block ends, removed when it raises. Readers
    see the old file or the new one, never half of one; a failed write (a full disk, a kill) leaves the old
    file as it was, and its error names `path`, not the temporary name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)  # a killed writer's leftover: containers reuse process ids
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is None and is_disk_full(err):  # a failed write names no file
            err.filename = str(path)
        elif str(err.filename).startswith(str(tmp)):
            err.filename, err.filename2 = str(path) + str(err.filename)[len(str(tmp)) :], None
        raise
    except Exception as err:
        # Writers in Rust (safetensors) report a full disk as text ending "(os error N)", without a path.
        found = re.search(r"\(os error (\d+)\)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from err
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():  # the temporary path of a writer that makes a folder (a diffusers export)
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, fsync: bool = False) -> Path:
    """`write(f)` into a temporary file beside `path`, then renamed over it (see `atomic_path`). `fsync`
    flushes the data to the disk before the rename (checkpoints: they survive a power cut)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def content_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names, sizes and bytes, in name order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file != path:
            digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def load_torch_file(
    path: str | Path, map_location: Any = "cpu", *, allowed_globals: Iterable[Any] = ()
) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain data only, never a pickled object's code.

    A file that is not a PyTorch file, a truncated one and one whose pickle holds other objects each
    raise `CheckpointFileError` saying so (what torch itself raises for them is a KeyError, a zip-reader
    RuntimeError or an UnpicklingError from deep inside the loader).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # a zip archive (torch.save), or a legacy pickle
        kind = "empty" if not head else "a text file" if _looks_like_text(path) else "not a PyTorch file"
        raise CheckpointFileError(
            f"{path} is not a checkpoint: it is {kind} (a checkpoint is a torch.save zip archive or a "
            "safetensors file)"
        )
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointFileError(
            f"refused to load {path}: its pickle holds Python objects other than tensors and plain data, "
            f"which could run code when unpickled ({str(err).splitlines()[0]}). If you trust the file, "
            "load it yourself and torch.save a plain state dict"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointFileError(
            f"{path} is truncated or corrupt ({first}); use an earlier checkpoint or rerun the job that wrote it"
        ) from None


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        sample = f.read(512)
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
