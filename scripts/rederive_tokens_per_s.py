"""Re-derive summary.json's tokens_per_s (and mfu) of finished runs from their metrics.jsonl with
the current definition: the median rate of the evaluation intervals after the first, which holds
compilation and graph capture (training/metrics.py's steady_rate).

    python scripts/rederive_tokens_per_s.py RUN_DIR [RUN_DIR ...]

Prints each run's old and new value; rewrites the two fields in place (nothing else changes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from basis_train.training.metrics import steady_rate


def main(dirs: list[str]) -> None:
    for d in map(Path, dirs):
        summary = json.loads((d / "summary.json").read_text())
        rates = [json.loads(x)["tokens_per_s"] for x in (d / "metrics.jsonl").read_text().splitlines()
                 if x.strip() and "tokens_per_s" in json.loads(x)]
        new = steady_rate(rates)
        old = summary["tokens_per_s"]
        if summary.get("mfu") is not None and old:
            summary["mfu"] = summary["mfu"] * new / old
        summary["tokens_per_s"] = new
        (d / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print(f"{d.name}: tokens_per_s {old:,.0f} -> {new:,.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
