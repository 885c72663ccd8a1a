"""host_memory: freed heap goes back to the kernel, after every XLA compile."""

import sys

import jax
import jax.numpy as jnp
import pytest

from gemma4_keras import host_memory

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or host_memory._malloc_trim() is None,
    reason="malloc_trim exists only in glibc (Linux); on macOS and Windows "
    "release() does nothing, so there is no freed heap to measure",
)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))


@glibc
def test_release_returns_freed_heap_pages():
    # 2 KB blocks come from the heap (below the mmap threshold); a block
    # allocated after them pins the heap's top, so glibc cannot trim on free.
    blocks = [bytearray(2000) for _ in range(100_000)]  # ~200 MB, touched
    pin = bytearray(2000)
    del blocks
    before = _rss()
    assert host_memory.release()
    assert before - _rss() > 100 * 2**20
    del pin


def test_release_runs_after_every_compile(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "release", lambda: calls.append(1) or True)
    host_memory.release_after_compiles()
    host_memory.release_after_compiles()  # registered once
    x = jnp.ones((7,)).block_until_ready()
    for n, f in enumerate([lambda x: x * 3 + 1, lambda x: x - 2], start=1):
        calls.clear()
        jax.jit(f)(x).block_until_ready()  # one new program: one release
        assert len(calls) == 1, n
        jax.jit(f)(x).block_until_ready()  # compiled already: none
        assert len(calls) == 1, n
