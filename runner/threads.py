"""Daemon threads kept for the next job once they have done one.

A run's start needs a thread that outlives the call (its reaper): starting one cost 0.3 ms of
the way to the script's first line (Thread.start() waits for the new thread to run, on two busy
cores), while handing a job to a waiting thread is a queue put. Threads are added only when
none waits, so there are never more than jobs ever ran at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class ThreadPool:
    """Runs each job submitted on a waiting thread, or on a new one when none waits."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.threads = 0
        self._jobs: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads minus jobs not finished: how many threads wait, or are about to

    def submit(self, job: Callable[[], object]) -> None:
        """Run `job` on a thread of the pool."""
        with self._lock:
            start = self._idle == 0
            if start:
                self.threads += 1
            else:
                self._idle -= 1
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._serve, name=f"{self.name}-{self.threads}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except Exception:
                log.exception("%s: a job failed", self.name)
            with self._lock:
                self._idle += 1
