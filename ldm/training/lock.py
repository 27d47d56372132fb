"""One run per output folder: an exclusive ``flock`` on ``OUTPUT_DIR/.lock`` for the life of the run. The
kernel drops the lock when its holder dies, so a lock left by a killed run is never stale; the file's text
(pid and host) only names the holder in the error."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunLockedError(OSError):
    """Another run holds the output folder."""


class RunLock:
    """``with RunLock(folder):`` holds the folder's lock, or raises ``RunLockedError`` at once naming the holder."""

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self._file: IO[str] | None = None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLockedError(f"output_dir {str(self.path.parent)!r} is in use by {holder} (lock file "
                                 f"{self.path}); wait for that run to end, or choose another --output-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
