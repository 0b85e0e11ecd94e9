"""A run directory through faults: one writer at a time, a kill while evaluating loses no step,
a damaged metrics.jsonl is restored from the checkpoint with a warning, a user's own files are
named before a run writes among them."""

import json

import pytest

from basis_train.training.checkpoint import load_checkpoint
from basis_train.training.config import apply_overrides, load_config
from basis_train.training.errors import RunError
from basis_train.training.rundir import RunLock, claim_out_dir
from basis_train.training.train import Run

TIMING = {"tokens_per_s", "ms_per_step", "eval_s"}
# Evaluations at 4, 8 and 12, checkpoints at the same steps.
SHORT = {"train.steps": 12, "train.eval_every": 4, "train.checkpoint_every": 4}


class Killed(Exception):
    """Stands in for kill -9: raised inside the loop, so nothing after it runs."""


def losses(out):
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def cfg(tiny_config):
    return apply_overrides(load_config(tiny_config), SHORT)


@pytest.fixture()
def reference(cfg, tmp_path):
    Run(cfg, tmp_path / "whole", progress=False).run()
    return losses(tmp_path / "whole")


def _kill_while_evaluating(cfg, out, at_step):
    run = Run(cfg, out, progress=False)
    evaluate = run.evaluate

    class Dying:
        def __call__(self):
            if run.step == at_step:
                raise Killed
            return evaluate()

        def __getattr__(self, name):
            return getattr(evaluate, name)

    run.evaluate = Dying()
    with pytest.raises(Killed):
        run.run()


def test_a_kill_while_evaluating_loses_no_step_and_resume_evaluates_first(cfg, reference, tmp_path):
    out = tmp_path / "killed"
    _kill_while_evaluating(cfg, out, at_step=8)
    assert load_checkpoint(out)["step"] == 8  # written before the evaluation that was killed
    assert [r["step"] for r in losses(out)] == [4]
    Run(cfg, out, resume=True, progress=False).run()
    assert losses(out) == reference


def test_extending_a_finished_run_neither_warns_nor_evaluates_its_last_step_again(cfg, reference, tmp_path, capsys):
    """The last step's checkpoint precedes its evaluation; a later --resume with more steps must
    find that evaluation in the log rather than call the log damaged and evaluate again."""
    out = tmp_path / "short"
    Run(apply_overrides(cfg, {"train.steps": 8}), out, progress=False).run()
    capsys.readouterr()
    run = Run(cfg, out, resume=True, progress=False)
    evaluated = []
    evaluate = run.evaluate

    class Counting:
        def __call__(self):
            evaluated.append(run.step)
            return evaluate()

        def __getattr__(self, name):
            return getattr(evaluate, name)

    run.evaluate = Counting()
    run.run()
    assert "warning" not in capsys.readouterr().err
    assert evaluated == [12]
    assert losses(out) == reference


@pytest.mark.parametrize("damage", ["truncated", "garbage", "binary"])
def test_damaged_metrics_log_is_restored_from_the_checkpoint_with_a_warning(cfg, reference, tmp_path, capsys, damage):
    out = tmp_path / "killed"
    _kill_while_evaluating(cfg, out, at_step=12)
    log = out / "metrics.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2  # steps 4 and 8; the checkpoint is at 12, its record pending
    log.write_bytes({"truncated": lines[0] + lines[1][:20],
                     "garbage": lines[0] + b"{not json\n" + lines[1],
                     "binary": b"\x80\xff\x00" + lines[0]}[damage])
    capsys.readouterr()
    Run(cfg, out, resume=True, progress=False).run()
    err = capsys.readouterr().err
    assert "warning: " in err and "rewritten from the checkpoint's copy" in err, err
    assert losses(out) == reference


def test_a_second_writer_is_refused_naming_the_holder(cfg, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    held = RunLock(out)
    try:
        with pytest.raises(RunError, match=r"is being written by basis-train \(pid \d+ on "):
            Run(cfg, out, progress=False)
    finally:
        held.release()
    Run(cfg, out, progress=False).close()  # free again once the holder let go


def test_a_run_lets_go_of_its_directory_when_it_ends_or_fails(cfg, tmp_path):
    out = tmp_path / "run"
    _kill_while_evaluating(cfg, out, at_step=4)
    RunLock(out).release()  # the failed run let go
    Run(cfg, out, resume=True, progress=False).run()
    RunLock(out).release()


def test_a_users_own_files_are_named_before_a_run_writes_among_them(cfg, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / ".hidden").write_text("")
    claim_out_dir(cfg, out, resume=False).release()
    err = capsys.readouterr().err
    assert "warning: " in err and "(notes.txt)" in err and ".hidden" not in err, err
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_out_dir(cfg, empty, resume=False).release()
    assert capsys.readouterr().err == ""


def _saved_run(root, name, cfg, checkpoint=True):
    from basis_train.training.config import dump_config

    d = root / name
    d.mkdir(parents=True)
    dump_config(cfg, d / "config.yaml")
    if checkpoint:
        (d / "checkpoint.pt").write_bytes(b"x")
    return d


def test_resume_without_out_finds_the_run_whose_steps_were_raised(cfg, tmp_path):
    from basis_train.training.rundir import default_out_dir, find_run_to_resume

    runs = tmp_path / "runs"
    run = _saved_run(runs, "basis-r4-s0-aaaaaa", cfg)
    _saved_run(runs, "other-seed", apply_overrides(cfg, {"train.seed": 1}))
    _saved_run(runs, "no-checkpoint", apply_overrides(cfg, {"train.steps": 20}), checkpoint=False)
    longer = apply_overrides(cfg, {"train.steps": 30})
    default = runs / default_out_dir(longer, "").name  # --steps 30 hashes to a directory that does not exist
    assert find_run_to_resume(longer, default) == run
    with pytest.raises(RunError, match="no run of this config"):
        find_run_to_resume(apply_overrides(cfg, {"train.seed": 2}), default)
    _saved_run(runs, "a-copy", cfg)
    with pytest.raises(RunError, match="2 runs of this config .*a-copy, basis-r4-s0-aaaaaa"):
        find_run_to_resume(longer, default)


def test_resume_with_out_and_no_config_takes_the_runs_own_config(cfg, tmp_path):
    from basis_train.cli.train import resolve_config

    run = _saved_run(tmp_path, "run", apply_overrides(cfg, {"sketch.rank": 3}))
    resumed = resolve_config(None, {"steps": 40}, run_dir=str(run))
    assert resumed == apply_overrides(cfg, {"sketch.rank": 3, "train.steps": 40})
    assert resolve_config(None, {}, run_dir=None).model.n_layer != cfg.model.n_layer  # paper defaults otherwise
