"""The run directory of `tbptt train`: created whole, locked while a process trains in it, and
checkpointed so that a kill at any moment loses neither a checkpoint nor a metrics row.

    config.toml        the resolved configuration (tbptt train --config reads it back)
    vocab.json         the characters of a text task, in id order
    metrics.csv        updates, steps, characters, seconds, lr, training and validation loss, k2
    loss.png           training and validation loss against the characters (steps) seen
    checkpoint.json    which state file is the latest, its size and SHA-256 (checked before the
                       file is read), the loop's counters and the settings the run computes
                       with (config.toml is checked against them)
    state-N.npz|.pt    the engine's full state after N updates
    lock               held (flock) by the one process training in the directory; deleted when
                       it ends (a link there is refused, never written through)

A checkpoint writes metrics.csv (the rows up to update N), then state-N, then checkpoint.json
naming it, then deletes the older state files; each file is written whole or not at all
(tbptt.files). A kill between two of these leaves the previous checkpoint.json, which names a
state file still there, and metrics.csv with rows the resumed run drops and writes again: nothing
is lost. A kill during the first checkpoint leaves no checkpoint.json, and perhaps a state file
that nothing names: the run has no checkpoint and `--resume` starts it over. `--resume` checks
checkpoint.json's counters and the state file's checksum against what it loads, and deletes the
temporary files a killed process left.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from ..errors import InputError
from ..files import (
    TMP_PREFIX,
    atomic_directory,
    atomic_write,
    open_regular,
    read_regular,
    remove_stale,
)
from .engines import AdaptsK2, Engine

FORMAT = "tbptt-train-checkpoint"
COLUMNS = ("updates", "steps", "chars", "seconds", "lr", "train_loss", "valid_loss", "k2")


@dataclass
class Loop:
    """The training loop's counters, saved with every checkpoint."""

    updates: int = 0
    seconds: float = 0.0  # training time so far (evaluation and checkpoints not counted)
    k2: int | None = None  # the k2 in force (--adapt-k2 changes it)


# -- creating and locking --------------------------------------------------------------------------
def check_new(path: Path) -> None:
    """A new run may go to `path`: absent, or an empty folder, in a folder we can write."""
    if path.exists() and not path.is_dir():
        raise InputError(f"--run-dir {path} is a file; give a folder for the run")
    if path.is_dir() and any(path.iterdir()):
        raise InputError(
            f"--run-dir {path} already holds files; continue that run with --resume {path}, or "
            "choose another --run-dir"
        )
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InputError(f"--run-dir {path}: cannot create it ({parent} is a file)")
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--run-dir {path}: cannot create it ({parent} is not writable)")


def create(path: Path, files: Callable[[Path], dict[str, str]], unique: bool) -> Path:
    """Create the run directory holding files(its path), in one rename; with `unique` (a default
    name), the first of path, path-2, path-3, ... that is free."""
    for k in range(1, 1000 if unique else 2):
        target = path if k == 1 else path.with_name(f"{path.name}-{k}")
        if target.exists() and unique:
            continue
        check_new(target)
        try:
            atomic_directory(target, files(target))
            return target
        except OSError as exc:
            if not target.exists():  # a place where even root may not write (/proc, read-only)
                raise InputError(f"--run-dir {target}: cannot create it ({exc.strerror})") from None
            if not unique:  # another process took the name between the check and the rename
                raise InputError(f"--run-dir {target} was created by another process") from None
    raise InputError(f"--run-dir {path}: no free name found beside it")


class Lock:
    """An exclusive flock on RUN/lock for as long as this process trains there (the kernel
    drops it when the process ends, however it ends); `release` deletes the file, so a finished
    run leaves no lock behind.

    The file is opened without following a symbolic link (O_NOFOLLOW) and must be a regular file:
    a link planted at RUN/lock is refused, never written through. A lock is held only when the
    name still leads to the file locked (a process that released it may have deleted it between
    another's open and flock): otherwise the open and flock are tried again on the new file.
    """

    def __init__(self, run: Path) -> None:
        self.path = run / "lock"
        for _ in range(100):
            self.fd = self._open()
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = os.read(self.fd, 200).decode(errors="replace").strip()
                os.close(self.fd)
                raise InputError(
                    f"{run} is in use: {who or 'another process'} is training in it; wait for "
                    "it to end (or stop it) before --resume"
                ) from None
            if self._ours():
                break
            os.close(self.fd)  # deleted by the process that held it: lock the new file
        else:  # pragma: no cover  (100 processes releasing in turn)
            raise InputError(f"{run} is in use: its lock keeps changing hands")
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"process {os.getpid()}\n".encode())

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            if self.path.is_symlink():
                raise InputError(
                    f"{self.path} is a symbolic link (to {os.readlink(self.path)}); a run's lock "
                    "is never written through one: delete the link, then --resume again"
                ) from None
            raise InputError(f"{self.path}: cannot open it ({exc.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InputError(
                f"{self.path} is not a regular file (a FIFO, device or folder); delete it, then "
                "--resume again"
            )
        return fd

    def _ours(self) -> bool:
        """The name RUN/lock still leads to the file this process has locked."""
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(self.fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        """Delete RUN/lock (still held, so no other process can have it) and unlock."""
        if self.fd < 0:
            return
        if self._ours():
            self.path.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


def discard(run: Path) -> None:
    """Remove a run directory this process created and never checkpointed (a failed start)."""
    shutil.rmtree(run, ignore_errors=True)


def clean(run: Path) -> None:
    """Under the lock: delete the temporary files a killed writer left in the run directory."""
    remove_stale(run)
    # a half-created copy of this run directory: tempfile's 8 random characters after the name
    # (not ".tmp-RUN-2-xxxxxxxx", which another process may be creating right now)
    for entry in run.parent.glob(f"{TMP_PREFIX}{run.name}-{'?' * 8}"):
        shutil.rmtree(entry, ignore_errors=True)


# -- reading a run ---------------------------------------------------------------------------------
LIMIT = 16 << 20  # bytes at most of vocab.json, checkpoint.json, config.toml (a few KB each)


def read_json(path: Path) -> object:
    """A JSON file of the run (a regular file of at most LIMIT bytes)."""
    try:
        return json.loads(read_regular(path, LIMIT).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is corrupted (not JSON: {exc})") from None


def read_vocab(run: Path) -> str:
    """The characters of a text run, in id order."""
    path = run / "vocab.json"
    vocab = read_json(path)
    if not isinstance(vocab, list) or not vocab:
        raise InputError(f"{path} is corrupted (not a list of distinct characters)")
    ok = all(isinstance(c, str) and len(c) == 1 for c in vocab)
    if not ok or len(set(vocab)) != len(vocab):
        raise InputError(f"{path} is corrupted (not a list of distinct characters)")
    return "".join(vocab)


def read_metrics(run: Path, upto: int) -> list[dict]:
    """metrics.csv's rows of updates 1..upto (later rows came after the last checkpoint)."""
    path = run / "metrics.csv"
    if not os.path.lexists(path):
        return []
    try:
        with io.TextIOWrapper(open_regular(path), encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or not set(COLUMNS) <= set(reader.fieldnames):
                raise ValueError(f"its columns are {reader.fieldnames}, not {list(COLUMNS)}")
            rows = [{**r, "updates": int(r["updates"])} for r in reader]
    except (ValueError, TypeError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(
            f"{path} is corrupted ({exc}); repair it, or delete it to resume without the "
            "earlier metrics rows"
        ) from None
    return [r for r in rows if r["updates"] <= upto]


def leftovers(run: Path) -> str:
    """The state files of a run without checkpoint.json, as a clause: a first checkpoint killed
    after its state file was renamed into place and before checkpoint.json named it. Nothing
    names them, so no file says they are complete or of which update: the run starts over, and
    its first checkpoint deletes them."""
    names = sorted(p.name for p in run.glob("state-*"))
    return f" ({', '.join(names)}: left by an unfinished first checkpoint)" if names else ""


def _counter(value: object, name: str, path: Path, real: bool = False) -> float:
    kind = (int, float) if real else (int,)
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or not math.isfinite(value)
        or value < 0
    ):
        what = "a number >= 0" if real else "an integer >= 0"
        raise InputError(f"{path} is corrupted ({name} = {value!r}, expected {what})")
    return value


def recorded_settings(run: Path) -> object:
    """The settings the run's checkpoint.json recorded (None without one, or from an earlier
    tbptt); load_checkpoint checks the rest of the file."""
    path = run / "checkpoint.json"
    if not os.path.lexists(path):
        return None
    meta = read_json(path)
    return meta.get("settings") if isinstance(meta, dict) else None


def load_checkpoint(run: Path, engine: Engine, k1: int, adapt: bool) -> Loop:
    """Restore the engine from the run's latest checkpoint, every counter checked (the loop
    feeds k1 steps per update)."""
    path = run / "checkpoint.json"
    if not os.path.lexists(path):
        raise InputError(
            f"{run} has no checkpoint.json yet: its training has not saved a checkpoint"
        )
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{path} is not a tbptt train checkpoint")
    if meta.get("engine") != engine.suffix:
        raise InputError(f"{path} is from the {meta.get('engine')} engine, not {engine.suffix}")
    name = meta.get("state")
    if not isinstance(name, str) or Path(name).name != name or not name.startswith("state-"):
        raise InputError(f"{path} is corrupted (state = {name!r})")
    loop = Loop(
        updates=int(_counter(meta.get("updates"), "updates", path)),
        seconds=float(_counter(meta.get("seconds"), "seconds", path, real=True)),
        k2=meta.get("k2"),
    )
    state = run / name
    if not os.path.lexists(state):
        raise InputError(f"{path} names {name}, which is missing")
    if adapt and loop.k2 is not None:  # --adapt-k2: the k2 in force at the save
        cast(AdaptsK2, engine).set_k2(int(_counter(loop.k2, "k2", path)))  # numpy only
    check_intact(state, meta, path)
    try:  # InputError when damaged or from another schedule, model or loss
        engine.load(state, run / "config.toml")
    except InputError as exc:
        # the reader's message may name the file too: here it is named once
        said = str(exc).replace(f"checkpoint {state}", "it").replace(str(state), "it")
        said = said.removeprefix("it: ")
        raise InputError(f"checkpoint {state} is corrupted or not from this run: {said}") from None
    if engine.steps != loop.updates * k1:
        raise InputError(
            f"{path} says {loop.updates} updates of {k1} steps, but {name} holds "
            f"{engine.steps} steps: the two do not belong together"
        )
    return loop


def check_intact(state: Path, meta: dict, path: Path) -> None:
    """The state file as checkpoint.json (`path`, read as `meta`) recorded it: its size and its
    SHA-256, checked before anything reads the file, so that a damaged or replaced one is never
    unpickled (an earlier tbptt recorded no size: the SHA-256 alone is checked)."""
    size = meta.get("bytes")
    if size is not None:
        size = int(_counter(size, "bytes", path))
        with open_regular(state) as fh:
            have = os.fstat(fh.fileno()).st_size
        if have != size:
            raise InputError(
                f"checkpoint {state} is corrupted: it holds {have:,} bytes where {path} recorded "
                f"{size:,} (cut short or replaced); it was not loaded"
            )
    digest = meta.get("sha256")
    if digest is not None and _sha256(state) != digest:
        raise InputError(
            f"checkpoint {state} is corrupted: its SHA-256 is not the one {path} recorded (a "
            "damaged or replaced file); it was not loaded"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- writing a checkpoint --------------------------------------------------------------------------
def metrics_csv(rows: list[dict]) -> str:
    from io import StringIO

    buf = StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def save_checkpoint(
    run: Path, engine: Engine, loop: Loop, rows: list[dict], settings: dict | None = None
) -> None:
    """metrics.csv, state-N, checkpoint.json, then the older state files go (module docstring).
    checkpoint.json records `settings`, what the run computes with (config.recorded), against
    which `--resume` and `sample` check config.toml.

    Under torchrun every process calls it (the engine's save is collective); rank 0 writes.
    """
    if engine.rank != 0:
        engine.save(None)
        return
    atomic_write(run / "metrics.csv", metrics_csv(rows))
    name = f"state-{loop.updates:08d}.{engine.suffix}"
    engine.save(run / name)
    meta = {
        "format": FORMAT,
        "version": 2,
        "engine": engine.suffix,
        "state": name,
        "sha256": _sha256(run / name),
        "bytes": (run / name).stat().st_size,
        "updates": loop.updates,
        "seconds": loop.seconds,
        "k2": loop.k2,
        "settings": settings,
    }
    atomic_write(run / "checkpoint.json", json.dumps(meta, indent=1) + "\n")
    for old in run.glob("state-*"):
        if old.name != name:
            old.unlink()
