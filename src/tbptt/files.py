"""One way to write a file: whole or not at all.

Every file tbptt writes (checkpoints, metrics, plots, configurations, figures, CSV tables) goes
through `atomic_write`: the bytes go to a temporary file in the target's own folder, are flushed
to the disk (fsync), and the temporary file is renamed over the target, and the folder's entry is
flushed too. A reader, or a run killed at any moment, sees either the old file or the new one,
never a part. The file gets the mode `open()` would give a new file: 0o666 less the umask
(mkstemp's private 0o600 is not kept). A run directory is created the same way by
`atomic_directory`: its first files are written into a temporary folder that is renamed into place.

Temporary names start with TMP_PREFIX; `remove_stale` deletes those a killed process left behind.

A file tbptt reads back (a run's configuration, vocabulary, checkpoint) is opened by
`open_regular`, which refuses what is not a regular file (a FIFO would wait forever for a writer,
/dev/zero never ends), and read by `read_regular`, which refuses a file larger than the caller's
bound instead of reading it whole.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from .errors import InputError

TMP_PREFIX = ".tmp-"

Content = bytes | str | Callable[[BinaryIO], None]


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fill(fh: BinaryIO, content: Content) -> None:
    if callable(content):
        content(fh)
    else:
        fh.write(content.encode() if isinstance(content, str) else content)


def atomic_write(path: str | os.PathLike, content: Content) -> None:
    """Write `content` (bytes, str as UTF-8, or a function writing to a binary file) to `path`.

    The file appears whole or not at all (module docstring); on any error the temporary file is
    removed and the target is left as it was. A folder that does not exist is an InputError, and
    any other failure to create the file an OSError, naming the path given (never the temporary
    name).
    """
    given = os.fspath(path)
    path = os.path.abspath(given)
    folder, name = os.path.split(path)
    if not os.path.isdir(folder):
        raise InputError(
            f"path {given!r}: its folder {folder} does not exist (or is not a folder); create it "
            "first"
        )
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}{name}-")
    except OSError as exc:  # permissions, a full disk, a read-only file system
        raise OSError(exc.errno, f"cannot write {given!r}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            _fill(fh, content)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_directory(path: str | os.PathLike, files: Mapping[str, Content]) -> None:
    """Create the folder `path` holding `files` (name -> content) in one rename.

    `path` must not exist, or be an empty folder (which is replaced). Its parent is created.
    """
    path = Path(os.path.abspath(os.fspath(path)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}-"))
    try:
        for name, content in files.items():
            with open(tmp / name, "wb") as fh:
                _fill(fh, content)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp / name, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_dir(tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def remove_stale(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files and folders a killed writer left in `folder`; their names."""
    gone = []
    for entry in Path(folder).glob(f"{TMP_PREFIX}*"):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        gone.append(entry.name)
    return gone


def open_regular(path: str | os.PathLike, name: str | None = None) -> BinaryIO:
    """Open `path` for reading in binary, if it is a regular file (a link to one is followed);
    else an InputError naming it as `name` (default: the path). The open never blocks: a FIFO is
    opened with O_NONBLOCK, seen by fstat, and refused."""
    name = name or os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read it ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = (
            "a folder"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket"
        )
        raise InputError(f"{name} is not a regular file (it is {kind}); tbptt reads only files")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike, limit: int, name: str | None = None) -> bytes:
    """The bytes of the regular file `path` (open_regular), if it holds at most `limit`; else an
    InputError naming it as `name` (default: the path)."""
    name = name or os.fspath(path)
    with open_regular(path, name) as fh:
        data = fh.read(limit + 1)  # a file that grows while it is read is bounded too
    if len(data) > limit:
        raise InputError(
            f"{name} is larger than {limit // 2**20} MiB, far larger than such a file can be: "
            "not a file tbptt wrote"
        )
    return data
