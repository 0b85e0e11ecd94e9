"""scripts/loop_overhead.py times the training loop around steps that do nothing."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "loop_overhead.py"


def _script():
    spec = importlib.util.spec_from_file_location("loop_overhead", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_loop_is_timed_around_steps_that_do_nothing(tiny_config):
    gaps, summary = _script().time_loop(str(tiny_config), 30)
    # one interval per pair of steps before the last (which its evaluation and checkpoint follow)
    assert len(gaps) == 28 and all(g > 0 for g in gaps)
    # no forward ran, so no loss was added up: the loop went round 30 times without training
    assert summary["steps"] == 30 and summary["final_train_loss"] == 0.0
