"""The paper's optimiser at GPT-2 small: which SGD learning rates the grid runs.

Exact runs a sweep a factor of about 3 apart; an end of the sweep that turns out best gets a
neighbour further out, so that the best lr lies inside it. BASIS then runs at exact's best lr and
its two neighbours. The sweep's state is the grid's finished runs: nothing else is stored.
"""

from __future__ import annotations

import math
from pathlib import Path

from basis_train.experiments.grid_state import final_loss

# SGD with momentum 0.9, the paper's optimiser, a factor of about 3 apart. No weight decay: PyTorch's
# SGD couples it to the gradient, so the AdamW runs' 0.1 would mean a different thing.
SGD_LRS = (0.03, 0.1, 0.3, 1.0)
SGD = {"optim.name": "sgd", "optim.momentum": 0.9, "optim.weight_decay": 0.0}
SGD_EXTEND = 2  # at most this many extra exact lrs when the best sits at an end of the sweep


def sgd_sweep(grid: Path, lrs=SGD_LRS) -> tuple[list[float], dict[float, float]]:
    """(the exact SGD lrs to run, final losses of those finished). An end of the sweep that is the
    best so far gets a neighbour 3.16x further out, up to SGD_EXTEND of them, so the best is inside."""
    lrs, n0 = sorted(lrs), len(lrs)
    while True:
        done = {lr: v for lr in lrs if (v := final_loss(grid / "runs" / f"exact_sgd{lr:g}-s0")) is not None}
        if len(done) < len(lrs):
            return lrs, done
        best = min(done, key=done.get)
        if len(lrs) - n0 >= SGD_EXTEND or best not in (lrs[0], lrs[-1]):
            return lrs, done
        lrs = sorted([*lrs, ladder_step(best, up=best == lrs[-1])])


def ladder_step(lr: float, up: bool) -> float:
    """The next value of the 1-3-10 ladder (0.3 -> 1 -> 3 -> 10) above or below `lr`."""
    exp = math.floor(math.log10(lr) + 1e-9)
    mantissa = round(lr / 10 ** exp, 6)
    if up:
        step = 3.0 if mantissa < 3 else 10 / 3
    else:
        step = 1 / 3 if mantissa > 1 else 0.3
    return float(f"{lr * step:.2g}")


def sgd_basis_lrs(grid: Path) -> list[float]:
    """Exact's best SGD lr and its two neighbours in the sweep, once the sweep is finished."""
    lrs, done = sgd_sweep(grid)
    if len(done) < len(lrs):
        return []
    best = lrs.index(min(done, key=done.get))
    return lrs[max(0, best - 1): best + 2]
