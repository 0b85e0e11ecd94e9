"""The command line as a newcomer meets it: every bad input is one line and exit 2, config booleans
survive unless their flag is given, help text is complete at 80 columns, configs resolve anywhere."""

import os
import typing
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from basis_train.cli import compare, diagnose, reproduce
from basis_train.cli import train as cli
from basis_train.cli.train import CLI_FLAGS
from basis_train.training import config as config_mod
from basis_train.training.config import Config, dump_config, load_config

runner = CliRunner()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
root_skip = pytest.mark.skipif(IS_ROOT, reason="root ignores file modes; the path-under-a-file cases cover it")


def _file(tmp: Path, name="a-file", data=b"x") -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def _read_only_dir(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    path.chmod(0o555)
    return path


def _run_dir(tmp: Path, cfg_path: Path, checkpoint: bytes | None, finished: bool = False) -> Path:
    """An output dir as basis-train leaves it: config.yaml, maybe a (here corrupt) checkpoint."""
    out = tmp / "run"
    out.mkdir()
    dump_config(load_config(cfg_path), out / "config.yaml")
    if checkpoint is not None:
        (out / "checkpoint.pt").write_bytes(checkpoint)
    if finished:
        (out / "summary.json").write_text("{}")
    return out


_HELD = []  # locks the table's builders take, held until the test process ends


def _held_by_another_writer(tmp: Path, cfg_path: Path) -> Path:
    from basis_train.training.rundir import RunLock

    out = _run_dir(tmp, cfg_path, b"ckpt")
    _HELD.append(RunLock(out))
    return out


def _empty_dir(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _truncated_checkpoint(tmp: Path) -> bytes:
    torch.save({"step": 3, "model": {"w": torch.randn(4096)}}, tmp / "real.pt")
    data = (tmp / "real.pt").read_bytes()
    return data[: len(data) // 2]


def _train(t, c, *args):
    return "train", ["--quiet", "--config", str(c), *map(str, args)]


def _cache_at(m, path: Path) -> Path:
    m.setenv("BASIS_TRAIN_CACHE", str(path))
    return path


def _full_disk(m, cache: Path) -> str:
    """The token cache's disk fills: numpy's short write says only "N requested and M written"."""
    import numpy as np

    def short_write(file, arr, *args, **kwargs):
        Path(file).write_bytes(b"\0" * (arr.nbytes // 2))
        raise OSError(f"{arr.nbytes} requested and {arr.nbytes // 2} written")

    _cache_at(m, cache)
    m.setattr(np, "save", short_write)
    return f"cannot write the token cache {cache}/tokens/files-"


# (command, argv builder, substring of the one error line); the builder gets (tmp_path, tiny config, monkeypatch).
BAD_INPUTS = {
    "train: non-UTF-8 --config": lambda t, c, m: ("train", ["--config", str(_file(t, "c.yaml", b"\xff\xfe\x00t"))],
                                                   "not a UTF-8 text file"),
    "train: duplicate YAML key": lambda t, c, m: ("train", ["--config", str(_file(
        t, "d.yaml", b"train:\n  steps: 3\n  steps: 4\n"))], "duplicate key 'steps'"),
    "train: --steps beyond a billion": lambda t, c, m: (
        *_train(t, c, "--steps", "99999999999999999999999", "--out", t / "run"), "train.steps must be <= 1,000,000,000"),
    "train: empty --data-files": lambda t, c, m: (
        *_train(t, c, "--data-files", "", "--out", t / "run"), "data.data_files is empty"),
    "train: empty config file": lambda t, c, m: (
        "train", ["--config", str(_file(t, "e.yaml", b"# nothing yet\n")), "--out", str(t / "run")], "sets nothing"),
    "train: --data-files a directory": lambda t, c, m: (
        *_train(t, c, "--data-files", _empty_dir(t), "--out", t / "run"), "/**' takes every file under it"),
    "train: --out under a regular file": lambda t, c, m: (*_train(t, c, "--out", _file(t) / "run"), "is a file"),
    "train: --out is an existing file": lambda t, c, m: (*_train(t, c, "--out", _file(t)), "is an existing file"),
    "train: read-only --out": pytest.param(
        lambda t, c, m: (*_train(t, c, "--out", _read_only_dir(t, "ro")), "not writable"), marks=root_skip),
    "train: BASIS_TRAIN_CACHE under a regular file": lambda t, c, m: (
        *_train(t, c, "--out", t / "run"), _cache_at(m, _file(t) / "cache") and "BASIS_TRAIN_CACHE"),
    "train: read-only BASIS_TRAIN_CACHE": pytest.param(lambda t, c, m: (
        *_train(t, c, "--out", t / "run"), _cache_at(m, _read_only_dir(t, "cache")) and "BASIS_TRAIN_CACHE"),
        marks=root_skip),
    "train: token cache on a full disk": lambda t, c, m: (
        *_train(t, c, "--out", t / "run"), _full_disk(m, t / "cache")),
    "train: --resume, truncated checkpoint": lambda t, c, m: (
        *_train(t, c, "--resume", "--out", _run_dir(t, c, _truncated_checkpoint(t))), "not a readable checkpoint"),
    "train: --resume, random-bytes checkpoint": lambda t, c, m: (
        *_train(t, c, "--resume", "--out", _run_dir(t, c, os.urandom(4096))), "not a readable checkpoint"),
    "train: --resume, zero-byte checkpoint": lambda t, c, m: (
        *_train(t, c, "--resume", "--out", _run_dir(t, c, b"")), "not a readable checkpoint"),
    "train: --resume, no such directory": lambda t, c, m: (
        *_train(t, c, "--resume", "--out", t / "nothing"), "does not exist"),
    "train: --resume, empty directory": lambda t, c, m: (
        *_train(t, c, "--resume", "--out", _empty_dir(t)), "holds no checkpoint.pt"),
    # A run that failed before its first checkpoint: both ways name --overwrite (each used to point at the other).
    "train: --resume, no checkpoint": lambda t, c, m: (
        *_train(t, c, "--resume", "--out", _run_dir(t, c, None)), "start it again with --overwrite"),
    "train: rerun of a run that stopped before its first checkpoint": lambda t, c, m: (
        *_train(t, c, "--out", _run_dir(t, c, None)), "start it again with --overwrite"),
    "train: rerun of an unfinished run": lambda t, c, m: (
        *_train(t, c, "--out", _run_dir(t, c, b"ckpt")), "--resume or replace it with --overwrite"),
    "train: rerun of a finished run": lambda t, c, m: (
        *_train(t, c, "--out", _run_dir(t, c, None, finished=True)), "already holds a finished run"),
    "train: --resume while another writer holds --out": lambda t, c, m: (
        *_train(t, c, "--resume", "--out", _held_by_another_writer(t, c)), "is being written by basis-train (pid"),
    "train: --overwrite while another writer holds --out": lambda t, c, m: (
        *_train(t, c, "--overwrite", "--out", _held_by_another_writer(t, c)), "is being written by basis-train (pid"),
    "train: --resume and --overwrite": lambda t, c, m: (
        *_train(t, c, "--resume", "--overwrite", "--out", t / "x"), "exclude each other"),
    "train: unknown option": lambda t, c, m: ("train", ["--stpes", "3"], "No such option"),
    "train: --head foo": lambda t, c, m: (*_train(t, c, "--head", "foo", "--out", t / "run"), "model.head"),
    "train: --head-kernel foo": lambda t, c, m: (
        *_train(t, c, "--head-kernel", "foo", "--out", t / "run"), "model.head_kernel must be one of"),
    "train: --head-kernel cce on CPU": lambda t, c, m: (
        *_train(t, c, "--head-kernel", "cce", "--device", "cpu", "--out", t / "run"), "cce (Cut Cross-Entropy) needs a CUDA"),
    "compare: non-UTF-8 --config": lambda t, c, m: (
        "compare", ["--config", str(_file(t, "c.yaml", b"\x80\x81")), "--out", str(t / "g")], "not a UTF-8"),
    "compare: --seeds 0": lambda t, c, m: ("compare", ["--seeds", "0", "--out", str(t / "g")], "--seeds must be >= 1"),
    "compare: --jobs 0": lambda t, c, m: ("compare", ["--jobs", "0", "--out", str(t / "g")], "--jobs must be >= 1"),
    "reproduce: --seeds 0": lambda t, c, m: ("reproduce", ["--seeds", "0", "--out", str(t / "g")], "--seeds must"),
    "diagnose: random-bytes --checkpoint": lambda t, c, m: ("diagnose", [
        "--config", str(c), "--checkpoint", str(_file(t, "bad.pt", os.urandom(1000))), "--out", str(t / "d")],
        "not a readable checkpoint"),
    "diagnose: zero-byte --checkpoint": lambda t, c, m: ("diagnose", [
        "--config", str(c), "--checkpoint", str(_file(t, "empty.pt", b"")), "--out", str(t / "d")],
        "not a readable checkpoint"),
}
MAINS = {"train": cli.main, "compare": compare.main, "reproduce": reproduce.main, "diagnose": diagnose.main}


@pytest.mark.parametrize("build", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(build, tmp_path, tiny_config, monkeypatch, capsys):
    command, argv, needle = build(tmp_path, tiny_config, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        MAINS[command](argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], err
    assert "Traceback" not in out + err


def test_failed_resume_leaves_the_checkpoint_alone(tmp_path, tiny_config, capsys):
    out = _run_dir(tmp_path, tiny_config, b"")
    with pytest.raises(SystemExit):
        cli.main(["--quiet", "--config", str(tiny_config), "--out", str(out)])
    assert (out / "checkpoint.pt").exists()  # refusing to overwrite means not touching it either


# --------------------------------------------------------------------------- booleans

BOOL_FLAGS = {name: key for name, key in CLI_FLAGS.items()
              if typing.get_type_hints(config_mod.SECTIONS[key.split(".")[0]])[key.split(".")[1]] is bool}


def test_every_boolean_option_of_basis_train_is_a_config_override():
    """A bool option with a False/True default would always override the YAML: only None may."""
    import inspect

    command_only = {"resume", "overwrite", "quiet"}
    for name, p in inspect.signature(cli.train_cmd).parameters.items():
        if "bool" in str(p.annotation) and name not in command_only:
            assert name in BOOL_FLAGS and p.default.default is None, name
    assert set(BOOL_FLAGS) == {"invariant_scalars", "cuda_graphs", "compile"}


@pytest.mark.parametrize("name", sorted(BOOL_FLAGS))
def test_boolean_from_yaml_survives_unless_the_flag_is_given(name, tmp_path, monkeypatch):
    section, key = BOOL_FLAGS[name].split(".")
    default = getattr(getattr(Config(), section), key)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(f"{section}:\n  {key}: {str(not default).lower()}\n")
    seen = []

    def fake_train(cfg, **kw):
        seen.append(getattr(getattr(cfg, section), key))
        return {"final_val_loss": 1.0, "final_train_loss": 1.0, "activation_bytes": 0, "tokens_per_s": 1.0}

    monkeypatch.setattr("basis_train.training.train.train", fake_train)
    flag = "--" + name.replace("_", "-")
    for i, (args, expected) in enumerate([([], not default), ([flag if default else "--no-" + flag[2:]], default),
                                          ([flag if not default else "--no-" + flag[2:]], not default)]):
        res = runner.invoke(cli.train_app, ["--quiet", "--config", str(yaml_path), "--out", str(tmp_path / f"o{i}"),
                                            *args])
        assert res.exit_code == 0, res.output
        assert seen[-1] is expected, (args, seen)


# --------------------------------------------------------------------------- help

APPS = {"basis-train": cli.train_app, "basis-compare": compare.compare_app,
        "basis-reproduce": reproduce.reproduce_app, "basis-diagnose": diagnose.app}


@pytest.mark.parametrize("prog", list(APPS))
def test_help_names_every_option_with_help_and_default_at_80_columns(prog):
    import typer.main

    res = runner.invoke(APPS[prog], ["--help"], env={"COLUMNS": "80"}, prog_name=prog)
    assert res.exit_code == 0, res.output
    assert "…" not in res.output and max(map(len, res.output.splitlines())) <= 80
    for param in typer.main.get_command(APPS[prog]).params:
        if param.name == "help":
            continue
        for opt in [*param.opts, *param.secondary_opts]:
            assert opt in res.output, (prog, opt)
        assert param.help, (prog, param.name)
        # click prints "[default: x]" itself, except for a bare on-flag (--resume): its help says it
        shows_default = param.show_default and param.default is not None and (not param.is_flag or param.secondary_opts)
        assert shows_default or "[default:" in param.help, (prog, param.name, param.help)


# --------------------------------------------------------------------------- configs

def test_shipped_configs_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny", "tiny.yaml", "configs/tiny.yaml"):
        assert load_config(name).model.n_embd == 32, name
    # the shipped file (it pins data.shuffle false, which the defaults leave unset: test_config.py)
    assert load_config("configs/paper.yaml") == load_config(config_mod.SHIPPED_CONFIGS / "paper.yaml")
    assert {"gpt2-small", "paper", "tiny"} <= set(config_mod.shipped_configs())


def test_configs_dir_is_the_packaged_one():
    """Policy: the configs live in the package (basis_train/configs, package data); the documented
    configs/ path of a checkout is a link to it, so the two can never drift apart."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    assert (root / "configs").is_symlink()
    assert (root / "configs").resolve() == config_mod.SHIPPED_CONFIGS
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert "configs/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["basis_train"]


def test_a_choice_error_lists_the_choices_once(tmp_path, tiny_config, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--quiet", "--config", str(tiny_config), "--head", "foo", "--out", str(tmp_path / "r")])
    line = capsys.readouterr().err.strip()
    assert line.count("fused") == 1 and line.count("plain") == 1, line


def test_compare_says_a_ctrl_c_is_not_a_failure():
    from basis_train.experiments.compare import VARIANT_HELP, run_outcome

    assert run_outcome(0) == "done" and run_outcome(1) == "FAILED rc=1"
    assert run_outcome(130).startswith("interrupted") and "FAILED" not in run_outcome(130)
    assert VARIANT_HELP.startswith("comma list of all,")  # no stray comma before the first
