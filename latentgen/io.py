"""Crash-safe writes: every file or folder is written under a temporary name, then renamed into place.

A rename within one filesystem is atomic, so Ctrl-C or SIGKILL at any moment leaves either the old complete
file or the new complete file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it, which races with threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    The file gets the mode any program's new file gets (0666 less the umask: 0644 under umask 022), not
    mkstemp's private 0600, so web servers and other users can read images and models.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        if err.errno == errno.ENOSPC:  # name the file the user asked for, not our temporary
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it takes the place of `path` (replacing an old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would make it, not mkdtemp's 0700
    try:
        yield tmp
        mask = _umask()
        for f in tmp.rglob("*"):
            # what libraries wrote inside (transformers' save writes 0600 files) gets the modes mkdir/open give
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            # Two renames: a crash between them leaves the old folder under `.old` and the new one complete.
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically, readable as atomic_file's files are (safetensors' writer would leave
    its temporary file's private 0600 mode)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
    return path


def save_image(image, path: str | os.PathLike, **metadata) -> Path:
    """Save a PIL image atomically; the format follows the suffix; `metadata`: PIL's `pnginfo=` or `exif=`
    (`latentgen.formats.images.image_metadata` gives the right one for the suffix)."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    with atomic_file(path) as tmp:
        image.save(tmp, format=fmt, **metadata)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def model_hash(model: str | os.PathLike) -> str:
    """A1111's and Civitai's `Model hash`: the first 10 hex digits of the sha256 of a single checkpoint file; for a
    diffusers folder, the same length over its safetensors files (names and bytes, see `weights_hash`)."""
    model = Path(model)
    if model.is_file():
        return _hash_file(hashlib.sha256(), model).hexdigest()[:10]
    return weights_hash(model, length=10)


def same_hash(a: str, b: str) -> bool:
    """Two recorded hashes of one model agree (older images carry 12 digits, newer ones A1111's 10)."""
    n = min(len(a), len(b))
    return n > 0 and a[:n] == b[:n]


def weights_hash(folder: str | os.PathLike, length: int = 12) -> str:
    """A short sha256 over every safetensors file in a model folder (names and bytes), for image metadata."""
    digest = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(str(f.relative_to(folder)).encode())
        _hash_file(digest, f)
    return digest.hexdigest()[:length]


def _hash_file(digest, path: Path):
    """`digest` updated with the file's bytes, read in 1 MB blocks (checkpoints are gigabytes)."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest
