"""GPT-2-small training-step speed, ours against nanoGPT's model, in one process on one GPU.

    python scripts/speed_gpt2.py OUT.json [--nanogpt PATH/TO/nanoGPT/model.py] [--steps 30]
    python scripts/speed_gpt2.py --targets OUT.json results/bench/targets.json [--runs GRID/runs]
    python scripts/speed_gpt2.py OUT.json --rows 1,10,12 --profile PROFILE.txt

--profile appends, for every row, torch.profiler's table of the kernels and ops of a few steps after
the timed ones (sorted by GPU time). A graphed row's table lists the kernels its replay ran (torch 2.11,
CUDA 13) but no ops; scripts/profile_diff.py compares two rows kernel by kernel.

The second form turns the rows (and, with --runs, the grid's exact runs compiled and eager) into
issue 22's targets, merged into targets.json (part "gpt2-speed", one set per GPU; other parts kept).

Every row trains B 8 x T 1024 under bf16 autocast with fused AdamW (lr 6e-4, betas 0.9/0.95,
weight decay 0.1 on matrices), gradient clipping 1.0 and torch.compile of the model, on one
fixed random batch; the timed steps follow warm-up steps (compilation, optimiser state).
nanoGPT's model.py is read from the given path (a copy kept outside the repository: it is
another project's code) and serves as the outside reference; its rows are skipped without it.
MFU by basis_train/core/flops.py (nanoGPT's 6N + 12 L H Q T, the exact model's FLOPs).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import sys
from pathlib import Path

import torch

from basis_train.core import flops, graphs
from basis_train.core.basis_linear import BasisLinear
from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.options import SketchConfig
from basis_train.experiments.provenance import command_line, git_commit
from basis_train.reporting.stats import paired_diff

B, T = 8, 1024
SMALL = GPTConfig(arch="gpt2", vocab_size=50257, block_size=T, n_embd=768, n_head=12, n_layer=12, head_chunk=1024)


def _adamw(model, capturable: bool = False):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=6e-4, betas=(0.9, 0.95), fused=True, capturable=capturable)


# Where --profile appends each row's table (set per row by main).
PROFILE_TO: Path | None = None
PROFILE_TITLE = ""
PROFILE_STEPS = 3


def _profile(step, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILE_STEPS):
            step()
        torch.cuda.synchronize()
    # 150 rows: an ungraphed row lists its ops too, and 40 left its small kernels out of the comparison
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=150, max_name_column_width=90)
    with PROFILE_TO.open("a") as f:
        f.write(f"\n## {title} ({PROFILE_STEPS} steps)\n\n{table}\n")


def _time(model, loss_fn, steps: int, warmup: int, before=None, after=None, graph: bool = False,
          generators=()) -> dict:
    opt = _adamw(model, capturable=graph)
    params = [p for p in model.parameters()]
    x = torch.randint(0, 50257, (B, T), device="cuda")
    y = torch.randint(0, 50257, (B, T), device="cuda")

    def step():
        if before:
            before()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(x, y)
        loss.backward()
        if after:
            after()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with graphs.side_stream(torch.device("cuda"), graph):
        for _ in range(warmup):
            step()
    if graph:  # the whole step (compiled forward and backward, clipping, AdamW) as one CUDA graph
        g = graphs.capture(step, generators=generators)
        step = g.replay
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    peak = torch.cuda.max_memory_allocated()
    if PROFILE_TO is not None:
        try:
            _profile(step, PROFILE_TITLE)
        except Exception as e:  # a failed profile must not lose the row's timing
            with PROFILE_TO.open("a") as f:
                f.write(f"\n## {PROFILE_TITLE}: profile failed: {type(e).__name__}: {e}\n")
    return {"ms": ms, "tokens_per_s": B * T / ms * 1e3, "peak_bytes": peak}


def ours(variant: str, rank: int, head: str, compiled: bool, steps: int, warmup: int, graph: bool = False,
         kernel: str = "auto") -> dict:
    layers = {"exact": "none", "mlp+head": "mlp+head", "all": "all"}[variant]
    cfg = dataclasses.replace(SMALL, sketch=SketchConfig(rank=rank, layers=layers if layers != "none" else "mlp+head"),
                              head=head, head_kernel=kernel)
    model = build_gpt(cfg, seed=0, method="exact" if variant == "exact" else "basis").cuda()
    gen = torch.Generator(device="cuda").manual_seed(1)
    fwd = torch.compile(model) if compiled else model
    row = _time(model, lambda x, y: fwd(x, y)[1], steps, warmup,
                before=lambda: model.draw_sketch_seeds(gen), after=model.clear_sketch_seeds, graph=graph,
                generators=[gen])
    row["flops_per_token"] = flops.flops_per_token(model, 12, 12, 768, T)
    return row


def nanogpt(path: str, basis_rank: int | None, steps: int, warmup: int, mode: str | None = None) -> dict:
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.GPT(mod.GPTConfig(block_size=T, vocab_size=50304, n_layer=12, n_head=12, n_embd=768,
                                  dropout=0.0, bias=True))
    if basis_rank:  # the drop-in a user would try: MLP and head as BasisLinear, weights kept
        def swap(lin):
            new = BasisLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, rank=basis_rank)
            new.load_state_dict(lin.state_dict())
            return new
        for block in model.transformer.h:
            block.mlp.c_fc, block.mlp.c_proj = swap(block.mlp.c_fc), swap(block.mlp.c_proj)
        model.lm_head = swap(model.lm_head)
        model.transformer.wte.weight = model.lm_head.weight
    model = model.cuda()
    fwd = torch.compile(model, mode=mode)
    row = _time(model, lambda x, y: fwd(x, y)[1], steps, warmup)
    n = sum(p.numel() for n_, p in model.named_parameters() if "wpe" not in n_)
    row["flops_per_token"] = 6 * n + 12 * 12 * 12 * 64 * T
    return row


EXACT_ROW = "ours exact, fused head, compiled + CUDA graph"  # what basis-train runs on configs/gpt2-small
NANO_ROW = "nanoGPT model.py, compiled"
PLAIN_ROW = "ours exact, plain head, compiled + CUDA graph"
# The fused head with dX and dW made in forward (head kernel forward-grad): no recompute of the logits
FGRAD_ROW = "ours exact, forward-grad head, compiled + CUDA graph"
FGRAD_BASIS_ROW = "ours BASIS mlp+head R=256, forward-grad head, compiled + CUDA graph"


def targets(speed: dict, runs: Path | None = None) -> list[dict]:
    """Issue 22's targets from one speed_gpt2.py output (rows of one process) and the grid's runs."""
    rows = {r["row"]: r for r in speed["rows"] if "ms" in r}
    meta, out = speed["meta"], []
    cmd = f"{meta['command']}  (commit {meta['commit']}, {meta['gpu']}, torch {meta['torch']})"

    def ratio(target, num, den, limit):
        if num in rows and den in rows:
            m = rows[num]["ms"] / rows[den]["ms"]
            out.append({"target": target, "limit": limit, "measured": round(m, 4),
                        "met": m <= limit, "command": cmd, "part": "gpt2-speed",
                        "ms": {num: round(rows[num]["ms"], 3), den: round(rows[den]["ms"], 3)}})

    ratio("GPT-2 small step, ours exact (compiled + CUDA graph, as basis-train) / nanoGPT model.py compiled "
          "(ms; at most 1: tokens/s at least nanoGPT's)", EXACT_ROW, NANO_ROW, 1.0)
    # Context for the one above: the plain head keeps the logits, the memory the fused head saves (eagerly,
    # by recomputing them: one more vocabulary-sized GEMM); basis-train runs the fused head.
    ratio("GPT-2 small step, ours exact with the plain head (keeps the logits; compiled + CUDA graph) / "
          "nanoGPT model.py compiled (ms; context: basis-train runs the fused head)", PLAIN_ROW, NANO_ROW, 1.0)
    # The fused head with its gradients made in forward (compiled, the default's recompute is gone anyway).
    ratio("GPT-2 small step, ours exact with the forward-grad head (dX and dW made in forward; compiled + CUDA "
          "graph) / nanoGPT model.py compiled (ms; context: basis-train runs the default fused head)",
          FGRAD_ROW, NANO_ROW, 1.0)
    ratio("GPT-2 small step, BASIS R = 256 mlp+head / exact, both with the forward-grad head (compiled + CUDA "
          "graph; context)", FGRAD_BASIS_ROW, FGRAD_ROW, 0.95)
    ratio("GPT-2 small step, BASIS R = 256 mlp+head / exact (both compiled + CUDA graph)",
          "ours BASIS mlp+head R=256, fused head, compiled + CUDA graph", EXACT_ROW, 0.95)
    ratio("GPT-2 small step, BASIS R = 256 all linears / exact (both compiled + CUDA graph)",
          "ours BASIS all R=256, fused head, compiled + CUDA graph", EXACT_ROW, 0.90)
    ratio("nanoGPT model.py with MLP and head as BasisLinear R = 256 / nanoGPT model.py, both compiled",
          "nanoGPT model.py, MLP+head as BasisLinear R=256, compiled", NANO_ROW, 1.10)
    if EXACT_ROW in rows:
        mfu = rows[EXACT_ROW]["mfu"]
        out.append({"target": f"GPT-2 small exact step MFU (stretch; nanoGPT's 6N + 12LHQT FLOPs, "
                              f"{meta['mfu_peak']})", "limit": 0.45,
                    "at_least": True, "measured": round(mfu, 4), "met": mfu >= 0.45, "command": cmd,
                    "part": "gpt2-speed"})
    if runs is not None:
        out += _run_targets(runs, rows, meta, cmd)
    for t in out:
        t["gpu"] = meta["gpu"]
    return out


def _summaries(runs: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(runs.glob("exact*-s*/summary.json"))}


def _run_targets(runs: Path, rows: dict, meta: dict, cmd: str) -> list[dict]:
    """The grid's runs: an exact run's warm step against nanoGPT's compiled step, only from a run on
    the rows' GPU; and exact compiled against not compiled, for every seed run both ways (each run's GPU
    named) and, from two seeds on, the paired mean over them with its 95% CI."""
    s, out = _summaries(runs), []
    same_gpu = [n for n in s if n.startswith("exact-s") and s[n].get("gpu", meta["gpu"]) == meta["gpu"]]
    if same_gpu and NANO_ROW in rows:
        name = min(same_gpu, key=lambda n: int(n.rsplit("-s", 1)[1]))
        run_ms = 1000 * B * T / s[name]["tokens_per_s"]
        m = run_ms / rows[NANO_ROW]["ms"]
        out.append({"target": f"basis-train exact run on gpt2-small-code ({name}, warm tokens/s in its summary.json) "
                              "/ nanoGPT model.py compiled step (ms; at most 1)", "limit": 1.0,
                    "measured": round(m, 4), "met": m <= 1.0, "part": "gpt2-speed",
                    "command": f"bash scripts/scale_grid.sh (run {name}; results/scale/) and " + cmd,
                    "ms": {"basis-train run": round(run_ms, 3), NANO_ROW: round(rows[NANO_ROW]["ms"], 3)}})
    for eager, how in (("exact_eager", "not compiled, CUDA graph"), ("exact_eager_nographs", "neither")):
        named = (n.rsplit("-s", 1) for n in s)
        seeds = sorted(int(seed) for run, seed in named if run == eager and f"exact-s{seed}" in s)
        for seed in seeds:
            pair = {n: s[n] for n in (f"exact-s{seed}", f"{eager}-s{seed}")}
            d = pair[f"exact-s{seed}"]["final_val_loss"] - pair[f"{eager}-s{seed}"]["final_val_loss"]
            out.append({"target": f"2,000-step exact gpt2-small run (seed {seed}): |compiled + graph - {how}| final "
                                  "held-out loss (nats)", "limit": 0.01, "measured": round(abs(d), 4),
                        "met": abs(d) <= 0.01, "part": "gpt2-speed",
                        "command": f"bash scripts/scale_grid.sh (runs {', '.join(pair)}; results/scale/)",
                        "final_val_loss": {k: v["final_val_loss"] for k, v in pair.items()},
                        "run_gpus": {k: v.get("gpu") for k, v in pair.items()},
                        "tokens_per_s": {k: v.get("tokens_per_s") for k, v in pair.items()}})
        if len(seeds) >= 2:
            # One seed's difference mixes a systematic cost of the mode with the drift of any two runs whose
            # float rounding differs; only the mean over seeds, with its interval, separates them.
            diff = paired_diff([s[f"exact-s{k}"]["final_val_loss"] for k in seeds],
                               [s[f"{eager}-s{k}"]["final_val_loss"] for k in seeds])
            lo, hi = diff["ci_low"], diff["ci_high"]
            out.append({"target": f"2,000-step exact gpt2-small runs (seeds {', '.join(map(str, seeds))}): compiled + graph "
                                  f"- {how}, final held-out loss paired over seeds, mean and 95% CI inside +-0.01 (nats)",
                        "limit": 0.01, "measured": round(diff["mean"], 4), "ci": [round(lo, 4), round(hi, 4)],
                        "met": -0.01 <= lo and hi <= 0.01, "part": "gpt2-speed",
                        "command": f"bash scripts/scale_grid.sh (runs exact-s*, {eager}-s*; results/scale/)"})
    return out


def merge_targets(speed_json: Path, targets_json: Path, runs: Path | None) -> list[dict]:
    """The speed rows' targets replace those of the same GPU; another GPU's stay beside them."""
    speed = json.loads(speed_json.read_text())
    new, gpu = targets(speed, runs), speed["meta"]["gpu"]
    old = json.loads(targets_json.read_text()) if targets_json.is_file() else []
    # rows written before they named their GPU name it in their command
    merged = [t for t in old if t.get("part") != "gpt2-speed" or t.get("gpu", "") != gpu
              and gpu not in t.get("command", "")] + new
    targets_json.write_text(json.dumps(merged, indent=1) + "\n")
    return new


def main() -> None:
    if "--targets" in sys.argv:
        tp = argparse.ArgumentParser()
        tp.add_argument("--targets", nargs=2, type=Path, metavar=("SPEED_JSON", "TARGETS_JSON"))
        tp.add_argument("--runs", type=Path)
        t = tp.parse_args()
        for row in merge_targets(*t.targets, t.runs):
            print(("MET " if row["met"] else "MISS") + f" {row['measured']} (limit {row['limit']}): {row['target']}")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--nanogpt")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--rows", default="all")
    ap.add_argument("--profile", type=Path, help="append each row's profiler table to this file")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    gpu = torch.cuda.get_device_name()
    S, W = a.steps, a.warmup
    plan = [
        ("ours exact, fused head, compiled + CUDA graph", lambda: ours("exact", 256, "fused", True, S, W, True)),
        ("ours exact, plain head, compiled + CUDA graph", lambda: ours("exact", 256, "plain", True, S, W, True)),
        ("ours BASIS mlp+head R=256, fused head, compiled + CUDA graph",
         lambda: ours("mlp+head", 256, "fused", True, S, W, True)),
        ("ours BASIS mlp+head R=256, plain head, compiled + CUDA graph",
         lambda: ours("mlp+head", 256, "plain", True, S, W, True)),
        ("ours BASIS all R=256, fused head, compiled + CUDA graph", lambda: ours("all", 256, "fused", True, S, W, True)),
        ("ours BASIS all R=256, plain head, compiled + CUDA graph", lambda: ours("all", 256, "plain", True, S, W, True)),
        ("ours exact, fused head, compiled", lambda: ours("exact", 256, "fused", True, a.steps, a.warmup)),
        ("ours exact, plain head, compiled", lambda: ours("exact", 256, "plain", True, a.steps, a.warmup)),
        ("ours BASIS mlp+head R=256, fused head, compiled", lambda: ours("mlp+head", 256, "fused", True, a.steps, a.warmup)),
        ("ours BASIS mlp+head R=256, plain head, compiled", lambda: ours("mlp+head", 256, "plain", True, a.steps, a.warmup)),
        ("ours BASIS all R=256, fused head, compiled", lambda: ours("all", 256, "fused", True, a.steps, a.warmup)),
        ("ours BASIS all R=256, plain head, compiled", lambda: ours("all", 256, "plain", True, a.steps, a.warmup)),
        ("ours exact, fused head, eager", lambda: ours("exact", 256, "fused", False, a.steps, a.warmup)),
        (FGRAD_ROW, lambda: ours("exact", 256, "fused", True, S, W, True, kernel="forward-grad")),
        (FGRAD_BASIS_ROW, lambda: ours("mlp+head", 256, "fused", True, S, W, True, kernel="forward-grad")),
    ]
    if a.nanogpt:
        plan = [("nanoGPT model.py, compiled", lambda: nanogpt(a.nanogpt, None, a.steps, a.warmup)),
                ("nanoGPT model.py, MLP+head as BasisLinear R=256, compiled",
                 lambda: nanogpt(a.nanogpt, 256, a.steps, a.warmup)),
                ("nanoGPT model.py, compiled reduce-overhead", lambda: nanogpt(a.nanogpt, None, S, W, "reduce-overhead")),
                ("nanoGPT model.py, MLP+head as BasisLinear R=256, compiled reduce-overhead",
                 lambda: nanogpt(a.nanogpt, 256, S, W, "reduce-overhead"))] + plan
    if a.rows != "all":
        keep = [int(i) for i in a.rows.split(",")]
        plan = [p for i, p in enumerate(plan) if i in keep]
    rows = []
    global PROFILE_TO, PROFILE_TITLE
    PROFILE_TO = a.profile
    for name, fn in plan:
        PROFILE_TITLE = name
        torch._dynamo.reset()
        try:
            row = {"row": name, **fn()}
            row["mfu"] = flops.mfu(row["tokens_per_s"], row["flops_per_token"], gpu)
        except Exception as e:  # one failing row must not lose the others
            row = {"row": name, "error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    meta = {"command": command_line(__spec__, __file__), "commit": git_commit(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "batch": [B, T], "mfu_peak": flops.peak_flops(gpu)[1]}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
