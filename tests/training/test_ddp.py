"""basis-train under torchrun on CPU (gloo, 2 processes): equivalence, BASIS, resume, one writer.

Every run is a real `python -m torch.distributed.run ... -m basis_train.cli` subprocess,
so these tests cover the launcher path users take. One thread per process keeps the
two processes from fighting over the CPUs (and matches what torchrun sets by default).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

TIMING = {"tokens_per_s", "ms_per_step", "eval_s", "wall_s", "train_s"}
BASIS = ["--steps", 40, "--eval-every", 10, "--checkpoint-every", 10, "--batch-size", 2]

pytestmark = [pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="needs torch.distributed with gloo"),
              pytest.mark.slow]  # torchrun subprocesses: minutes on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(nproc, *args):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={_free_port()}", "-m", "basis_train.cli"]
    return [*launcher, "--quiet", *map(str, args)]


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})


def torchrun(nproc, *args, **env):
    return subprocess.run(_cmd(nproc, *args), env=_env(**env), capture_output=True, text=True, timeout=300,
                          check=False)


def read(out):
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), metrics


def drop_timing(d):
    return {k: v for k, v in d.items() if k not in TIMING}


def model_state(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def basis_2proc(tmp_path_factory, small_corpus):
    """One uninterrupted 2-process BASIS run, shared by the tests that compare against it."""
    from conftest import TINY_YAML

    root = tmp_path_factory.mktemp("ddp")
    cfg = root / "tiny.yaml"
    cfg.write_text(TINY_YAML.format(corpus=small_corpus))
    out = root / "basis2"
    proc = torchrun(2, "--config", cfg, "--out", out, *BASIS)
    assert proc.returncode == 0, proc.stderr
    return cfg, out, proc


def test_two_processes_equal_one_process_with_double_batch(tmp_path, tiny_config):
    common = ["--config", tiny_config, "--method", "exact", "--steps", 8, "--eval-every", 4, "--checkpoint-every", 8]
    one = torchrun(1, *common, "--batch-size", 4, "--out", tmp_path / "one")  # WORLD_SIZE=1: plain single process
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *common, "--batch-size", 2, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    (s1, m1), (s2, m2) = read(tmp_path / "one"), read(tmp_path / "two")
    assert (s1["world_size"], s2["world_size"], s2["global_batch_size"]) == (1, 2, 4)
    assert s2["cuda_graphs"] is False
    for a, b in zip(m1, m2, strict=True):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    ref = model_state(tmp_path / "one")
    for k, v in model_state(tmp_path / "two").items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6, msg=k)
    c1 = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    c2 = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    assert c1["loader"] == c2["loader"]  # the same chunks were consumed


def test_basis_under_ddp_learns(basis_2proc):
    _, out, _ = basis_2proc
    summary, metrics = read(out)
    assert summary["method"] == "basis" and summary["world_size"] == 2 and summary["steps"] == 40
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] - 0.3, [m["train_loss"] for m in metrics]
    ranks = torch.load(out / "checkpoint.pt", weights_only=False)["ranks"]
    # Each process has its own sketch stream (one stream would mean identical bins in every process).
    assert len(ranks) == 2 and not torch.equal(ranks[0]["gen"], ranks[1]["gen"])


def test_only_process_zero_writes(basis_2proc):
    _, out, _ = basis_2proc
    # .lock: process 0's hold on the directory while it writes (training/rundir.py)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint.pt", "config.yaml", "metrics.jsonl",
                                                     "summary.json"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [10, 20, 30, 40]
    assert len(set(lines)) == len(lines)


def test_kill_then_resume_with_two_processes(tmp_path, basis_2proc):
    cfg, ref, _ = basis_2proc
    out = tmp_path / "killed"
    died = torchrun(2, "--config", cfg, "--out", out, *BASIS, BASIS_TRAIN_DIE_AT_STEP=25)
    assert died.returncode != 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 20
    # The global batch depends on the process count, so a 1-process resume is refused.
    single = [sys.executable, "-m", "basis_train.cli", "--quiet", "--config", cfg, "--out", out, *BASIS, "--resume"]
    wrong = subprocess.run(list(map(str, single)), env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert wrong.returncode == 2 and "--nproc_per_node=2" in wrong.stderr, wrong.stderr
    res = torchrun(2, "--config", cfg, "--out", out, *BASIS, "--resume")
    assert res.returncode == 0, res.stderr
    (sa, ma), (sb, mb) = read(out), read(ref)
    # gloo on CPU is deterministic and each process's sketch stream is restored: bitwise equal.
    assert drop_timing(sa) == drop_timing(sb)
    assert [drop_timing(m) for m in ma] == [drop_timing(m) for m in mb]
    ref_state = model_state(ref)
    for k, v in model_state(out).items():
        assert torch.equal(v, ref_state[k]), k


def test_sigint_stops_all_processes_with_one_checkpoint(tmp_path, tiny_config):
    out = tmp_path / "sig"
    args = ["--config", tiny_config, "--out", out, "--steps", 5000, "--eval-every", 1000, "--checkpoint-every", 10]
    proc = subprocess.Popen(_cmd(2, *args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, so a hung worker can be killed too
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # torchrun forwards it to both workers
    try:
        # Well inside torchrun's 30 s grace before SIGKILL: a process hanging at exit fails here.
        _, err = proc.communicate(timeout=25)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("a process did not exit within 25 s of SIGINT")
    assert proc.returncode != 0
    assert err.count("checkpoint saved") == 1, err  # process 0 alone reports
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    # Ranks compare stop flags only at checkpoints (every 10) and every 20 steps.
    assert 0 < step < 5000 and step % 10 == 0
