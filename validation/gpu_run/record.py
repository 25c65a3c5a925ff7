"""The run's record: one JSON file rewritten after every step, and the deadline's watchdog.

Every change to the data goes through :meth:`Recorder.change` under one lock, so that the
:class:`Watchdog` can write a consistent file at the deadline while the main thread is in
the middle of a step, mark the step in flight ``timeout: budget`` and end the process.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..report import json_ready

__all__ = ["EXIT_TIMEOUT", "SCHEMA", "Recorder", "Watchdog"]

SCHEMA = "curvops.gpu_run/1"
EXIT_TIMEOUT = 3


class Recorder:
    """The run's results, written to ``path`` after every step (atomically).

    ``data["_t0"]`` is the monotonic start of the budget (``elapsed_s`` is counted from it;
    it is not written).
    """

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.lock = threading.RLock()

    @contextlib.contextmanager
    def change(self) -> Iterator[dict[str, Any]]:
        """Mutate ``data`` under the lock; the file is rewritten afterwards."""
        with self.lock:
            yield self.data
            self.write()

    def write(self) -> None:
        """Write the JSON (temporary file, then rename: a reader never sees half a file)."""
        with self.lock:
            self.data["elapsed_s"] = time.monotonic() - self.data["_t0"]
            text = json.dumps(self.snapshot(), indent=1)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of the data."""
        return json_ready({k: v for k, v in self.data.items() if k != "_t0"})

    def begin(self, record: dict[str, Any]) -> None:
        """Mark ``record`` (already placed in ``data``) as in flight."""
        with self.change():
            record["status"] = "running"

    def end(self, record: dict[str, Any], **updates: Any) -> None:
        """Finish ``record`` with ``updates``."""
        with self.change():
            record.update(updates)

    def mark_running(self, status: str) -> None:
        """Give every record still ``running`` the status ``status`` (at the deadline)."""
        def walk(x: Any) -> None:
            if isinstance(x, dict):
                if x.get("status") == "running":
                    x["status"] = status
                for v in list(x.values()):
                    walk(v)
            elif isinstance(x, list):
                for v in list(x):
                    walk(v)

        walk(self.data)


class Watchdog(threading.Thread):
    """At the deadline: mark the step in flight ``timeout: budget``, write, print, exit 3."""

    def __init__(self, deadline: float, recorder: Recorder, on_expire: Callable[[], None]):
        super().__init__(daemon=True, name="gpu_run-watchdog")
        self.deadline, self.recorder, self.on_expire = deadline, recorder, on_expire
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(max(0.0, min(1.0, self.deadline - time.monotonic()))):
            if time.monotonic() >= self.deadline:
                break
        if self.stopped.is_set():
            return
        got = self.recorder.lock.acquire(timeout=10.0)
        try:
            for _ in range(3):  # the main thread may be changing a dict outside the lock
                try:
                    self.recorder.mark_running("timeout: budget")
                    self.recorder.data["status"] = "timeout: budget"
                    self.recorder.write()
                    self.on_expire()
                    break
                except RuntimeError:
                    time.sleep(0.05)
        finally:
            if got:
                self.recorder.lock.release()
            sys.stdout.flush()
            os._exit(EXIT_TIMEOUT)

    def stop(self) -> None:
        """Stand down (the run finished in time)."""
        self.stopped.set()
