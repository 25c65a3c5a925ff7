"""reuse_freed_memory: freed host blocks are reused inside the block, returned after it."""

import resource

import numpy as np
import pytest
import torch
from curvops.linops import host_allocator
from curvops.linops.host_allocator import reuse_freed_memory
from curvops.solvers import lanczos

GLIBC = host_allocator._glibc() is not None
BLOCK = 16 << 20  # 64 MiB of float32: above glibc's largest dynamic mmap threshold


def _faults_of_second_block() -> int:
    """Minor page faults of filling a 64 MiB tensor after an equal one was freed (the
    fewest of five tries: a heap that earlier work left with trimmed free chunks serves
    the first blocks from pages that must be faulted in again)."""
    counts = []
    for _ in range(5):
        torch.empty(BLOCK).fill_(1.0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(BLOCK).fill_(2.0)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_a_freed_block_is_reused_inside():
    # (Outside, what glibc does depends on what earlier work left in the heap: a large free
    # chunk there is reused too, so only the block's own guarantee is tested.)
    with reuse_freed_memory() as active:
        assert active
        assert _faults_of_second_block() < BLOCK * 4 // 4096 // 20  # the freed block, reused


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_blocks_nest_and_the_outermost_settles():
    with reuse_freed_memory():
        with reuse_freed_memory() as inner:
            assert inner and host_allocator._depth == 2
        assert host_allocator._depth == 1
        assert _faults_of_second_block() < BLOCK // 4096 // 20  # still reusing
    assert host_allocator._depth == 0


def test_disabled_does_nothing():
    with reuse_freed_memory(False) as active:
        assert not active and host_allocator._depth == 0


def test_lanczos_gives_the_same_numbers_with_and_without_reuse():
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((300, 300)))
    A = torch.from_numpy((Q * np.linspace(1, 10, 300)) @ Q.T)
    on = lanczos(A, 4, tol=1e-10)
    off = lanczos(A, 4, tol=1e-10, reuse_freed_memory=False)
    assert np.array_equal(on.eigenvalues, off.eigenvalues)
    assert host_allocator._depth == 0
    with pytest.raises(TypeError, match="reuse_freed_memory must be a bool"):
        lanczos(A, 4, reuse_freed_memory=1)


class _FakeGlibc:
    """Records the allocator calls ``_settle`` makes, with a chosen free heap."""

    def __init__(self, free_bytes: int | None) -> None:
        self.calls: list[tuple] = []
        if free_bytes is not None:
            self.mallinfo2 = lambda: type("Info", (), {"fordblks": free_bytes})()

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.mark.parametrize(("free", "trims"), [
    (10 << 20, False),  # below the settled trim threshold: glibc would keep it too
    (2 * host_allocator.SETTLED_MMAP_THRESHOLD_BYTES, True),
    (None, True),  # glibc before 2.33 cannot tell: always trim
])
def test_leaving_gives_memory_back_only_above_the_settled_trim_threshold(free, trims):
    libc = _FakeGlibc(free)
    host_allocator._settle(libc)
    assert ("mallopt", host_allocator._M_MMAP_THRESHOLD,
            host_allocator.SETTLED_MMAP_THRESHOLD_BYTES) in libc.calls
    assert ("mallopt", host_allocator._M_TRIM_THRESHOLD,
            2 * host_allocator.SETTLED_MMAP_THRESHOLD_BYTES) in libc.calls
    assert (("malloc_trim", 0) in libc.calls) == trims


@pytest.mark.skipif(not GLIBC or host_allocator._free_heap_bytes(host_allocator._glibc())
                    is None, reason="glibc >= 2.33 only")
def test_free_heap_bytes_sees_a_freed_block():
    libc = host_allocator._glibc()
    with reuse_freed_memory():
        torch.empty(BLOCK).fill_(1.0)  # freed into the heap, kept there inside the block
        assert host_allocator._free_heap_bytes(libc) >= BLOCK * 4
