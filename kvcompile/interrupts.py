"""SIGINT and SIGTERM as exceptions, so that every stage cleans up the same way; deferred
where a step must not be cut in half.

Python raises ``KeyboardInterrupt`` on SIGINT; SIGTERM (a cancelled CI job, ``kill``) would
end the process at once, skipping every ``finally`` and leaving temporaries behind. Inside
:func:`signals_as_exceptions` SIGTERM raises :class:`Terminated`, a ``KeyboardInterrupt``, so
the cleanup that runs for Ctrl-C (the build's temporary directory, the atomic writes'
temporary files) runs for SIGTERM too. The CLI then exits with 128 + the signal's number.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGINT_EXIT = 128 + int(signal.SIGINT)  # 130
SIGTERM_EXIT = 128 + int(signal.SIGTERM)  # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop, clean up, exit 143."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` inside the block (SIGINT raises KeyboardInterrupt as
    always); the previous handler comes back after. Python runs (and lets install) signal
    handlers in the main thread only, so elsewhere (a worker thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:  # whoever started us asked for SIGTERM to be ignored
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return SIGTERM_EXIT if isinstance(interrupt, Terminated) else SIGINT_EXIT


def describe(interrupt: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted (SIGINT)"


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (recorded, not lost; then delivered to the
    handlers that were there before): a rename of two directories or a cleanup is never left
    half done by a signal. Handlers, not a signal mask: a mask holds for one thread only, and
    torch's threads would take the signal instead."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def record(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in _SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)
