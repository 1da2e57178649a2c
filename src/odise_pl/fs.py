"""Files a run writes: atomic writes, output checks made before the work, and the run folder's lock.

Why ours: every writer of the project (checkpoints, exports, demo outputs, the synthetic dataset)
needs the same three guarantees, and none of them is in the standard library as one call: a file
is either the old one or the complete new one; an output that cannot be written is reported before
minutes of work; two runs never write into one folder at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from odise_pl.errors import OutputError


def atomic_write(
    target: str | Path, write: Callable, on_error: Callable[[Path, BaseException], Exception] | None = None
) -> None:
    """``write(binary_file)`` into a temporary file next to ``target``, flushed, renamed over it.

    A failed write (disk full, quota, a crash) leaves ``target`` as it was; the temporary file of a
    process killed mid-write (``.NAME.*.partial``) is removed by :func:`remove_stale_partials`.
    ``on_error(target, cause)`` builds the error raised (default: :class:`OutputError`).
    """
    target = Path(target)
    fail = on_error or (lambda t, e: OutputError(f"could not write {t} ({e})"))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    except OSError as err:
        raise fail(target, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # torch's zip writer re-raises a failed write (ENOSPC) as a RuntimeError; either way the
        # cause is the write
        if isinstance(err, Exception):
            raise fail(target, err.__context__ if isinstance(err.__context__, OSError) else err) from err
        raise


def remove_stale_partials(folder: str | Path) -> list[Path]:
    """Delete the temporary files of writes that never finished in ``folder``. Only while no other
    process writes there (its run folder's lock held, :class:`RunLock`).
    """
    folder = Path(folder)
    removed = []
    for f in folder.glob(".*.partial") if folder.is_dir() else []:
        if f.is_file():
            with contextlib.suppress(OSError):
                f.unlink()
                removed.append(f)
    return removed


def check_writable_dir(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove it takes a small file now: an existing file, a device,
    a read-only folder or a full disk is an :class:`OutputError` naming the folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(
            f"output {folder} exists and is not a folder; give a folder path (it is created if missing)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise OutputError(
            f"cannot write into {folder} ({err.strerror or err}); choose a writable folder with free space"
        ) from err
    return folder


def check_writable_file(path: str | Path) -> Path:
    """Like :func:`check_writable_dir` for a file to be (re)written: not a folder or a device."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise OutputError(f"output {path} is not a regular file; give a file path")
    check_writable_dir(path.parent)
    return path


class RunLock:
    """An exclusive lock on a run folder (``.run.lock`` inside it), held while the process lives.

    A second run with the same output folder is refused with the holder's host and pid. The lock
    is the kernel's (``flock``), so a run killed without cleaning up never leaves a stale lock.
    """

    NAME = ".run.lock"

    def __init__(self, folder: str | Path):
        self.folder = check_writable_dir(folder)  # an unusable folder: one line, before anything
        self.path = self.folder / self.NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self.path.read_text(errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise OutputError(
                f"the run folder {self.folder} is in use by another run ({holder}): two runs would overwrite "
                "each other's checkpoints. Give this run its own paths.output_dir (or hydra.run.dir), or wait "
                "for the other one to end"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode())

    @classmethod
    def is_free(cls, folder: str | Path) -> bool:
        """Whether no live process holds ``folder``'s lock (the lock is not taken)."""
        path = Path(folder) / cls.NAME
        if not path.exists():
            return True
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
