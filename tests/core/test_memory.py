"""The one memory accounting: weight casts apart, categories that add up."""

import pytest
import torch
from torch import nn

from basis_train.core.basis_linear import BasisLinear
from basis_train.core.memory import CATEGORIES, SavedTensorMeter, live_bytes_peak
from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.options import SketchConfig

ROWS, N, M = 16, 8, 24


def _measure(layer, autocast):
    x = torch.randn(ROWS, N, requires_grad=True)
    meter = SavedTensorMeter(params=layer.parameters())
    with meter.measure(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.float().sum().backward()
    return meter


def test_linear_weight_cast_is_not_an_activation():
    lin = nn.Linear(N, M)
    m = _measure(lin, autocast=True)
    # autocast keeps a bf16 copy of the weight (and of x) for backward
    assert m.weight_cast_bytes == M * N * 2
    assert m.activation_bytes == ROWS * N * 2
    plain = _measure(lin, autocast=False)
    assert plain.weight_cast_bytes == 0 and plain.activation_bytes == ROWS * N * 4


def test_basislinear_same_rule():
    layer = BasisLinear(N, M, rank=4)
    layer.generator = torch.Generator().manual_seed(0)
    for autocast in (False, True):
        m = _measure(layer, autocast)
        # the fp32 parameter itself is excluded; the sketch (float32) and the seed remain
        assert m.weight_cast_bytes == 0
        assert m.activation_bytes == 4 * N * 4 + 8


def _gpt_fields(method, head, dtype=torch.float32, rank=4):
    cfg = GPTConfig(vocab_size=97, block_size=16, n_embd=16, n_head=2, n_layer=2, head=head, head_chunk=8,
                    sketch=SketchConfig(rank=rank))
    model = build_gpt(cfg, seed=0, method=method)
    for m in model.sketched_modules():
        m.generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 97, (2, 16))
    meter = SavedTensorMeter(model)
    with meter.measure(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(idx, idx)
    loss.backward()
    return meter.fields()


@pytest.mark.parametrize("method", ["exact", "basis"])
@pytest.mark.parametrize("head", ["plain", "fused"])
def test_breakdown_adds_up_and_names_the_head(method, head):
    f = _gpt_fields(method, head)
    b = f["activation_breakdown"]
    assert set(b) == set(CATEGORIES) and sum(b.values()) == f["activation_bytes"]
    rows, vocab = 32, 97
    if head == "plain":
        # cross-entropy's float32 log-softmax (rows x vocab) is the head's
        assert b["head"] >= rows * vocab * 4
    else:
        assert b["head"] < rows * vocab * 4
    assert b["attention"] > 0 and b["mlp_hidden"] > 0 and b["width_d"] > 0
    if method == "basis":
        assert b["seeds"] == 5 * 8  # fc and proj of 2 blocks, and the head
        assert b["sketches"] == 2 * (4 * 16 * 4 + 4 * 64 * 4) + 4 * 16 * 4
    else:
        assert b["seeds"] == b["sketches"] == 0


def test_gpt_under_autocast_reports_weight_casts_for_exact_layers_only():
    exact = _gpt_fields("exact", "plain", torch.bfloat16)
    basis = _gpt_fields("basis", "plain", torch.bfloat16)
    # exact: every nn.Linear's bf16 weight; BASIS mlp+head: only the attention projections'
    attn = 2 * 4 * 16 * 16 * 2
    mlp = 2 * 2 * 16 * 64 * 2
    head = 97 * 16 * 2
    assert exact["weight_cast_bytes"] == attn + mlp + head
    assert basis["weight_cast_bytes"] == attn


def test_fused_head_cuts_paper_size_activations():
    # docs/paper.md section 3 point 9: the logits dominate; the fused head removes them.
    plain = _gpt_fields("exact", "plain")["activation_bytes"]
    fused = _gpt_fields("exact", "fused")["activation_bytes"]
    assert fused < plain


@pytest.mark.parametrize("head", ["fused", "plain"])
def test_measured_forward_without_backward_frees_its_graph(head):
    # basis-bench measures a forward alone. Packing a saved output as itself made a C++ reference
    # cycle (output -> grad_fn -> saved output) that kept the whole graph, its activations and its
    # AccumulateGrad nodes alive; the stale nodes then broke a later CUDA-graph capture.
    import gc
    import weakref

    cfg = GPTConfig(vocab_size=97, block_size=16, n_embd=16, n_head=2, n_layer=2, head=head, head_chunk=8)
    model = build_gpt(cfg, seed=0, method="exact")
    idx, tgt = (torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2))
    meter = SavedTensorMeter(model)
    saved = []
    pack = meter._pack
    meter._pack = lambda t: (saved.append(weakref.ref(t)) if t.grad_fn is not None else None) or pack(t)
    with meter.measure():
        loss = model(idx, tgt)[1]
    assert saved, "the forward saved no non-leaf tensor: the test would prove nothing"
    del loss
    gc.collect()
    assert [r for r in saved if r() is not None] == []
    # the meter's numbers survive the graph
    assert meter.activation_bytes > 0


def test_gradients_under_the_meter_equal_unmetered():
    cfg = GPTConfig(vocab_size=97, block_size=16, n_embd=16, n_head=2, n_layer=2, head="plain")
    idx, tgt = (torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2))
    grads = []
    for metered in (False, True):
        model = build_gpt(cfg, seed=0, method="exact")
        meter = SavedTensorMeter(model)
        with meter.measure() if metered else torch.enable_grad():
            loss = model(idx, tgt)[1]
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _SavesTransposedCast(torch.autograd.Function):
    """Saves W^T cast to bf16 (as a kernel that wants dX = dY W in row-major might), plus an
    activation with as many elements as W: only the first is a weight cast."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w.t().contiguous().to(torch.bfloat16), x.reshape(-1).clone())
        return x @ w.t()

    @staticmethod
    def backward(ctx, dy):
        wt, _ = ctx.saved_tensors
        return dy @ wt.t().float(), None


def test_a_transposed_cast_of_a_weight_is_a_weight_cast():
    w = nn.Parameter(torch.randn(3, 5))  # not square: the layouts differ
    x = torch.randn(3, 5, requires_grad=True)  # 15 elements, as many as w
    meter = SavedTensorMeter(params=[w])
    with meter.measure():
        _SavesTransposedCast.apply(x, w).sum().backward()
    assert meter.weight_cast_bytes == 15 * 2
    assert meter.activation_bytes == 15 * 4


def test_the_model_tells_the_meter_its_categories():
    """The meter knows no module names: a model of other names gets its saves sorted by its own table."""

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.widen, self.squash = nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.squash(torch.tanh(self.widen(x)) * 2)  # tanh keeps its output, squash its input

        def memory_categories(self):
            return {"widen": "width_d", "squash": "mlp_hidden"}, None

    model, x = Toy(), torch.randn(3, 4)
    meter = SavedTensorMeter(model)
    with meter.measure():
        model(x).sum().backward()
    b = meter.breakdown
    assert b["width_d"] == 3 * 4 * 4 and b["mlp_hidden"] == 3 * 8 * 4 and b["other"] == 3 * 8 * 4  # tanh's output
    del Toy.memory_categories
    meter = SavedTensorMeter(model)
    with meter.measure():
        model(x).sum().backward()
    assert meter.breakdown["other"] == meter.activation_bytes


@pytest.mark.parametrize("arch", ["paper", "gpt2"])
def test_a_selective_checkpoints_kept_outputs_have_their_own_categories(arch):
    """A selective checkpoint keeps each linear layer's output ('name:out'): fc's is the hidden
    activation, every other one (proj's too: it returns to the residual stream) is of width n_embd."""
    model = build_gpt(GPTConfig(arch=arch, vocab_size=97, block_size=16, n_embd=16, n_head=2, n_layer=2), seed=0)
    cats, _ = model.memory_categories()
    blocks = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    assert {n: cats[f"{n}:out"] for n in blocks} == {n: "mlp_hidden" if n.endswith(".mlp.fc") else "width_d"
                                                     for n in blocks}


def test_live_bytes_peak_counts_the_storages_alive_at_once():
    x = torch.ones(1000)  # allocated before: not counted, even when an in-place op returns it

    def step():
        a = torch.empty(250)  # 1,000 bytes
        b = a * 2  # 2,000 alive
        del a  # 1,000
        c = torch.cat([b, b])  # 1,000 + 2,000: the peak
        del b, c  # 0
        x.add_(1)  # in place: nothing new
        return x[:10] + torch.zeros(10)[:5].sum()  # a view, then two small new storages

    assert live_bytes_peak(step) == 3000
