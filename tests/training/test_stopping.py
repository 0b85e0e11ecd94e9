"""Ctrl-C: a first one is acknowledged at once and stops after the step (and evaluation) under way,
a second stops at once, keeping the last checkpoint."""

import json
import os
import signal

import pytest
import torch

from basis_train.training.config import apply_overrides, load_config
from basis_train.training.train import Interrupted, Run


def _interrupting_evaluation(run, times: int, monkeypatch):
    """The run's evaluation at step 4 receives `times` SIGINTs, as from Ctrl-C pressed that often."""
    evaluate = type(run.evaluate).__call__

    def interrupted(self):
        if run.step == 4:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return evaluate(self)

    monkeypatch.setattr(type(run.evaluate), "__call__", interrupted)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_an_evaluation_is_acknowledged_and_a_second_stops_at_once(tmp_path, tiny_config, capfd,
                                                                               monkeypatch, presses):
    cfg = apply_overrides(load_config(str(tiny_config)), {"train.checkpoint_every": 4})
    run = Run(cfg, tmp_path / "r", progress=False)
    _interrupting_evaluation(run, presses, monkeypatch)
    with pytest.raises(Interrupted) as stopped:
        run.run()
    err = capfd.readouterr().err
    assert "stop requested" in err and "Ctrl-C again stops at once" in err, err
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)["step"] == 4
    if presses == 1:  # the evaluation ends and is logged, then the run stops
        assert [r["step"] for r in records] == [4] and "interrupted at step 4" in str(stopped.value)
    else:  # stopped inside the evaluation: the checkpoint written before it is the last one
        assert records == [] and "stopped at once" in str(stopped.value)
        assert "the last good checkpoint (step 4)" in str(stopped.value)
