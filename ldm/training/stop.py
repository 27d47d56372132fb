"""Stopping a run on SIGTERM without losing work: the loop finishes the step it is in, saves a checkpoint
and raises ``TrainingStopped``; the same command resumes from that step. (SIGTERM is how ``kill``, Slurm
preemption and container shutdowns end a job.)"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class TrainingStopped(RuntimeError):
    """The run saved a checkpoint and stopped on a signal; its message says where and how to resume."""


class StopRequest:
    """A context that records a SIGTERM instead of dying on it (only in the main thread, where Python
    delivers signals); the previous handler comes back on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
