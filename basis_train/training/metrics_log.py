"""metrics.jsonl: one JSON record per evaluation, complete up to the checkpoint after any kill.

A resumed run writes exactly the lines an uninterrupted one would: the log is cut back to the
checkpoint's step. The checkpoint keeps its own copy of the records, so a line lost to a kill,
a full disk or an editor is restored from it, with a warning naming the line.
"""

from __future__ import annotations

import json
from pathlib import Path

from basis_train.fsutil import atomic_write_bytes
from basis_train.training.errors import RunError, warn


def _line(rec: dict) -> str:
    return json.dumps(rec, sort_keys=True)


def read_records(path: Path, until_step: int, saved: bool) -> tuple[list[dict], list[str]]:
    """The records in `path` up to `until_step`, and one note per line that is not a record.
    `saved`: the checkpoint holds a copy, so a file that is not text is only a note, not an error."""
    data = path.read_bytes() if path.exists() else b""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if saved:
            return [], [f"it is not a text file (byte {exc.start})"]
        raise RunError(f"--resume: {path} is not a text file (byte {exc.start}); move it aside to resume "
                       "without the records before the checkpoint, or start over with --overwrite") from None
    records, notes = [], []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rec = json.loads(line)
            step = rec["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            notes.append(f"line {n} is not a record ({line[:40]!r})")
            continue
        if step <= until_step:
            records.append(rec)
    return records, notes


def _completes(records: list[dict], saved: list[dict], pending: dict) -> bool:
    """`records` is `saved` and then `pending` with its evaluation added."""
    if len(records) != len(saved) + 1 or "val_loss" not in records[-1]:
        return False
    last = records[-1]
    return ([_line(r) for r in records[:-1]] == [_line(r) for r in saved]
            and all(k in last and _line({"v": last[k]}) == _line({"v": v}) for k, v in pending.items()))


class MetricsLog:
    """Process 0's metrics.jsonl. `resumed_step`: None starts an empty log; else the log is cut back
    to that step and `saved` (the checkpoint's copy of the records, None in older checkpoints)
    wins over the file wherever they differ."""

    def __init__(self, path: Path, resumed_step: int | None = None, saved: list[dict] | None = None,
                 pending: dict | None = None) -> None:
        self.path = path
        self.pending_logged = False
        records: list[dict] = []
        if resumed_step is not None:
            records, notes = read_records(path, resumed_step, saved is not None)
            if saved is not None and pending is not None and _completes(records, saved, pending):
                # The evaluation the checkpoint left pending finished and was logged (every run's
                # last step does this): the file is the checkpoint's copy plus that record.
                self.pending_logged, saved = True, records
            if saved is not None:
                if [_line(r) for r in records] != [_line(r) for r in saved]:
                    notes.append(f"its records up to step {resumed_step} differ from the checkpoint's copy")
                records = list(saved)
            if notes:
                fix = "rewritten from the checkpoint's copy" if saved is not None else "dropped"
                warn(f"{path}: {'; '.join(notes)}; {fix}")
        atomic_write_bytes(path, lambda f: f.write("".join(_line(r) + "\n" for r in records).encode()))
        self.records = records

    def append(self, rec: dict) -> None:
        self.records.append(rec)
        with open(self.path, "a") as f:
            f.write(_line(rec) + "\n")
            f.flush()


class UnwrittenMetrics:
    """What ranks other than 0 log to: nothing is written, and nothing reads it back."""

    def __init__(self) -> None:
        self.records: list = []
        self.pending_logged = False

    def append(self, rec: dict) -> None:
        pass
