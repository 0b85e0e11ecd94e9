"""scripts/loop_overhead.py times the training loop around steps that do nothing."""

from tests.scripts_module import load_script


def _script():
    return load_script("loop_overhead")


def test_the_loop_is_timed_around_steps_that_do_nothing(tiny_config):
    gaps, summary = _script().time_loop(str(tiny_config), 30)
    # one interval per pair of steps before the last (which its evaluation and checkpoint follow)
    assert len(gaps) == 28 and all(g > 0 for g in gaps)
    # no forward ran, so no loss was added up: the loop went round 30 times without training
    assert summary["steps"] == 30 and summary["final_train_loss"] == 0.0
