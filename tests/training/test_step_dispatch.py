"""The step dispatch TrainStep and FleetStep share (training/step.py's GraphDispatch), on CPU with a
stand-in for the CUDA graph: eager steps first (TrainStep's memory measurements among them), then one
capture of the whole step on a static index buffer with the right generators, then replays only."""

import torch

from basis_train.core import graphs
from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.options import SketchConfig
from basis_train.fleet.loop import FleetStep
from basis_train.fleet.model import FleetGPT
from basis_train.fleet.optim import FleetSGD
from basis_train.training import step as step_mod
from basis_train.training.step import TrainStep

CFG = GPTConfig(vocab_size=31, block_size=8, n_embd=16, n_head=2, n_layer=1, sketch=SketchConfig(rank=4))


class FakeGraph:
    """Records the captured step and replays it by calling it (what a CUDA graph does, eagerly)."""

    def __init__(self, fn, generators):
        self.fn, self.generators, self.replays = fn, list(generators), 0
        fn()  # graphs.capture replays once: the capturing call is a real step

    def replay(self):
        self.replays += 1
        self.fn()


def _fake_capture(monkeypatch):
    captured = []

    def capture(fn, generators=(), pool=None):
        captured.append(FakeGraph(fn, generators))
        return captured[-1]

    monkeypatch.setattr(graphs, "capture", capture)
    return captured


def test_train_step_measures_eagerly_then_captures_once_then_replays(monkeypatch):
    captured = _fake_capture(monkeypatch)
    model = build_gpt(CFG, seed=0)
    gen = torch.Generator().manual_seed(0)
    for m in model.sketched_modules():
        m.generator = gen
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    chunks = torch.randint(0, CFG.vocab_size, (6, CFG.block_size + 1))
    ts = TrainStep(model, model, opt, chunks, gen, torch.device("cpu"), torch.float32, use_graphs=True)
    peaks = []
    ts.step_peak = lambda fn, device: peaks.append(ts.dispatch.eager_steps) or fn() or 7
    for k in range(6):
        ts(torch.tensor([k % 6, (k + 1) % 6]))
        assert (ts.graph is None) == (k < 3), k  # capture on the first step after 3 eager ones
    assert "activation_bytes" in ts.measured and peaks == [step_mod._MEASURE_AT_STEP]
    assert len(captured) == 1 and captured[0].generators == [gen] and captured[0].replays == 2
    assert ts.loss_n == 6
    torch.testing.assert_close(ts.dispatch.idx_buf, torch.tensor([5, 0]))  # replays read the static buffer


def test_fleet_step_captures_with_every_sketching_generator(monkeypatch):
    captured = _fake_capture(monkeypatch)
    gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    members = [build_gpt(CFG, seed=s, method=m) for s, m in enumerate(("exact", "basis", "basis"))]
    fleet = FleetGPT(members, gens)
    opt = FleetSGD([fleet.p(n) for n in fleet.names], [[0.1] * 3 for _ in fleet.names], 0.0, 0.0)
    chunks = torch.randint(0, CFG.vocab_size, (6, CFG.block_size + 1))
    fs = FleetStep(fleet, opt, chunks, torch.device("cpu"), use_graphs=True)
    for k in range(5):
        fs(torch.full((3, 2), k % 6))
        assert (fs.graph is None) == (k < 3), k
        if k < 3:  # an eager step leaves no gradient behind (capture needs them unset)
            assert all(p.grad is None for p in opt.params), k
    assert len(captured) == 1 and captured[0].generators == gens[1:] and captured[0].replays == 1
    assert fs.loss_n == 5
