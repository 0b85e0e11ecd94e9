"""core/kernels.optional: the one lazy import of a kernel module, with one warning where it is missing."""

import importlib

import pytest

from basis_train.core import kernels


def test_a_missing_kernel_module_warns_and_gives_false(monkeypatch):
    real = importlib.import_module

    def no_triton(name, *a, **kw):
        if name.startswith("basis_train.core.kernels."):
            raise ImportError("No module named 'triton'")
        return real(name, *a, **kw)

    monkeypatch.setattr(kernels.importlib, "import_module", no_triton)
    with pytest.warns(UserWarning, match="Triton is not available .*falls back"):
        assert kernels.optional("fleet_sgd", "it falls back") is False


def test_an_available_kernel_module_is_returned():
    pytest.importorskip("triton")
    assert kernels.optional("fleet_bins", "unused").__name__ == "basis_train.core.kernels.fleet_bins"
