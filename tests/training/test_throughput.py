"""summary.json's tokens_per_s is the run's warm rate: the first interval between evaluations holds
torch.compile's compilation and the CUDA-graph capture and is left out."""

import torch

from basis_train.training.metrics import Throughput


def _clock(rates: list[float]) -> Throughput:
    clock = Throughput(tokens_per_step=8192, device=torch.device("cpu"))
    clock.tokens_per_s = list(rates)
    return clock


def test_the_warm_up_interval_is_left_out():
    # As a compiled GPT-2-small run logged it: 81,632 tokens/s over the first 250 steps, then ~408k.
    rates = [81_632.0, 407_913.0, 408_568.0, 406_907.0, 407_422.0, 406_510.0, 408_085.0, 407_956.0]
    assert _clock(rates).steady_tokens_per_s() == 407_913.0  # the median of the seven warm intervals


def test_one_interval_is_all_there_is():
    assert _clock([5.0]).steady_tokens_per_s() == 5.0


def test_a_slow_interval_later_does_not_drag_the_rate():
    assert _clock([1.0, 100.0, 100.0, 10.0, 100.0]).steady_tokens_per_s() == 100.0


class _FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_time_paused_is_not_training_time(monkeypatch):
    """A checkpoint written between two evaluations (the 8,000-step runs: every 500 steps, evaluated
    every 1,000) is not training: it must not lower the interval's tokens/s."""
    import basis_train.training.metrics as metrics

    fake = _FakeTime()
    monkeypatch.setattr(metrics, "time", fake)
    clock = Throughput(tokens_per_step=100, device=torch.device("cpu"))
    clock.start(0)
    fake.now = 2.0  # 10 steps
    with clock.paused():
        fake.now = 30.0  # the checkpoint
    fake.now = 32.0  # 10 more steps
    lap = clock.lap(20)
    assert lap == {"tokens_per_s": 500.0, "ms_per_step": 200.0}
    assert clock.train_s == 4.0
    clock.start(20)  # a new interval banks nothing from the last
    fake.now = 33.0
    assert clock.lap(25)["tokens_per_s"] == 500.0
