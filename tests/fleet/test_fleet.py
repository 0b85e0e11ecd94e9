"""Fleet mode (fleet/loop.py): a member is the same experiment as its single run.

The proof: members trained together as one batched model log the losses that single
`basis-train` runs (training/train.py's Run, the code behind the command) log with the
same configs, step by step, and end with the same weights. A small vocabulary on random
tokens keeps 50 steps of 3 single runs plus a fleet within seconds on a CPU; the end-to-end
test at the bottom runs the real data pipeline and the CLI's grid.
"""

import json

import numpy as np
import pytest
import torch

from basis_train.data.loaders import Splits
from basis_train.fleet import loop as fleet_mod
from basis_train.fleet.loop import fleet_key, fleet_refusal, train_fleet
from basis_train.fleet.model import FleetGPT
from basis_train.training.config import apply_overrides, load_config
from basis_train.training.train import Run

VOCAB = 97
BASE = {"model.vocab_size": VOCAB, "model.block_size": 32, "model.n_embd": 32, "model.n_layer": 2,
        "train.batch_size": 2,  # 64 rows a step, so R = 32 still sketches
        "train.steps": 50, "train.eval_every": 1, "train.checkpoint_every": 25, "train.device": "cpu"}
# The proof: exact, BASIS R = 8, BASIS R = 32 with uniform hashing.
TRIO = [{"train.method": "exact", "train.seed": 0},
        {"sketch.rank": 8, "train.seed": 1},
        {"sketch.rank": 32, "sketch.hashing": "uniform", "train.seed": 2}]
TIMING = {"tokens_per_s", "ms_per_step", "eval_s", "wall_s", "train_s", "fleet_size", "by_rank", "cuda_graphs"}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core machine torch's CPU index_add_ (the uniform sketch)
    was seen 500x slower with two threads (24 ms against 0.05 ms). Both sides of every
    comparison run under the same setting."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def random_splits(seed=0):
    rng = np.random.default_rng(seed)
    train, val = rng.integers(0, VOCAB, 40_000), rng.integers(0, VOCAB, 33 * 40)
    info = {"protocol": "heldout", "n_docs": 2, "n_train_docs": 1, "n_val_docs": 1,
            "n_train_tokens": len(train), "n_val_tokens": len(val)}
    return Splits(train.astype(np.uint16), val.astype(np.uint16), info), "random tokens"


def configs(members, **extra):
    base = apply_overrides(load_config(None), {**BASE, **extra})
    return [apply_overrides(base, m) for m in members]


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["model"]


def rel(a, b):
    return abs(a - b) / abs(a)


def singles_and_fleet(tmp_path, cfgs, splits):
    for i, c in enumerate(cfgs):
        Run(c, tmp_path / f"single{i}", splits=splits, progress=False).run()
    summaries = train_fleet([(c, tmp_path / f"fleet{i}") for i, c in enumerate(cfgs)], splits=splits, progress=False)
    return summaries


def assert_same_runs(tmp_path, n, tol=1e-5):
    for i in range(n):
        single, fleet = metrics(tmp_path / f"single{i}"), metrics(tmp_path / f"fleet{i}")
        assert [r["step"] for r in single] == [r["step"] for r in fleet]
        for a, b in zip(single, fleet):
            assert rel(a["train_loss"], b["train_loss"]) < tol, (i, a["step"], a["train_loss"], b["train_loss"])
            assert rel(a["val_loss"], b["val_loss"]) < tol, (i, a["step"], a["val_loss"], b["val_loss"])
        ws, wf = weights(tmp_path / f"single{i}"), weights(tmp_path / f"fleet{i}")
        assert ws.keys() == wf.keys()
        for k in ws:
            torch.testing.assert_close(wf[k], ws[k], rtol=1e-4, atol=1e-5, msg=f"member {i} {k}")


@pytest.mark.parametrize("batched_head", [False, True], ids=["per-member-head", "batched-head"])
def test_fleet_of_three_equals_three_single_runs(tmp_path, monkeypatch, batched_head):
    """batched-head: the one-chunk batched fused head that CUDA fleets use, forced on here."""
    monkeypatch.setattr(FleetGPT, "batched_head", batched_head)
    splits = random_splits()
    cfgs = configs(TRIO)
    summaries = singles_and_fleet(tmp_path, cfgs, splits)
    assert_same_runs(tmp_path, 3)
    # Losses actually move and members differ: the comparison is not between constants.
    logs = [metrics(tmp_path / f"fleet{i}") for i in range(3)]
    assert all(m[-1]["train_loss"] < m[0]["train_loss"] - 0.01 for m in logs)
    assert len({m[-1]["train_loss"] for m in logs}) == 3
    # Same summary fields and values, apart from timing and the fleet's own note.
    for i, s in enumerate(summaries):
        single = json.loads((tmp_path / f"single{i}" / "summary.json").read_text())
        fleet = json.loads((tmp_path / f"fleet{i}" / "summary.json").read_text())
        assert fleet == s and fleet["fleet_size"] == 3
        assert set(single) == set(fleet) - {"fleet_size"}
        for k in set(single) - TIMING - {"final_val_loss", "final_train_loss"}:
            assert fleet[k] == single[k], k
        # A member's memory fields are its single run's (measured on a single-run probe).
        assert fleet["activation_bytes"] == single["activation_bytes"] > 0
        assert (tmp_path / f"fleet{i}" / "config.yaml").read_text() == (tmp_path / f"single{i}" / "config.yaml").read_text()


def test_variants_plain_head_and_lr_factors(tmp_path):
    """Sketched attention (layers=all), no scalars, lam 0, gaussian, lr factors, plain head, and
    shuffled batches (each seed its own order: every member reads its own loader)."""
    members = [{"train.method": "exact", "optim.lr_scale_sketched": 0.9801},
               {"sketch.rank": 4, "sketch.layers": "all", "optim.lr_factor": 2.0},
               {"sketch.rank": 16, "sketch.invariant_scalars": False, "sketch.lam": 0.0, "train.seed": 3},
               {"sketch.rank": 8, "sketch.hashing": "gaussian", "optim.lr_factor": 0.5}]
    cfgs = configs(members, **{"model.head": "plain", "train.steps": 12, "train.eval_every": 4,
                               "train.checkpoint_every": 6, "data.shuffle": True})
    singles_and_fleet(tmp_path, cfgs, random_splits())
    assert_same_runs(tmp_path, len(members))


def drop_timing(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def test_checkpoints_between_evaluations_are_off_the_fleet_clock(tmp_path, slow_checkpoint_saves):
    """As a single run's (tests/training/test_throughput.py): checkpoints written between two evaluations
    are not training time."""
    slow_checkpoint_saves(0.5)
    cfgs = configs(TRIO[1:], **{"train.steps": 4, "train.eval_every": 4, "train.checkpoint_every": 1})
    members = [(c, tmp_path / f"m{i}") for i, c in enumerate(cfgs)]
    train_fleet(members, splits=random_splits(), progress=False)
    summary = json.loads((tmp_path / "m0" / "summary.json").read_text())
    # 3 checkpoints of 2 members, 3 s, fall inside the interval; 4 steps of this fleet take far less
    assert summary["train_s"] < 1.5, summary["train_s"]


def test_killed_fleet_resumes_to_the_same_runs(tmp_path, monkeypatch):
    """A fleet killed after its step-6 checkpoint continues to the same numbers (on CPU, bit for bit),
    and a member's checkpoint continues as a single run. Head chunks of 16 rows (64 rows a step):
    the fleet's per-member fused head, not the one-chunk batched one."""
    splits = random_splits()
    cfgs = configs(TRIO[1:], **{"train.steps": 12, "train.eval_every": 3, "train.checkpoint_every": 6,
                                "model.head_chunk": 16})
    members = [(c, tmp_path / f"fleet{i}") for i, c in enumerate(cfgs)]
    train_fleet(members, splits=splits, progress=False)

    stopped = [(c, tmp_path / f"stopped{i}") for i, c in enumerate(cfgs)]
    step, calls = fleet_mod.FleetStep.__call__, []

    def dying(self, idx):  # the process dies during step 9, after the step-6 checkpoint
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        step(self, idx)

    monkeypatch.setattr(fleet_mod.FleetStep, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        train_fleet(stopped, splits=splits, progress=False)
    monkeypatch.undo()
    assert [r["step"] for r in metrics(stopped[0][1])] == [3, 6]
    train_fleet(stopped, splits=splits, progress=False)
    for (_, a), (_, b) in zip(members, stopped):
        assert drop_timing(metrics(b)) == drop_timing(metrics(a))
        for k, v in weights(a).items():
            assert torch.equal(weights(b)[k], v), k
    # A member's checkpoint is a single run's: basis-train --resume --steps 15 continues it.
    longer = apply_overrides(cfgs[0], {"train.steps": 15})
    Run(longer, tmp_path / "fleet0", resume=True, splits=splits, progress=False).run()
    Run(cfgs[0], tmp_path / "alone", splits=splits, progress=False).run()
    Run(longer, tmp_path / "alone", resume=True, splits=splits, progress=False).run()
    for a, b in zip(metrics(tmp_path / "alone"), metrics(tmp_path / "fleet0"), strict=True):
        assert rel(a["train_loss"], b["train_loss"]) < 1e-5


def test_a_diverging_member_stops_alone(tmp_path):
    """A member whose loss goes non-finite stops (last good checkpoint kept, no summary); its NaNs
    never reach the others, which still equal their single runs."""
    splits = random_splits()
    cfgs = configs([{"sketch.rank": 8}, {"sketch.rank": 8, "optim.lr_factor": 3000.0}],
                   **{"train.steps": 12, "train.eval_every": 3, "train.checkpoint_every": 3})
    errors = {}
    summaries = train_fleet([(c, tmp_path / f"fleet{i}") for i, c in enumerate(cfgs)], splits=splits, progress=False,
                            errors=errors)
    assert summaries[0] is not None and summaries[1] is None and "non-finite" in errors[1] and 0 not in errors
    assert not (tmp_path / "fleet1" / "summary.json").exists() and (tmp_path / "fleet1" / "checkpoint.pt").exists()
    Run(cfgs[0], tmp_path / "single0", splits=splits, progress=False).run()
    assert_same_runs(tmp_path, 1)


def test_a_member_its_run_refuses_is_left_out(tmp_path):
    """A member dir holding another config's checkpoint fails alone (as that run would), the rest train."""
    splits = random_splits()
    cfgs = configs(TRIO[:2], **{"train.steps": 3, "train.eval_every": 3})
    other = apply_overrides(cfgs[0], {"optim.lr": 0.5})
    Run(other, tmp_path / "fleet0", splits=splits, progress=False).run()
    errors = {}
    summaries = train_fleet([(c, tmp_path / f"fleet{i}") for i, c in enumerate(cfgs)], splits=splits,
                            progress=False, log=lambda line: None, errors=errors)
    assert summaries[0] is None and "different config" in errors[0]
    assert summaries[1] is not None and summaries[1]["fleet_size"] == 1


def test_who_may_share_a_fleet():
    a, b, c, d = configs([{}, {"train.method": "exact", "train.seed": 4, "sketch.rank": 1, "optim.lr_factor": 2.0},
                          {"model.n_embd": 64}, {"optim.name": "adamw"}])
    assert fleet_key(a) == fleet_key(b) != fleet_key(c)
    assert fleet_refusal(a) is None and "adamw" in fleet_refusal(d)
    # the batched model is the paper's: a gpt2 run (fused qkv, tied head, decay on matrices only) runs alone
    (e,) = configs([{"model.arch": "gpt2"}])
    assert "model.arch gpt2" in fleet_refusal(e)


def test_grid_grouping_by_shape_and_start_step(tmp_path):
    """--fleet groups a grid's runs by fleet key and the step they resume from; AdamW runs alone."""
    from types import SimpleNamespace

    from basis_train.fleet.grid import group
    from basis_train.training.checkpoint import save_checkpoint

    a, b, wide, adamw = configs([{}, {"train.seed": 1}, {"model.n_embd": 64}, {"optim.name": "adamw"}])
    jobs = [SimpleNamespace(out=tmp_path / name) for name in ("a", "b", "wide", "adamw", "resumed")]
    for j in jobs:
        j.out.mkdir()
    save_checkpoint(tmp_path / "resumed", {"step": 6})
    fleets, alone = group(jobs, dict(zip([j.out for j in jobs], [a, b, wide, adamw, b])))
    assert [[j.out.name for j in f] for f in fleets] == [["a", "b"], ["wide"], ["resumed"]]
    assert [j.out.name for j in alone] == ["adamw"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_fleet_matches_eager_fleet(tmp_path):
    """On a GPU: the captured fleet step gives the eager fleet's losses (same kernels, replayed)."""
    splits = random_splits()
    cfgs = [apply_overrides(c, {"train.device": "cuda", "train.steps": 30, "train.eval_every": 10})
            for c in configs(TRIO)]
    graphed = train_fleet([(c, tmp_path / f"g{i}") for i, c in enumerate(cfgs)], splits=splits, progress=False)
    eager_cfgs = [apply_overrides(c, {"train.cuda_graphs": False}) for c in cfgs]
    eager = train_fleet([(c, tmp_path / f"e{i}") for i, c in enumerate(eager_cfgs)], splits=splits, progress=False)
    assert all(s["cuda_graphs"] for s in graphed) and not any(s["cuda_graphs"] for s in eager)
    for i in range(3):
        for a, b in zip(metrics(tmp_path / f"g{i}"), metrics(tmp_path / f"e{i}")):
            assert rel(a["train_loss"], b["train_loss"]) < 1e-5 and rel(a["val_loss"], b["val_loss"]) < 1e-5
    for i, c in enumerate(cfgs):  # and a single graphed basis-train run
        Run(c, tmp_path / f"s{i}", splits=splits, progress=False).run()
        for a, b in zip(metrics(tmp_path / f"s{i}"), metrics(tmp_path / f"g{i}")):
            assert rel(a["train_loss"], b["train_loss"]) < 1e-4, (i, a, b)


@pytest.mark.slow
def test_compare_fleet_end_to_end(tmp_path, tiny_config):
    """basis-compare --fleet on the real data pipeline: one fleet, run directories a single
    basis-train run reproduces, the usual report, finished runs skipped on a rerun."""
    from typer.testing import CliRunner

    from basis_train.cli.compare import compare_app
    from basis_train.training.train import train

    out = tmp_path / "cmp"
    args = ["--config", str(tiny_config), "--ranks", "4", "--seeds", "2", "--steps", "4", "--eval-every", "2",
            "--out", str(out), "--variants", "uniform,lr-matched", "--fleet", "--quiet"]
    res = CliRunner().invoke(compare_app, args)
    assert res.exit_code == 0, res.output
    assert "fleet of 8 runs" in res.output and "runs to do" not in res.output  # nothing ran alone
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 4
    runs = out / "runs"
    assert not list(runs.glob("*/checkpoint.pt"))  # deleted once finished, as without --fleet
    for name in ("exact_lr-matched-s1", "basis_R4_uniform-s0"):
        cfg = load_config(runs / name / "config.yaml")
        train(cfg, tmp_path / name, progress=False)
        for a, b in zip(metrics(tmp_path / name), metrics(runs / name), strict=True):
            assert rel(a["train_loss"], b["train_loss"]) < 1e-5 and rel(a["val_loss"], b["val_loss"]) < 1e-5
        single = json.loads((tmp_path / name / "summary.json").read_text())
        fleet = json.loads((runs / name / "summary.json").read_text())
        assert fleet["config_hash"] == single["config_hash"] and fleet["fleet_size"] == 8
        assert fleet["activation_bytes"] == single["activation_bytes"]
    res = CliRunner().invoke(compare_app, args)
    assert res.exit_code == 0 and res.output.count("skip (finished)") == 8, res.output
    res = CliRunner().invoke(compare_app, [*args, "--report-only"])
    assert res.exit_code == 0, res.output
