"""Re-measure the memory fields of committed grids (issue 16) without re-training them.

For every run under GRID/runs/*/ it measures its configuration (once per configuration:
memory does not depend on the seed) with a short run (basis_train/experiments/memory_probe.py),
rewrites the memory fields of its summary.json (the old peak_activation_bytes,
cuda_peak_step_bytes and saved_top go away; losses and everything else stay), then
regenerates the grid's results.csv, summary.md, val_loss.png and memory.png from the
summaries. Runs made before `model.head` existed are measured with the plain head they
trained with. On CPU step_peak_bytes is null; pass --device cuda on a GPU to fill it.

    PYTHONPATH=. python scripts/remeasure_memory.py results/paper/heldout results/paper/paper results/ablations
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from basis_train.experiments.memory_probe import measure_memory, run_config
from basis_train.fsutil import atomic_write_text
from basis_train.training.config import apply_overrides, config_to_dict
from basis_train.training.setup import load_data

OLD_FIELDS = ("peak_activation_bytes", "cuda_peak_step_bytes", "saved_top")


def _key(cfg) -> str:
    d = config_to_dict(cfg)
    d["train"].pop("seed")
    d.pop("log")
    return json.dumps(d, sort_keys=True)


def remeasure(grid: Path, device: str, cache: dict) -> None:
    runs = sorted(p.parent for p in (grid / "runs").glob("*/summary.json"))
    data = {}
    for run in runs:
        cfg = apply_overrides(run_config(run), {"train.device": device})
        key = _key(cfg)
        if key not in cache:
            dkey = json.dumps(config_to_dict(cfg)["data"], sort_keys=True)
            if dkey not in data:
                data[dkey] = load_data(cfg)
            cache[key] = measure_memory(cfg, splits=data[dkey])
            print(f"{run.name}: activation_bytes {cache[key]['activation_bytes']:,}", file=sys.stderr)
        path = run / "summary.json"
        s = json.loads(path.read_text())
        for k in OLD_FIELDS:
            s.pop(k, None)
        s.get("by_rank", {}).pop("cuda_peak_step_bytes", None)
        s.update(cache[key], head=cfg.model.head)
        s["memory_measured"] = {"by": "scripts/remeasure_memory.py", "device": device, "torch": torch.__version__}
        atomic_write_text(path, json.dumps(s, indent=2, sort_keys=True) + "\n")


def regenerate(grid: Path) -> None:
    if grid.parent.name == "paper" and grid.name in ("heldout", "paper"):
        from basis_train.experiments.reproduce import write_reproduction

        write_reproduction(grid.parent, grid.name)
    else:
        from basis_train.experiments import ablations
        from basis_train.experiments.compare import report

        report(grid, title=f"exact vs BASIS ({grid.name})")
        if (grid / "mechanisms.md").is_file():
            ablations.main([str(grid)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grids", nargs="+", type=Path)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    cache: dict = {}
    for grid in args.grids:
        remeasure(grid, args.device, cache)
        regenerate(grid)
        print(f"re-measured {grid}", file=sys.stderr)


if __name__ == "__main__":
    main()
