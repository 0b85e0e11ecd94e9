"""The memory methods other than BASIS (core/saved_activations.py): selective and every-k-th block
checkpointing, offloaded and 8-bit saved activations; their gradients and what the meter counts."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from basis_train.core.memory import SavedTensorMeter
from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.options import SketchConfig
from basis_train.core.saved_activations import MIN_NUMEL, SavedActivations, dequantize, quantize

CFG = GPTConfig(vocab_size=97, block_size=32, n_embd=32, n_head=2, n_layer=4, head_chunk=16, sketch=SketchConfig(rank=4))
FULL, SELECTIVE = {"checkpoint_blocks": True}, {"checkpoint_blocks": True, "checkpoint_policy": "selective"}
EVERY2 = {"checkpoint_blocks": True, "checkpoint_every": 2}


def _step(method: str, kind: str = "keep", **model):
    """One measured forward and backward of a 4-block GPT: (meter fields, gradients, saving method)."""
    gpt = build_gpt(replace(CFG, **model), seed=0, method=method)
    for m in gpt.sketched_modules():
        m.generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (4, CFG.block_size), generator=torch.Generator().manual_seed(0))
    saving = SavedActivations(kind, gpt.parameters())
    meter = SavedTensorMeter(gpt, saving=saving)
    with meter.measure():
        _, loss = gpt(idx, idx)
    loss.backward()
    return meter.fields(), torch.cat([p.grad.reshape(-1) for p in gpt.parameters()]), saving


@pytest.mark.parametrize("how", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantisation_error_is_within_the_step(how, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 5, 40, generator=g) * torch.logspace(-3, 3, 6)[:, None, None]).to(dtype)
    x[0, 0] = 0  # a zero row must come back as zeros, not NaN
    back = dequantize(quantize(x, how))
    assert back.dtype == dtype and back.shape == x.shape
    err = (back.float() - x.float()).abs()
    absmax = x.float().abs().amax(dim=-1, keepdim=True)
    if how == "int8":  # round-to-nearest on a grid of step absmax / 127
        bound = absmax / 254
    else:  # e4m3: 3 mantissa bits, relative half-step 2^-4; below 2^-6 (scaled) subnormals, step 2^-9
        bound = 2.0**-4 * x.float().abs() + 2.0**-10 * absmax / 448
    # float32 rounding of x / s and q * s (a few units of 2^-24), and bfloat16's own when cast back
    bound = bound * (1 + 1e-5) + (x.float().abs() * 2.0**-8 if dtype == torch.bfloat16 else 0)
    assert bool((err <= bound).all()), (err / bound.clamp_min(1e-30)).max()
    assert bool((back[0, 0] == 0).all())


@pytest.mark.parametrize("method", ["exact", "basis"])
@pytest.mark.parametrize("name,kind,model", [("selective", "keep", SELECTIVE), ("every 2", "keep", EVERY2),
                                             ("full", "keep", FULL), ("offload", "offload", {}),
                                             ("selective + offload", "offload", SELECTIVE)])
def test_checkpointing_and_offload_change_no_gradient(method, name, kind, model):
    _, exact, _ = _step(method)
    _, got, _ = _step(method, kind, **model)
    # A recompute runs the same kernels on the same inputs and the offloaded copies are exact, so on
    # CPU the gradients come out bitwise equal. The tolerance leaves room for a float32 reduction a
    # recomputed kernel might order differently (another device): each gradient entry sums at most
    # n = 128 products (the MLP width, 4 x 32 tokens), off by at most 7 sqrt(n) 2^-24 sum|terms| with
    # overwhelming probability (tests/tolerance.py), 5e-6 of the terms' size; bounded by 5e-6 of the
    # largest gradient entry, since the sum of |terms| rarely exceeds it many times over.
    torch.testing.assert_close(got, exact, rtol=5e-6, atol=5e-6 * exact.abs().max().item(), msg=name)


# Norm-wise relative error of all gradients together, 8-bit against exact. Rounding to nearest is off
# by a uniform fraction of the step: rms step / sqrt(12). int8: step absmax / 127, and for rows of at
# least 16 near-Gaussian entries absmax <= ~4 rms, so a tensor is off by <= 4 / (127 sqrt 12) = 0.9%
# (rms). fp8 e4m3: relative step 2^-3, so 2^-3 / sqrt 12 = 3.6%. Errors injected into different saved
# tensors are independent and add in quadrature to first order; a weight's gradient reads about three
# compressed tensors (its input and those its upstream gradient passes through in its block): sqrt(3) x,
# 1.6% and 6.2%. Tested with about 2x margin (measured on CPU: 0.86% and 3.2% exact, 0.70% and 3.1% BASIS).
BOUND = {"int8": 0.03, "fp8": 0.12}


@pytest.mark.parametrize("method", ["exact", "basis"])
@pytest.mark.parametrize("how", ["int8", "fp8"])
def test_8bit_gradients_are_close_to_exact(method, how):
    _, exact, _ = _step(method)
    _, got, _ = _step(method, how)
    rel = ((got - exact).norm() / exact.norm()).item()
    assert rel <= BOUND[how], rel
    assert rel > 0  # something was compressed


def test_int8_keeps_a_byte_per_element_and_a_scale_per_row():
    """Three saved activations (x, GELU's input, proj's input), each compressed: n + 4 bytes a row."""
    net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    x = torch.randn(32, 64)
    counted = {}
    for kind in ("keep", "int8"):
        meter = SavedTensorMeter(params=net.parameters(), saving=SavedActivations(kind, net.parameters()))
        with meter.measure():
            net(x).sum().backward()
        counted[kind] = meter.activation_bytes
    assert counted["keep"] == 4 * 32 * (64 + 128 + 128)
    assert counted["int8"] == 32 * (64 + 4) + 2 * 32 * (128 + 4)  # ratio 0.259


def test_what_is_never_compressed():
    lin = nn.Linear(64, 64)
    s = SavedActivations("int8", lin.parameters())
    assert not s.takes(lin.weight) and not s.takes(lin.weight.t())  # parameters and views of them
    assert not s.takes(lin.weight.detach().to(torch.bfloat16))  # a cast of one (the meter's rule)
    assert not s.takes(torch.ones(64, 64, dtype=torch.int64))  # integers: seeds, indices
    assert not s.takes(torch.ones(MIN_NUMEL // 32 - 1, 32))  # tiny
    assert not s.takes(torch.ones(4096, 1))  # one-value rows: statistics
    assert not s.takes(torch.ones(4096))  # 1-D: a per-row statistic, one scale for all would lose the small
    assert s.takes(torch.ones(64, 64, dtype=torch.bfloat16))  # an activation that equals no parameter
    assert s.takes(torch.randn(64, 64))


@pytest.mark.parametrize("method", ["exact", "basis"])
def test_meter_under_each_method(method):
    keep, _, _ = _step(method)
    full, _, _ = _step(method, **FULL)
    selective, _, _ = _step(method, **SELECTIVE)
    every2, _, _ = _step(method, **EVERY2)
    int8, _, _ = _step(method, "int8")
    fp8, _, _ = _step(method, "fp8")
    offload, _, _ = _step(method, "offload")
    b = {name: f["activation_bytes"] for name, f in [("keep", keep), ("full", full), ("selective", selective),
                                                     ("every2", every2), ("int8", int8), ("fp8", fp8)]}
    # selective keeps the blocks' inputs and their matmul and attention outputs: between full and none
    assert b["full"] < b["selective"] < b["keep"]
    assert b["full"] < b["every2"] < b["keep"]  # blocks 1 and 3 keep everything
    # BASIS keeps no MLP hidden activation but a selective checkpoint keeps fc's output
    assert selective["activation_breakdown"]["mlp_hidden"] > 0 and full["activation_breakdown"]["mlp_hidden"] == 0
    # 8 bits for most float32 bytes, plus a scale a row and what is too small to compress
    assert b["int8"] == b["fp8"] and 0.25 * b["keep"] < b["int8"] < 0.45 * b["keep"], b["int8"] / b["keep"]
    for f in (keep, full, selective, every2, int8, offload):
        assert sum(f["activation_breakdown"].values()) == f["activation_bytes"]
    # On CPU the host is the device: save_on_cpu copies each saved activation (one copy per save, where
    # keep counts a storage saved twice once), and the copies are counted where they are, on the device.
    assert offload["offloaded_bytes"] == 0 and offload["activation_bytes"] >= keep["activation_bytes"]
    assert all(f["offloaded_bytes"] == 0 for f in (keep, full, selective, int8))


def test_bytes_moved_off_the_device_are_offloaded_not_activations():
    """The meter's rule for offloading, where a pack moves a tensor to another device (here meta,
    whose tensors all share data pointer 0, so one saved tensor: GELU's input)."""

    class ToMeta(SavedActivations):
        def pack(self, t):
            return (t.device, t.to("meta")) if self.takes(t) else t.detach()

    x = torch.randn(32, 128, requires_grad=True)
    meter = SavedTensorMeter(params=(), saving=ToMeta("offload", ()))
    with meter.measure():
        nn.functional.gelu(x)  # forward only: meta tensors cannot come back
    assert meter.activation_bytes == 0 and meter.offloaded_bytes == 4 * 32 * 128


def test_basis_sketches_are_compressed_when_large_enough():
    cfg = replace(CFG, n_embd=64, sketch=replace(CFG.sketch, rank=32))  # a 32 x 64 sketch: 2048 elements
    gpt = build_gpt(cfg, seed=0)
    for m in gpt.sketched_modules():
        m.generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CFG.vocab_size, (2, CFG.block_size))
    sizes = {}
    for kind in ("keep", "int8"):
        meter = SavedTensorMeter(gpt, saving=SavedActivations(kind, gpt.parameters()))
        with meter.measure():
            gpt(idx, idx)[1].backward()
        sizes[kind] = meter.breakdown["sketches"]
    assert sizes["int8"] < 0.3 * sizes["keep"]


def test_weight_casts_stay_and_their_verdict_is_kept_for_graph_capture(monkeypatch):
    """Under bf16 autocast nn.Linear saves a bf16 cast of its weight: never compressed. Telling it from an
    activation compares values (a device sync, which a CUDA-graph capture forbids), so the verdict of the
    first step is reused by position on the next."""
    net = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    saving = SavedActivations("int8", net.parameters())
    x = torch.randn(64, 64)  # as many elements as a weight: the value check has to run

    def step():
        meter = SavedTensorMeter(params=net.parameters(), saving=saving)
        with meter.measure(), torch.autocast("cpu", dtype=torch.bfloat16):
            net(x).float().sum().backward()
        return meter

    first = step()
    assert first.weight_cast_bytes == 2 * 64 * 64  # the second layer's bf16 weight (the first needs no dX)
    assert first.activation_bytes == 3 * 64 * (64 + 4)  # x, GELU's input and output (bf16), in 8 bits
    monkeypatch.setattr(saving.params, "is_cast", lambda t: pytest.fail("the verdict was not reused"))
    with saving.hooks(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x).float().sum().backward()


def test_offload_goes_through_torchs_save_on_cpu(monkeypatch):
    """On a CPU the host is the device, so no byte count can tell an offload from a keep: check
    that every activation offload takes goes through save_on_cpu's hooks and comes back through them."""
    calls = {"pack": 0, "unpack": 0}

    class Recording:
        def __init__(self, pin_memory):
            assert pin_memory  # pinned host memory where CUDA is

        def pack_hook(self, t):
            calls["pack"] += 1
            return ("host", t.detach().clone())

        def unpack_hook(self, packed):
            calls["unpack"] += 1
            return packed[1]

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Recording)
    _, plain, _ = _step("exact")
    _, got, saving = _step("exact", "offload")
    assert calls["pack"] > 0 and calls["unpack"] == calls["pack"]
    torch.testing.assert_close(got, plain, rtol=0, atol=0)  # a copy and back: the same numbers
