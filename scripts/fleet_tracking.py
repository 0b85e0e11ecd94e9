"""How closely fleet members track their single runs: |val loss difference| per evaluation step.

    python scripts/fleet_tracking.py FLEET_GRID/heldout/runs

References: the committed single runs drawn with the same sketch stream, i.e. results/paper/
recheck_feistel for R = 32 and 8, and results/paper/heldout for exact, R = 64 and R = 1 (with 64 rows
a step, R = 64 and R = 1 do not depend on the row permutation, which is all the Feistel change moved).
"""

import json
import sys
from pathlib import Path

SAME_STREAM_IN_HELDOUT = ("exact-", "basis_R64-", "basis_R1-")


def losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in map(json.loads, path.read_text().splitlines())}


def main(runs: Path, steps=(1000, 10000, 20000, 36000, 50000)) -> None:
    by_step: dict[int, list] = {}
    for run in sorted(runs.iterdir()):
        ref = Path("results/paper/recheck_feistel/runs") / run.name / "metrics.jsonl"
        if not ref.exists() and run.name.startswith(SAME_STREAM_IN_HELDOUT):
            ref = Path("results/paper/heldout/runs") / run.name / "metrics.jsonl"
        if not ref.exists():
            continue
        fleet, single = losses(run / "metrics.jsonl"), losses(ref)
        for s in steps:
            if s in fleet and s in single:
                by_step.setdefault(s, []).append((abs(fleet[s] - single[s]), run.name))
    for s, diffs in sorted(by_step.items()):
        diffs.sort()
        print(f"step {s}: {len(diffs)} members, median |dval| {diffs[len(diffs) // 2][0]:.1e}, "
              f"max {diffs[-1][0]:.1e} ({diffs[-1][1]})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
