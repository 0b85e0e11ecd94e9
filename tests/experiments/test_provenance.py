"""What result files record of how they were made: the command to type again, the commit."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from basis_train.experiments import provenance


def test_a_script_run_by_its_path_is_recorded_as_python_path(monkeypatch):
    # scripts/*.py have no module spec: the command is `python PATH ARGS`, quoted as a shell reads it
    monkeypatch.setattr(sys, "argv", ["scripts/speed_gpt2.py", "out.json", "--rows", "0,5", "--out", "a b"])
    assert provenance.command_line(None, "/repo/scripts/speed_gpt2.py") == \
        "python scripts/speed_gpt2.py out.json --rows 0,5 --out 'a b'"


def test_the_commit_is_the_checkout_s_and_none_outside_one(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True).returncode != 0:
        pytest.skip("a copy without its .git: no commit to compare with")
    commit = provenance.git_commit(repo)
    assert re.fullmatch(r"[0-9a-f]{4,40}", commit)
    assert subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.startswith(commit)
    assert provenance.git_commit(tmp_path) is None


def test_the_cpu_is_named_by_its_model_not_its_architecture(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance.platform, "machine", lambda: "x86_64")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\n")
    assert provenance.cpu_name(info) == "x86_64, AMD EPYC 7B13"
    info.write_text("processor\t: 0\n")  # no model name line (some ARM kernels)
    assert provenance.cpu_name(info) == "x86_64"
    monkeypatch.setattr(provenance.platform, "processor", lambda: "arm")
    assert provenance.cpu_name(tmp_path / "absent") == "arm"
