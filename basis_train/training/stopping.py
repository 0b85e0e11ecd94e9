"""SIGINT/SIGTERM as a request to checkpoint and stop, agreed on by all DDP processes; a second
one stops at once."""

from __future__ import annotations

import os
import signal

# With several processes a request is acted on only once all processes agree, which costs a host
# sync, so they compare flags every this many steps (and at every eval/checkpoint).
# torchrun SIGKILLs its workers 30 s after forwarding a signal: the final checkpoint
# must fit in that window.
_CHECK_EVERY = 20


class Interrupted(Exception):
    pass


class StopNow(BaseException):
    """A second stop request: raised from the signal handler wherever the loop is. A BaseException,
    so that no `except Exception` on the way (data, evaluation, logging) swallows it."""


_FIRST = ("\nstop requested: checkpointing and stopping after the step under way (and the evaluation, if one "
          "is running); Ctrl-C again stops at once, keeping the last checkpoint\n")


class StopRequests:
    """Context manager: while inside, SIGINT/SIGTERM set a flag instead of killing the process."""

    def __init__(self, dist) -> None:
        self.dist = dist
        self.flag = False
        self._old: dict = {}

    def __enter__(self) -> StopRequests:
        if hasattr(signal, "SIGTERM"):
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._on_signal)
                except ValueError:  # not the main thread
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _on_signal(self, signum, frame) -> None:
        if self.flag:
            raise StopNow
        self.flag = True
        if os.environ.get("RANK", "0") == "0":
            # os.write: a print here could land inside the interrupted code's own write to stderr
            os.write(2, _FIRST.encode())

    def agreed(self, step: int, synced: bool) -> bool:
        """True on every process or on none. `synced`: the processes just met anyway (eval/checkpoint)."""
        if not self.dist.enabled:
            return self.flag
        # A signal may reach only some processes, or reach them at different steps.
        if synced or step % _CHECK_EVERY == 0:
            return self.dist.any(self.flag)
        return False
