"""A fault for the tests: BASIS_TRAIN_DIE_AT_STEP=N ends the process like kill -9 right after
step N, so a test can check that a resumed run repeats the uninterrupted one. The training loops
take it as their per-step callback; they know nothing of it."""

from __future__ import annotations

import os
from collections.abc import Callable


def from_env() -> Callable[[int], None] | None:
    die_at = int(os.environ.get("BASIS_TRAIN_DIE_AT_STEP", "0"))
    if not die_at:
        return None

    def die(step: int) -> None:
        if step == die_at:
            os._exit(137)  # no cleanup, no flush: what kill -9 leaves behind

    return die
