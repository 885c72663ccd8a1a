"""SIGTERM and SIGINT at any phase of `train`: stop, record where, exit 3.

Inside Keras' `fit`, `callbacks.PreemptionGuard` finishes the current
optimiser step and stops there (the step is checkpointed). Everywhere else
(data preparation, model loading, the final evaluation) the signal raises
`Stopped` in the main thread at once; `train.run` records

    run_state.json  {"status": "preempted", "step": 40, "phase": "evaluation",
                     "signal": "SIGTERM"}

(`step`: the newest checkpoint) and the CLI prints one line and exits 3. A
rerun of the same command resumes from that checkpoint.

    with stopping.on_signals():      # api.run, around the whole run
        ...
        stopping.started()           # train.run, once it holds the workdir
        stopping.phase("data preparation")

Two stretches defer a signal instead: start-up, until the run holds its
workdir (only then may it write `run_state.json`), and a checkpoint save
(`deferred()`: a step is written whole or not at all). The first signal
there stops the run when the stretch ends; a second one stops it at once.

`training.api.run` installs the handlers (for the CLI and a user's script
alike).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
from collections.abc import Iterator, Sequence

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A SIGTERM / SIGINT outside the training loop.

    A BaseException, as KeyboardInterrupt: no `except Exception` on the way
    swallows it, and `finally` blocks (staging directories, the workdir
    lock) still run.
    """

    def __init__(self, signum: int, phase: str):
        super().__init__(f"{signal.Signals(signum).name} during {phase}")
        self.signum, self.phase = signum, phase

    @property
    def signal(self) -> str:
        return signal.Signals(self.signum).name


_START_UP = "the run has started"
_phase = "start-up"
_until: str | None = None  # what a deferred signal waits for; None: not deferring
_pending: Stopped | None = None


def phase(name: str) -> None:
    """Names what the run does now (said and recorded if a signal stops it)."""
    global _phase
    _phase = name


def say(line: str) -> None:
    """Writes `line` to stderr from a signal handler.

    Straight to the file descriptor: a `print` there could re-enter a write
    the signal interrupted (Python raises on that).
    """
    with contextlib.suppress(OSError):
        os.write(2, f"{line}\n".encode())


def _in_finaliser(frame) -> bool:
    """Whether `frame` runs inside a gc callback or a `__del__` (JAX has both).

    Python only prints an exception raised there and carries on: the stop
    would be lost.
    """
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code.co_name == "__del__" or frame.f_code in callbacks:
            return True
        frame = frame.f_back
    return False


def stop_now(signum: int, frame, where: str | None = None) -> None:
    """Raises `Stopped` from a signal handler, unless that would lose it.

    While deferring, the first signal waits for the stretch to end; inside a
    gc callback or a `__del__` the signal is sent again a moment later.
    """
    global _pending
    stop = Stopped(signum, where or _phase)
    if _until is not None and _pending is None:
        _pending = stop
        say(f"{stop.signal}: stopping once {_until} (send it again to stop now)")
        return
    if _in_finaliser(frame):
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    raise stop


def _end_deferral(outer: str | None, *, failed: bool = False) -> None:
    """Leaves a deferred stretch; raises the signal it held back, if any.

    After a failure (`failed`) the held-back signal is dropped: the error
    ends the run.
    """
    global _until, _pending
    _until = outer
    if outer is None and _pending is not None:
        stop, _pending = _pending, None
        if not failed:
            raise stop


@contextlib.contextmanager
def deferred(until: str) -> Iterator[None]:
    """A signal in the block stops the run when the block ends (`until` says when)."""
    global _until
    outer, _until = _until, _until or until
    try:
        yield
    except BaseException:
        _end_deferral(outer, failed=True)
        raise
    _end_deferral(outer)


def started() -> None:
    """Ends start-up's deferral (the run holds its workdir); raises a held-back signal."""
    if _until == _START_UP:
        _end_deferral(None)


def _raise(signum, frame):
    stop_now(signum, frame)


@contextlib.contextmanager
def on_signals(held: Sequence[int] = ()) -> Iterator[None]:
    """SIGTERM / SIGINT stop the `with` block (main thread only); see the module doc.

    `held`: signals that came before the block (the CLI holds those that
    arrive while the libraries import), handled as if they came at its start.
    """
    global _until, _pending
    phase("start-up")
    _until, _pending = _START_UP, None
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: left as they are
        for s in SIGNALS:
            previous[s] = signal.signal(s, _raise)
    try:
        for signum in held:
            stop_now(signum, None)
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _until, _pending = None, None


def message(state: dict) -> str:
    """The line the CLI prints for a preempted run's state (or a bare stop)."""
    sig = state.get("signal") or "SIGTERM"
    where, step = state.get("phase") or "training", state.get("step")
    if where == "training" and step:
        return (
            f"preempted ({sig}) at step {step}; the checkpoint is saved: rerun the "
            "same command to resume"
        )
    if step is None:  # before the run held its workdir: nothing was written
        return f"stopped ({sig}) during {where}: rerun the same command to start"
    resume = f"from checkpoint step {step}" if step else "from the start"
    return (
        f"preempted ({sig}) during {where}; recorded in run_state.json: rerun the "
        f"same command to resume ({resume})"
    )
