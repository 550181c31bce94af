"""SIGINT/SIGTERM during a conversion: stop at once, or inside the training loop ask it to checkpoint and stop at the
next step boundary."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dotmoe.errors import Interrupted


class _StopState:
    installed = False
    deferred = False
    signum: int | None = None


_STOP = _StopState()


def _on_signal(signum, frame) -> None:
    if _STOP.deferred and _STOP.signum is None:
        _STOP.signum = signum  # the training loop stops at the next step boundary, after a checkpoint
        return
    raise Interrupted(signum)  # anywhere else (or a second signal): stop now


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` (a KeyboardInterrupt), or under `stop_at_step_boundaries(True)` ask
    the training loop to checkpoint and stop at the next step boundary. Main thread only; the old handlers come back
    after."""
    if threading.current_thread() is not threading.main_thread() or _STOP.installed:
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    _STOP.installed, _STOP.signum = True, None
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _STOP.installed, _STOP.deferred, _STOP.signum = False, False, None


def stop_at_step_boundaries(on: bool) -> None:
    """While on, a signal only sets `stop_requested()`, which the training loop polls at step boundaries; turning
    it off with a request pending stops at once. `stop_on_signals` turns it off when its block ends, however."""
    _STOP.deferred = on
    if not on and _STOP.signum is not None:  # arrived after the loop's last poll
        raise Interrupted(_STOP.signum)


def stop_requested() -> int | None:
    """The signal number of a pending stop request (SIGINT/SIGTERM during a deferred region), or None."""
    return _STOP.signum
