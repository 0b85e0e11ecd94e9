"""Too old a torch is refused with one line; CUDA-graph generator registration follows the torch version."""

from contextlib import contextmanager

import pytest
import torch

from basis_train.cli import bench as bench_cli
from basis_train.cli import train as train_cli
from basis_train.core import graphs


@pytest.mark.parametrize("main", [train_cli.main, bench_cli.main])
def test_old_torch_is_one_line_and_exit_2(monkeypatch, capsys, main):
    monkeypatch.setattr("basis_train.torch_floor.installed_torch", lambda: "2.10.1+cu126")
    monkeypatch.setattr("sys.argv", ["basis-train", "--help"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: basis-train needs torch >= 2.11; this is torch 2.10.1+cu126 (pip install -U torch)"]


def test_no_torch_is_one_line(monkeypatch):
    from basis_train.torch_floor import torch_problem

    monkeypatch.setattr("basis_train.torch_floor.installed_torch", lambda: None)
    assert torch_problem() == "basis-train needs torch >= 2.11, and none is installed (pip install torch)"


@pytest.mark.parametrize("command", ["train", "compare", "reproduce", "diagnose", "bench"])
def test_help_starts_without_importing_torch(command):
    """Importing torch takes 1-2 s: no command's --help waits for it."""
    import subprocess
    import sys

    code = (f"import sys; from basis_train.cli.{command} import main\ntry: main(['--help'])\n"
            "except SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_supported_torch_passes(monkeypatch, capsys):
    monkeypatch.setattr("basis_train.torch_floor.installed_torch", lambda: "2.11.0+cu130")
    monkeypatch.setattr("sys.argv", ["basis-train", "--help"])
    with pytest.raises(SystemExit) as exc:
        train_cli.main()
    assert exc.value.code == 0 and "--rank" in capsys.readouterr().out


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on a CPU machine and records registrations."""

    registered: list

    def __init__(self):
        self.registered = []

    def register_generator_state(self, gen):
        self.registered.append(gen)

    def replay(self):
        pass


class _GraphWithoutRegistration:
    def replay(self):
        pass


@contextmanager
def _fake_capture(graph, pool=None):
    yield


@pytest.mark.parametrize("version,registers", [("2.13.0+cu130", True), ("2.14.1+cu130", False)])
def test_capture_registers_the_generator_only_where_torch_does_not(monkeypatch, version, registers):
    monkeypatch.setattr(torch, "__version__", version)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _fake_capture)
    gen, steps = torch.Generator(), []
    g = graphs.capture(lambda: steps.append(1), generators=[gen])
    assert steps == [1]
    assert g.registered == ([gen] if registers else [])


def test_missing_register_generator_state_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _GraphWithoutRegistration)
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    with pytest.raises(graphs.GraphSupportError, match="register_generator_state.*--no-cuda-graphs"):
        graphs.check_graph_support()
    monkeypatch.setattr(torch, "__version__", "2.14.0")  # registers generators itself
    graphs.check_graph_support()
