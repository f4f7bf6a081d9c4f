"""Atomic file writes (a crash never leaves a half-written file under its final name), and the
PNG text tags and file names of what featureshift writes."""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import FeatureshiftError

# What a full disk, a quota, a read-only or foreign folder raise: the user's to fix, not a bug.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


class WriteError(FeatureshiftError, OSError):
    """A file could not be written (full disk, read-only folder, ...): one paragraph naming the
    file, what was saved before it and how to continue. Both a FeatureshiftError and an OSError
    (with the errno and the final file name)."""

    def __init__(self, message: str, code: int | None, path: str | os.PathLike | None):
        super().__init__(code, message, None if path is None else os.fspath(path))
        self.message = message

    def __str__(self) -> str:
        return self.message


def is_write_error(e: BaseException) -> bool:
    """Whether E is an OSError a user fixes by freeing space or choosing a writable folder."""
    return isinstance(e, OSError) and not isinstance(e, WriteError) and e.errno in WRITE_ERRNOS


def write_error(e: OSError, saved: str, then: str = "run the same command again") -> WriteError:
    """The WriteError for E: names the file, says what was SAVED, and what to do after freeing space (THEN)."""
    where = f" {e.filename}" if e.filename else ""
    return WriteError(f"Could not write{where}: {e.strerror or e}. {saved.rstrip('.')}. Files are written under "
                      "a temporary name and renamed when complete, so nothing half-written is left under a final "
                      f"name. Free some space or make the folder writable (or choose another output), then {then}.",
                      e.errno, e.filename)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it over `path` on success.

    An OSError about the temporary file (a full disk, a read-only folder) is raised naming
    `path`, the file the user asked for, and the temporary file is removed. So is a failure of
    the block without an errno (torch.save's RuntimeError, safetensors' error) where the file
    system has no room for SIZE bytes (about what the block writes; default PROBE_BYTES), see
    `refused_write`: OSError(ENOSPC), or the errno the file system gives.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            yield tmp
        except Exception as e:
            # Writers in C++ or Rust (torch.save, safetensors) report a full disk as their own
            # exception type with the errno lost; ask the file system itself.
            if isinstance(e, FeatureshiftError) or (isinstance(e, OSError) and e.errno is not None):
                raise
            with contextlib.suppress(OSError):
                os.truncate(tmp, 0)  # the room to find is that for the whole file
            code = refused_write(tmp.parent, PROBE_BYTES if size is None else size)
            if code is None:
                raise
            raise OSError(code, os.strerror(code), os.fspath(tmp)) from e
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a written file gets the usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        # Only an error about the temporary file (or about no file) is about PATH; the
        # caller's block may have failed on another file.
        named = None if e.filename is None else os.fspath(e.filename)
        if e.errno not in WRITE_ERRNOS or isinstance(e, FeatureshiftError) or named not in (None, os.fspath(tmp)):
            raise
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                # Emptied first: a failed writer's traceback may keep the file open, and an open file
                # keeps its space after unlink, so the run.json that records the failure would not fit.
                os.truncate(tmp, 0)
                tmp.unlink()


# What refused_write asks room for when the size of the failed write is not known: a write that
# failed for want of space leaves a few blocks at most, far less than this.
PROBE_BYTES = 1 << 20


def refused_write(folder: str | os.PathLike, size: int = PROBE_BYTES) -> int | None:
    """The errno (ENOSPC, EDQUOT, ...) with which the file system refuses a new file of SIZE bytes in
    FOLDER (reserved, not written, and removed again), or None when it has room: whether a write of
    SIZE bytes into FOLDER that failed without an errno failed for want of space, blocks or inodes."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".featureshift-probe.", suffix=".tmp", dir=folder)
    except OSError as e:
        return e.errno if e.errno in WRITE_ERRNOS else None
    try:
        try:
            os.posix_fallocate(fd, 0, max(1, size))  # a quota or a full disk refuses the reservation
            return None
        except (AttributeError, OSError) as e:  # AttributeError: macOS has no posix_fallocate
            if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
                return e.errno
            if isinstance(e, OSError) and e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                return None
        st = os.statvfs(folder)  # a file system that reserves nothing: count its free blocks
        return errno.ENOSPC if st.f_bavail * st.f_frsize < size else None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


@functools.cache
def current_umask() -> int:
    # Read once: os.umask can only be read by setting it, and that is not thread-safe.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_image(path: str | os.PathLike, image, **kwargs) -> None:
    """Save a PIL image atomically; the format comes from the final name's suffix."""
    path = Path(path)
    fmt = {".png": "PNG", ".gif": "GIF", ".webp": "WEBP", ".jpg": "JPEG", ".jpeg": "JPEG"}[path.suffix.lower()]
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **kwargs)


# PNG text chunk on every grid featureshift writes as a stack of other images, so that
# `merge` never takes its own (or the timeline's) earlier output as an input.
OUTPUT_TEXT_KEY = "featureshift-output"
# What a derived image was drawn from: an unchanged file is not rewritten.
SIGNATURE_KEY = "featureshift-signature"


def natural_key(path: str | os.PathLike) -> tuple:
    """Sort key for 'epoch2.png' before 'epoch10.png': digit runs compare as numbers."""
    name = Path(path).name
    parts = re.split(r"(\d+)", name.lower())
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p != "") + (str(path),)


def safe_name(name: str) -> str:
    """NAME (a layer name) as a file name: runs of anything but letters, digits, '.', '_', '-' become '_'."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def png_text(key: str, value: dict[str, Any] | str):
    """A PngInfo holding one text chunk KEY; a dict is stored as JSON."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text(key, value if isinstance(value, str) else json.dumps(value, default=str))
    return info


def save_merged(path: str | os.PathLike, image, signature: str | None = None, **about) -> None:
    """Write a stacked image tagged as featureshift output, which `merge` never takes as input."""
    info = png_text(OUTPUT_TEXT_KEY, about)
    if signature:
        info.add_text(SIGNATURE_KEY, signature)
    save_image(path, image, pnginfo=info)


def is_featureshift_output(image) -> bool:
    """Whether an opened image is a stack featureshift wrote (its tag is a text chunk before the pixels)."""
    return OUTPUT_TEXT_KEY in image.info
