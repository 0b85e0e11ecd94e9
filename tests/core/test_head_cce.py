"""Which kernel the exact fused head runs (core/head_cce.py), checked on CPU.

CI has neither a GPU nor cut_cross_entropy. A fake `cut_cross_entropy.cce` in sys.modules
stands in for the library: it records each call and computes the loss with plain torch
ops, so the head's result and gradients come from what the fake received. "CUDA" is
pretended by replacing head_cce's one device predicate; the dtype is real (CPU bf16
autocast), so the dtype rule is exercised as it is on a GPU.
"""

import dataclasses
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from basis_train.core import head_cce
from basis_train.core.head import FusedHead, fused_linear_cross_entropy
from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.options import SketchConfig
from basis_train.training.config import apply_overrides, load_config
from basis_train.training.errors import RunError
from basis_train.training.setup import check_head_kernel

ROWS, N, V = 21, 8, 31


@dataclasses.dataclass
class FakeParams:  # the fields of cut_cross_entropy 25.1.1's CCEParams
    targets: torch.Tensor
    valids: torch.Tensor | None
    softcap: float | None
    reduction: str
    filter_eps: float | None
    shift: bool
    batch_shape: torch.Size


def _fake_cce(monkeypatch, params_cls=FakeParams):
    calls = []

    def apply(e, c, params):
        calls.append({"e": e.detach().clone(), "c": c.detach().clone(), "params": params,
                      "autocast": torch.is_autocast_enabled("cpu")})
        return F.cross_entropy(e.float() @ c.float().t(), params.targets)

    pkg, mod = types.ModuleType("cut_cross_entropy"), types.ModuleType("cut_cross_entropy.cce")
    mod.CCEParams, mod.linear_cross_entropy_apply = params_cls, apply
    pkg.cce = mod
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", pkg)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy.cce", mod)
    return calls


def _not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, "cut_cross_entropy.cce", raising=False)


@pytest.fixture(autouse=True)
def _fresh_caches():
    """The import result is cached per process; each test starts clean
    and leaves nothing behind (a GPU machine's real CCE is imported afresh afterwards)."""
    head_cce._load.cache_clear()
    yield
    head_cce._load.cache_clear()


@pytest.fixture
def pretend_cuda(monkeypatch):
    monkeypatch.setattr(head_cce, "_on_cuda", lambda x: True)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 7, N, generator=g), torch.randn(V, N, generator=g) / N**0.5,
            torch.randint(0, V, (3, 7), generator=g))


def _head_loss(kernel, dtype=torch.bfloat16):
    x, w, t = _data()
    head = FusedHead(N, V, kernel=kernel)
    head.weight.data.copy_(w)
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = head.loss(x, t)
    loss.backward()
    return head, x, t, loss


def test_cce_on_cuda_calls_the_adapter_exactly(monkeypatch, pretend_cuda):
    calls = _fake_cce(monkeypatch)
    head, x, t, loss = _head_loss("cce")
    assert head.kernel_ran == "cce" and len(calls) == 1
    call = calls[0]
    p = call["params"]
    # exact gradients (no filtering), no valid-row index (its .nonzero() would sync the host)
    assert p.filter_eps is None and p.valids is None
    assert (p.reduction, p.shift, p.softcap) == ("mean", False, None)
    assert torch.equal(p.targets, t.reshape(-1)) and p.batch_shape == (ROWS,)
    # both operands in the autocast dtype, rows flattened, the weight cast from the parameter
    assert call["e"].dtype == call["c"].dtype == torch.bfloat16 and call["e"].shape == (ROWS, N)
    assert torch.equal(call["c"], head.weight.detach().to(torch.bfloat16))
    assert torch.equal(call["e"], x.detach().reshape(ROWS, N).to(torch.bfloat16))
    assert not call["autocast"]  # the casts are ours, explicit; autocast is off inside
    # the loss and the gradients are the library's (here the fake's), reaching the float32 leaves
    expected = F.cross_entropy(call["e"].float() @ call["c"].float().t(), t.reshape(-1))
    torch.testing.assert_close(loss.detach(), expected)
    assert head.weight.grad.dtype == x.grad.dtype == torch.float32
    assert x.grad.shape == x.shape and head.weight.grad.abs().sum() > 0


def test_auto_on_cuda_runs_ours_without_a_warning(monkeypatch, pretend_cuda):
    """CCE adds its gradients in bf16, which cost loss at GPT-2 small (core/head_cce.py): opt-in only."""
    calls = _fake_cce(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = _head_loss("auto")[0]
    assert head.kernel_ran == "native" and calls == []


def test_auto_on_cpu_runs_ours_and_never_imports(monkeypatch):
    calls = _fake_cce(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head, x, t, loss = _head_loss("auto")
    assert head.kernel_ran == "native" and calls == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = fused_linear_cross_entropy(x.detach().reshape(ROWS, N), head.weight.detach(), t.reshape(-1))
    assert torch.equal(loss.detach(), ref)


def test_native_never_calls_cce(monkeypatch, pretend_cuda):
    calls = _fake_cce(monkeypatch)
    assert _head_loss("native")[0].kernel_ran == "native" and calls == []


def test_auto_in_float32_runs_ours_without_a_warning(monkeypatch, pretend_cuda):
    calls = _fake_cce(monkeypatch)  # CCE's backward takes only 16-bit inputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = _head_loss("auto", torch.float32)[0]
    assert head.kernel_ran == "native" and calls == []


def test_unexpected_cce_version_is_refused(monkeypatch, pretend_cuda):
    @dataclasses.dataclass
    class OtherParams:
        targets: torch.Tensor
        valids: torch.Tensor | None

    calls = _fake_cce(monkeypatch, OtherParams)
    with pytest.raises(RuntimeError, match="unsupported version"):
        _head_loss("cce")
    assert calls == []


def test_explicit_cce_that_cannot_run_raises(monkeypatch):
    _fake_cce(monkeypatch)
    with pytest.raises(RuntimeError, match="only on CUDA"):
        _head_loss("cce")
    monkeypatch.setattr(head_cce, "_on_cuda", lambda x: True)
    with pytest.raises(RuntimeError, match="bf16 or fp16"):
        _head_loss("cce", torch.float32)
    _not_installed(monkeypatch)
    head_cce._load.cache_clear()
    with pytest.raises(RuntimeError, match="cannot be imported"):
        _head_loss("cce")


def test_sketched_head_always_runs_ours(monkeypatch, pretend_cuda):
    calls = _fake_cce(monkeypatch)
    cfg = GPTConfig(vocab_size=V, block_size=8, n_embd=N, n_head=2, n_layer=1, head_kernel="cce", sketch=SketchConfig(rank=4))
    for method, ran in (("basis", "native"), ("exact", "cce")):
        model = build_gpt(cfg, seed=0, method=method)
        idx = torch.randint(0, V, (2, 8))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()
        assert model.head_kernel_ran() == ran, method
    assert len(calls) == 1  # the exact model's head only
    assert build_gpt(GPTConfig(vocab_size=V, n_embd=N, head="plain"), seed=0).head_kernel_ran() is None


def _cfg(kernel, dtype="bfloat16"):
    return apply_overrides(load_config(None), {"model.head_kernel": kernel, "train.dtype": dtype})


def test_startup_check(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    for kernel in ("auto", "native"):
        for dev in (cpu, cuda):
            check_head_kernel(_cfg(kernel, "float32"), dev)  # never refused
    with pytest.raises(RunError, match="needs a CUDA device"):
        check_head_kernel(_cfg("cce"), cpu)
    with pytest.raises(RunError, match="train.dtype bfloat16 or float16"):
        check_head_kernel(_cfg("cce", "float32"), cuda)
    _not_installed(monkeypatch)
    with pytest.raises(RunError, match="pip install cut-cross-entropy"):
        check_head_kernel(_cfg("cce"), cuda)
    head_cce._load.cache_clear()
    _fake_cce(monkeypatch)
    check_head_kernel(_cfg("cce"), cuda)


def test_startup_check_of_forward_grad():
    cpu = torch.device("cpu")
    for dtype in ("float32", "bfloat16"):
        check_head_kernel(_cfg("forward-grad", dtype), cpu)
    with pytest.raises(RunError, match="bfloat16 or float32"):
        check_head_kernel(_cfg("forward-grad", "float16"), cpu)
    for kind in ("int8", "fp8"):
        with pytest.raises(RunError, match=f"saved_activations {kind}"):
            check_head_kernel(apply_overrides(_cfg("forward-grad"), {"train.saved_activations": kind}), cpu)
    check_head_kernel(apply_overrides(_cfg("forward-grad"), {"train.saved_activations": "offload"}), cpu)


def test_bad_kernel_name():
    with pytest.raises(ValueError, match="kernel"):
        FusedHead(N, V, kernel="fast")
    with pytest.raises(ValueError, match="head_kernel"):
        GPTConfig(head_kernel="fast")
