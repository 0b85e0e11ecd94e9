"""core/kernels.KernelRoute: the one lazy import of a kernel module, with one warning where it is missing."""

import importlib
import warnings

import pytest

from basis_train.core import kernels


def _no_triton(monkeypatch):
    real, tried = importlib.import_module, []

    def no_triton(name, *a, **kw):
        if name.startswith("basis_train.core.kernels.") or name.startswith("basis_train.fleet.kernels."):
            tried.append(name)
            raise ImportError("No module named 'triton'")
        return real(name, *a, **kw)

    monkeypatch.setattr(kernels.importlib, "import_module", no_triton)
    return tried


def test_a_missing_kernel_module_warns_once_and_routes_to_pytorch(monkeypatch):
    tried = _no_triton(monkeypatch)
    route = kernels.KernelRoute("basis_train.fleet.kernels.sgd", "it falls back", devices={"cpu"})
    with pytest.warns(UserWarning, match="Triton is not available .*falls back"):
        assert route.on("cpu") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert route.on("cpu") is None  # no second warning, no second import
    assert tried == ["basis_train.fleet.kernels.sgd"]


def test_a_device_outside_the_route_never_imports(monkeypatch):
    tried = _no_triton(monkeypatch)
    route = kernels.KernelRoute("basis_train.core.kernels.sketch_gather", "unused")
    assert route.on("cpu") is None and tried == [] and route.module is None


def test_an_available_kernel_module_is_returned():
    pytest.importorskip("triton")
    route = kernels.KernelRoute("basis_train.fleet.kernels.bins", "unused", devices={"cpu"})
    assert route.on("cpu").__name__ == "basis_train.fleet.kernels.bins"
