"""One `recon run` per output folder: an advisory lock on OUT/.recon.lock.

Two runs on the same folder would discard each other's `.partial` journals (feature_backends.store) and publish
a mix. `flock` is released by the kernel when its holder dies (kill -9 included), so a stale lock file never
blocks a rerun; the file holds the holder's PID for the message. Why fcntl and not a PID file: a PID file
outlives a killed process and PIDs are reused.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from feature_backends.errors import InputError

logger = logging.getLogger(__name__)

LOCK_NAME = ".recon.lock"


class OutputLock:
    """`with OutputLock(out_dir, wait)`: hold the folder's lock; refuse (or with `wait`, block) when held."""

    def __init__(self, out_dir: str | Path, wait: bool = False):
        self.path = Path(out_dir) / LOCK_NAME
        self.wait = wait
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = self._holder(fd)
            if not self.wait:
                os.close(fd)
                raise InputError(f"'{self.path.parent}' is in use by another recon run (PID {holder}); wait for "
                                 "it to finish, pass --wait to queue behind it, or choose another output folder")
            logger.info("Waiting for the recon run with PID %s to release %s", holder, self.path.parent)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return text or "unknown"

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
