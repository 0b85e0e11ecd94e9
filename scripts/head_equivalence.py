"""Issue 16's check: a paper-size run with --head fused and one with --head plain end alike.

Run both (same seed, CPU, float32; ~10-40 min each on a shared 2-core box), then collect:

    for h in fused plain; do OMP_NUM_THREADS=1 basis-train --config configs/paper.yaml --device cpu \\
        --steps 2000 --eval-every 1000 --val-protocol paper --head $h --seed 0 --quiet --out /tmp/eq/$h & done; wait
    PYTHONPATH=. python scripts/head_equivalence.py /tmp/eq/fused /tmp/eq/plain results/bench/head_equivalence

Copies each run's config.yaml, metrics.jsonl and summary.json and writes equivalence.json:
the final train and val losses of both, their largest absolute difference and the command.
"""

import json
import shutil
import sys
from pathlib import Path

COMMAND = ("OMP_NUM_THREADS=1 basis-train --config configs/paper.yaml --device cpu --steps 2000 --eval-every 1000 "
           "--val-protocol paper --head fused|plain --seed 0 --quiet --out DIR")


def main() -> None:
    fused, plain, out = map(Path, sys.argv[1:4])
    res = {"command": COMMAND}
    for name, run in (("fused", fused), ("plain", plain)):
        (out / name).mkdir(parents=True, exist_ok=True)
        for f in ("config.yaml", "metrics.jsonl", "summary.json"):
            shutil.copy(run / f, out / name / f)
        s = json.loads((run / "summary.json").read_text())
        assert s["head"] == name, (run, s["head"])
        res[name] = {"final_train_loss": s["final_train_loss"], "final_val_loss": s["final_val_loss"],
                     "steps": s["steps"], "activation_bytes": s["activation_bytes"]}
    res["max_abs_diff"] = max(abs(res["fused"][k] - res["plain"][k]) for k in ("final_train_loss", "final_val_loss"))
    (out / "equivalence.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
