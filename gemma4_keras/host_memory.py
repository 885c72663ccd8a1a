"""Hands heap memory the process freed back to the operating system.

glibc's `malloc` keeps freed memory in the process's heap, resident, for
reuse. XLA:CPU's compiler frees most of what it allocates when a compile
ends (about 0.5 GiB for a 5-layer model at E2B's width, more for the whole
model), but the pages stay resident while the train step then allocates its
temporaries, so the two add up in the resident set and in the kernel's OOM
accounting. `malloc_trim(0)` returns the free pages (also those in the middle
of the heap) to the kernel; it takes milliseconds.

`release_after_compiles()` trims after every XLA compile (through JAX's
monitoring event for a finished backend compile, which fires before the
compiled program first runs); the streaming loader registers it, so every
command that loads a model has it. Elsewhere than glibc (macOS) both are
no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# JAX records this event when XLA has compiled a program, before it runs.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release() -> bool:
    """Returns the heap's free pages to the kernel; whether anything was."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def _on_event(event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == COMPILE_EVENT:
        release()


@functools.cache
def release_after_compiles() -> None:
    """Registers `release()` to run after every XLA compile (once a process)."""
    import jax  # heavy: only a process that compiles needs it

    jax.monitoring.register_event_duration_secs_listener(_on_event)
