"""The progress bar: an ETA that counts the evaluations to come, and a loss before the first one."""

import pytest

from basis_train.training.config import apply_overrides, load_config
from basis_train.training.progress import ProgressBar, eta_s, evaluations_left
from basis_train.training.train import Run


@pytest.mark.parametrize(("step", "total", "every", "left"), [
    (0, 12, 4, 3), (3, 12, 4, 3), (4, 12, 4, 2), (11, 12, 4, 1), (12, 12, 4, 0),
    (0, 10, 4, 3), (8, 10, 4, 1), (9, 10, 4, 1),  # 4, 8 and the last step, 10
])
def test_evaluations_left_counts_every_nth_step_and_the_last(step, total, every, left):
    assert evaluations_left(step, total, every) == left
    assert left == sum(1 for s in range(step + 1, total + 1) if s % every == 0 or s == total)


def test_eta_adds_the_mean_evaluation_for_each_one_left():
    # 100 steps took 30 s, 10 of them in 2 evaluations: 0.2 s a step, 5 s an evaluation.
    assert eta_s(100, 50, 30.0, 10.0, 2, 3) == (pytest.approx(50 * 0.2 + 3 * 5.0), True)
    # Before the first evaluation its cost is unknown: the ETA says it leaves them out.
    assert eta_s(10, 90, 2.0, 0.0, 0, 2) == (pytest.approx(90 * 0.2), False)
    assert eta_s(0, 90, 0.0, 0.0, 0, 2) == (0.0, False)


def test_bar_shows_the_running_loss_and_the_eta_with_evaluations(capsys):
    bar = ProgressBar(100, 0, 10, lambda: 2.5, disable=False)
    bar.update(5)
    assert "loss 2.500" in str(bar) and "+ evaluations" in str(bar)
    bar.evaluated(1.0, "val 2.700 at 10")
    text = str(bar)
    assert "loss 2.500, val 2.700 at 10" in text and "+ evaluations" not in text
    bar.close()


def test_train_loss_is_on_the_bar_before_the_first_evaluation(tmp_path, tiny_config, capsys):
    shown = {}

    def look(step):
        if step == 2:  # eval_every 4: nothing evaluated yet
            shown["bar"] = str(run.metrics.bar)

    cfg = apply_overrides(load_config(str(tiny_config)), {"train.steps": 4})
    run = Run(cfg, tmp_path / "r", progress=True, on_step=look)
    run.run()
    assert "loss " in shown["bar"] and "val " not in shown["bar"], shown


def test_summary_keeps_training_and_total_time_apart(tmp_path, tiny_config, capsys):
    import json

    cfg = apply_overrides(load_config(str(tiny_config)), {"train.steps": 8})
    summary = Run(cfg, tmp_path / "r", progress=False).run()
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # wall_s spans the training intervals (train_s) and the evaluations between them, and more
    assert summary["wall_s"] >= summary["train_s"] + sum(r["eval_s"] for r in records)
    assert summary["ms_per_step"] == pytest.approx(1000 * summary["train_s"] / 8)

