"""Issue 11's speed targets, measured side by side in one process with CUDA graphs.

Each contender is captured as one CUDA graph (graphs.capture, the training loop's recipe) and
the graphs are replayed interleaved, A B A B ..., so clocks, temperature and other tenants of
the GPU affect both alike; the ratio of medians is the figure. Results go to targets.json as a
list of {"target", "limit", "measured", "met", "command"} plus the raw medians.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from basis_train.core import graphs
from basis_train.core.basis_linear import BasisLinear
from basis_train.core.model import GPTConfig, build_gpt
from basis_train.experiments.provenance import command_line
from basis_train.fsutil import atomic_write_text

LAYER = (8192, 768, 3072)
# The paper-size graphed step before the fused kernels (BASIS R = 32; docs/history.md says where it came from).
PAPER_STEP_BEFORE_MS = 0.765


def _warm_up(step, device) -> None:
    print("[targets] warming up and capturing", step.__qualname__, file=sys.stderr, flush=True)
    with graphs.side_stream(device):
        for _ in range(3):  # lazy allocations and Triton compilation happen outside the graph
            step()


def _graph_of(step, generators, device):
    """(graph, what it needs alive): a replay reads the step's tensors and generators in place,
    so the caller must keep `step` (whose closure holds them) as long as it replays the graph."""
    _warm_up(step, device)
    return graphs.capture(step, generators=generators), (step, generators)


def _interleaved(captured: dict[str, tuple], reps: int) -> dict[str, float]:
    graph_of = {k: g for k, (g, _alive) in captured.items()}
    ev = {k: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
          for k in graph_of}
    for g in graph_of.values():
        g.replay()
    for i in range(reps):
        for k, g in graph_of.items():
            ev[k][i][0].record()
            g.replay()
            ev[k][i][1].record()
    torch.cuda.synchronize()
    return {k: float(np.median([a.elapsed_time(b) for a, b in v])) for k, v in ev.items()}


def _layer_graph(rank: int | None, bf16: bool, device):
    rows, n_in, n_out = LAYER
    torch.manual_seed(0)
    layer = (nn.Linear(n_in, n_out) if rank is None else BasisLinear(n_in, n_out, rank=rank)).to(device)
    gens = []
    if rank is not None:
        layer.generator = torch.Generator(device=device).manual_seed(0)
        gens = [layer.generator]
    # Under autocast a layer's input arrives in bf16 from the op before it.
    x = torch.randn(rows, n_in, device=device, dtype=torch.bfloat16 if bf16 else torch.float32, requires_grad=True)
    dy = torch.randn(rows, n_out, device=device, dtype=x.dtype)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step():
        x.grad = None
        layer.weight.grad = layer.bias.grad = None
        with amp:
            y = layer(x)
        y.backward(dy)

    return _graph_of(step, gens, device)


def layer_ratios(ranks: list[int], reps: int, device) -> list[dict]:
    out = []
    for bf16 in (True, False):
        graph_of = {"linear": _layer_graph(None, bf16, device)}
        for r in ranks:
            graph_of[f"R={r}"] = _layer_graph(r, bf16, device)
        ms = _interleaved(graph_of, reps)
        for r in ranks:
            out.append({"what": "layer", "dtype": "bf16 autocast" if bf16 else "float32, TF32 off", "rank": r,
                        "basis_ms": ms[f"R={r}"], "linear_ms": ms["linear"], "ratio": ms[f"R={r}"] / ms["linear"]})
        del graph_of
        torch.cuda.empty_cache()
    return out


def _step_graph(cfg: GPTConfig, method: str, size: dict, device):
    from basis_train.training.config import load_config
    from basis_train.training.setup import build_optimizer

    model = build_gpt(cfg, seed=0, method=method).to(device).train()
    gen = model.sketch_generator(0)
    run_cfg = load_config(size["config"]) if size.get("config") else load_config(None)
    opt = build_optimizer(model, run_cfg, capturable=True)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (size["batch"], cfg.block_size + 1), generator=g).to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if size["bf16"] else nullcontext()

    def step():
        with amp:
            loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        opt.step()

    def eager():
        step()
        opt.zero_grad(set_to_none=True)

    _warm_up(eager, device)
    opt.zero_grad(set_to_none=True)
    return graphs.capture(step, generators=[gen]), (step, gen)


def step_ratios(size: dict, variants: dict[str, tuple[str, str]], reps: int, device) -> dict[str, float]:
    from basis_train.training.config import load_config
    from basis_train.training.setup import gpt_config

    base = gpt_config(load_config(size["config"]) if size.get("config") else load_config(None))
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if size["tf32"] else "highest")
    try:
        graph_of = {}
        for name, (method, layers, *kernel) in variants.items():
            cfg = dataclasses.replace(base, sketch=dataclasses.replace(base.sketch, layers=layers),
                                      head_kernel=(kernel or ["native"])[0])
            graph_of[name] = _step_graph(cfg, method, size, device)
        return _interleaved(graph_of, reps)
    finally:
        torch.set_float32_matmul_precision(old)


def _target(name: str, limit: float, measured: float, command: str, **extra) -> dict:
    return {"target": name, "limit": limit, "measured": round(measured, 4), "met": measured <= limit,
            "command": command, **extra}


PARTS = ("layer", "gpt2", "paper")


def measure_targets(out: Path, parts=PARTS, reps: int = 50, ranks: tuple[int, ...] = (16, 64, 256)) -> list[dict]:
    """Measure the targets of `parts` on the current CUDA device; merge them into out/targets.json."""
    if not torch.cuda.is_available():
        raise RuntimeError("the speed targets need a CUDA GPU")
    device = torch.device("cuda")
    command = command_line(__spec__, __file__)
    path = out / "targets.json"
    kept = [t for t in json.loads(path.read_text()) if t.get("part") not in parts] if path.exists() else []
    targets = []
    if "layer" in parts:
        _layer_targets(targets, ranks, reps, device, command)
    if "gpt2" in parts:
        _gpt2_targets(targets, reps, device, command)
    if "paper" in parts:
        _paper_targets(targets, reps, device, command)
    atomic_write_text(path, json.dumps(kept + targets, indent=1) + "\n")
    return targets


def _layer_targets(targets, ranks, reps, device, command):
    torch.backends.cuda.matmul.allow_tf32 = False
    for row in layer_ratios(list(ranks), reps, device):
        name = f"layer 8192 x 768 -> 3072, {row['dtype']}, R = {row['rank']}: BasisLinear fwd+bwd / nn.Linear"
        targets.append(_target(name, 0.75, row["ratio"], command, part="layer",
                               **{k: round(v, 4) for k, v in row.items() if k.endswith("_ms")}))


def _gpt2_targets(targets, reps, device, command):
    gpt2 = {"config": "configs/gpt2-small.yaml", "batch": 8, "bf16": True, "tf32": True}
    # Exact with our fused head (the default, and what the sketched head is built on) and, where it
    # is installed, with Cut Cross-Entropy (opt-in: its bf16 gradient sums cost loss, core/head_cce.py).
    from basis_train.core.head_cce import cce_problem

    exact = {"exact-native": ("exact", "mlp+head", "native")}
    if cce_problem() is None:
        exact["exact-cce"] = ("exact", "mlp+head", "cce")
    ms = step_ratios(gpt2, {**exact, "mlp+head": ("basis", "mlp+head"), "all": ("basis", "all")},
                     max(10, reps // 5), device)
    for base in exact:
        for name, limit in (("all", 0.95), ("mlp+head", 0.97)):
            head = "exact's head: native fused" if base == "exact-native" else "exact's head: Cut Cross-Entropy"
            targets.append(_target(f"GPT-2 small graphed training step, BASIS R = 64 {name} / exact ({head})", limit,
                                   ms[name] / ms[base], command, part="gpt2", basis_ms=round(ms[name], 4),
                                   exact_ms=round(ms[base], 4)))


def _paper_targets(targets, reps, device, command):
    paper = {"config": None, "batch": 1, "bf16": False, "tf32": False}
    ms = step_ratios(paper, {"exact": ("exact", "mlp+head"), "basis": ("basis", "mlp+head")}, reps * 4, device)
    targets.append(_target("paper size graphed step, BASIS R = 32 (ms; limit: the step before the fused kernels)",
                           PAPER_STEP_BEFORE_MS, ms["basis"], command, part="paper",
                           exact_ms=round(ms["exact"], 4)))


def report_targets(out: Path, parts=PARTS) -> None:
    for t in measure_targets(out, parts):
        print(f"{'MET ' if t['met'] else 'MISS'} {t['measured']:.4f} (limit {t['limit']}) {t['target']}")


if __name__ == "__main__":
    # python -m basis_train.experiments.bench_kernels OUT [PART ...]: one part per process keeps
    # what the others measured if one of them dies.
    report_targets(Path(sys.argv[1] if len(sys.argv) > 1 else "results/bench"), tuple(sys.argv[2:]) or PARTS)
