"""Run a function on several processes joined by a gloo process group on loopback.

Each rank runs ``fn(rank, *args)`` in a fresh spawned process with one thread; what it
returns (or the error it raised, with the seconds it took) comes back to the test. Every
run is bounded in time: processes still alive at the deadline are killed, and the group
is destroyed on every path.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing as mp

#: Collective timeout of the test groups: the backstop for a rank that hangs.
COLLECTIVE_TIMEOUT_S = 45


@dataclass
class RankOutcome:
    """What one rank returned or raised."""

    rank: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    seconds: float = 0.0
    exitcode: int | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None and self.exitcode in (0, None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(fn: Callable, rank: int, world: int, port: int, out: Any, args: tuple) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist = torch.distributed
    t0 = time.perf_counter()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        value = fn(rank, *args)
        out.put((rank, "ok", value, None, time.perf_counter() - t0))
    except Exception as err:
        detail = f"{err}\n{traceback.format_exc()}"
        out.put((rank, type(err).__name__, None, detail, time.perf_counter() - t0))
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # a dead peer can make the teardown fail; the result is sent
            pass


def run_ranks(fn: Callable, world: int = 2, args: tuple = (), timeout: float = 150.0
              ) -> list[RankOutcome]:
    """Run ``fn(rank, *args)`` on ``world`` ranks; outcomes in rank order."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out, args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    outcomes = {r: RankOutcome(r) for r in range(world)}
    got: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world and time.monotonic() < deadline:
            try:
                rank, status, value, detail, seconds = out.get(timeout=0.5)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and out.empty():
                    break
                continue
            o = outcomes[rank]
            o.value, o.seconds = value, seconds
            if status != "ok":
                o.error_type, o.error = status, detail
            got.add(rank)
        for p in procs:
            p.join(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    for r, p in enumerate(procs):
        outcomes[r].exitcode = p.exitcode
        if r not in got and outcomes[r].error_type is None:
            outcomes[r].error_type = "NoResult"
            outcomes[r].error = f"rank {r} sent nothing (exit code {p.exitcode})"
    return [outcomes[r] for r in range(world)]


def check_all_ok(outcomes: list[RankOutcome]) -> list[Any]:
    """The ranks' values, or an AssertionError with every failed rank's error."""
    bad = [o for o in outcomes if not o.ok]
    assert not bad, "\n".join(f"rank {o.rank}: {o.error_type}: {o.error}" for o in bad)
    return [o.value for o in outcomes]
