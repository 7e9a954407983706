"""Ctrl-C (SIGINT): loader workers leave it to the main process (a terminal sends it to the whole process group, and
a worker dying of it reads "DataLoader worker exited unexpectedly"), and a long loop can finish its step first."""

from __future__ import annotations

import signal
import sys
import threading


def ignore_sigint(worker_id: int = 0) -> None:
    """`worker_init_fn` of every DataLoader: the worker ignores Ctrl-C (the main process handles it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class DeferredInterrupt:
    """Within `with`: the first Ctrl-C sets `asked` (and prints `note` on stderr); the second raises
    KeyboardInterrupt. Only in the main thread (signal handlers can be set nowhere else) and when `enabled` (several
    processes cannot agree on a step to stop after); elsewhere Ctrl-C raises KeyboardInterrupt at once, as usual."""

    def __init__(self, note: str, enabled: bool = True):
        self.note, self.enabled, self.asked, self._previous = note, enabled, False, None

    def _handle(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print(f"Ctrl-C: {self.note} (Ctrl-C again to stop at once, without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> DeferredInterrupt:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
