"""Ctrl-C (SIGINT): loader workers leave it to the main process, and a long loop can finish its step first.

A terminal sends SIGINT to the whole foreground process group, data-loader workers included. A worker that dies of
it turns an orderly stop into "DataLoader worker exited unexpectedly"; `ignore_sigint` (a `worker_init_fn`) leaves
the signal to the main process. `DeferredInterrupt` lets a training loop stop at the next step boundary, where its
state is consistent and can be saved; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading


def ignore_sigint(worker_id: int = 0) -> None:
    """`worker_init_fn` of every DataLoader: the worker ignores Ctrl-C (the main process handles it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class DeferredInterrupt:
    """Within `with`: the first Ctrl-C sets `asked` (and says so on stderr); the second raises KeyboardInterrupt.

    Installed only in the main thread (signal handlers can be set nowhere else); elsewhere it does nothing and
    Ctrl-C raises KeyboardInterrupt at once, as usual.

    Args:
        note: What the first Ctrl-C prints, e.g. "stopping after this step, then saving the state".
        enabled: False leaves Ctrl-C alone (several processes, which cannot agree on a step to stop after).
    """

    def __init__(self, note: str, enabled: bool = True):
        self.note, self.enabled = note, enabled
        self.asked = False
        self._previous = None

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
