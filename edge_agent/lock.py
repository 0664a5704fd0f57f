"""One agent per data directory: an exclusive ``flock`` on ``<data_dir>/agent.lock``.

Two agents sharing a spool would hand out the same sequence numbers for different
samples. The lock is held for the life of the process (the kernel drops it when the
process dies, even on kill -9), and the file records the holder's pid for the message
the second agent prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["DataDirLock", "DataDirLocked"]

LOCK_NAME = "agent.lock"


class DataDirLocked(RuntimeError):
    """Another process holds the data directory."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"data directory {path.parent} is in use by {who} (lock file {path})")
        self.path = path
        self.pid = pid


class DataDirLock:
    """An exclusive lock on a directory, held until ``release``."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``DataDirLocked`` naming the holder; ``OSError`` otherwise."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DataDirLocked(self.path, pid) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race a starting agent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
