"""Step time and activation memory of exact backprop, checkpointing and BASIS, measured.

docs/paper.md section 3 point 9: the paper claims O(L R N) activation memory but never measures
it. Everything here runs in one process so that every ratio compares like with like (same
device state, same random batch, same initial weights): full GPT training steps at two
sizes, and one linear layer fwd+bwd. Memory is the CUDA allocator peak of one step and the
bytes autograd keeps for backward, broken down by tensor shape to show where it goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from basis_train.core import flops
from basis_train.core.basis_linear import BasisLinear
from basis_train.core.memory import SavedTensorMeter, step_peak_bytes
from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.options import SketchConfig
from basis_train.experiments.bench_sizes import LAYER, LAYER_QUICK, QUICK, SIZES
from basis_train.experiments.graphed_step import graphed_step
from basis_train.experiments.head_bench import HEAD, HEAD_IMPLS, HEAD_QUICK, _head_bench, bench_command, targets
from basis_train.experiments.provenance import command_line, cpu_name, git_commit
from basis_train.experiments.timing import time_step
from basis_train.fsutil import atomic_write_text
from basis_train.reporting.bench_report import graphed_md, head_md, layer_md, memory_md, row_label, size_md


def _write(path: Path, text: str) -> None:
    # Atomic: a run killed mid-write (e.g. at a device time limit) leaves the previous file whole.
    atomic_write_text(path, text)


def _autocast(device: torch.device, bf16: bool, cache: bool = True):
    # A captured graph must not hold autocast's cast cache: it would replay stale casts.
    amp = bf16 and device.type == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache) if amp else nullcontext()


def _step_bench(size: dict, variant: str, rank: int | None, head: str, device, opts: dict) -> dict:
    basis = rank is not None
    cfg = GPTConfig(vocab_size=size["vocab"], block_size=size["seq"], n_embd=size["width"], n_head=size["heads"],
                    n_layer=size["layers"], sketch=SketchConfig(rank=rank or 1, layers=variant if basis else "mlp+head"),
                    checkpoint_blocks=variant == "exact+ckpt", head=head, head_chunk=size["head_chunk"],
                    head_kernel=opts.get("head_kernel", "auto"))
    if opts["compile"]:
        torch._dynamo.reset()  # else every new model recompiles GPT.forward until dynamo's limit turns it eager
    torch.manual_seed(opts["seed"])
    model = build_gpt(cfg, seed=opts["seed"], method="basis" if basis else "exact").to(device).train()
    opt = _optimizer_factory(model, size)(capturable=False)
    run = torch.compile(model) if opts["compile"] else model
    make_opt = _optimizer_factory(model, size)
    idx, tgt = opts["batch"]

    def forward():
        with _autocast(device, size["bf16"]):
            return run(idx, tgt)[1]

    def step():
        forward().backward()
        opt.step()
        # Grads go at the end of the step, not the start: between steps only parameters and optimiser
        # state are allocated, so the step peak includes the gradients.
        opt.zero_grad(set_to_none=True)

    # The peak is taken after the timed steps: optimiser state and workspaces already exist.
    row = {"status": "ok", "time_ms": time_step(step, device, opts["steps"], opts["warmup"]),
           "static_bytes": torch.cuda.memory_allocated(device) if device.type == "cuda" else None}
    row["step_peak_bytes"] = step_peak_bytes(step, device)
    meter = SavedTensorMeter(model)
    with meter.measure():
        loss = forward()
    del loss  # drops the graph and all it saved
    rows = size["batch"] * size["seq"]
    if device.type == "cuda" and not opts["compile"]:
        row["graphed_time_ms"] = _guarded(_graphed_time, model, make_opt, run, size, device, opts)
    row.update(_speed(model, cfg, rows, device, row["time_ms"], row.get("graphed_time_ms")))
    # --head-kernel cce runs Cut Cross-Entropy for an exact bf16 head on CUDA: the row says which ran.
    return {**row, **meter.fields(), "head_kernel": model.head_kernel_ran(),
            "rank_effective": min(rank, rows) if basis else None,
            "n_params": sum(p.numel() for p in model.parameters()), "n_sketched": len(model.sketched_modules())}


def _speed(model, cfg: GPTConfig, tokens: int, device, eager: dict, graphed: dict | None) -> dict:
    """Tokens/s and model FLOPs utilisation of the step, by nanoGPT's count (core/flops.py: BASIS runs
    are charged exact's FLOPs); the graphed step's where it was timed, else the eager one's. MFU needs a
    GPU with a known bf16 peak (None elsewhere)."""
    timed = graphed if graphed and "median" in graphed else eager
    tokens_per_s = tokens / (timed["median"] / 1e3)
    per_token = flops.flops_per_token(model, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"tokens_per_s": tokens_per_s, "mfu": flops.mfu(tokens_per_s, per_token, gpu),
            "speed_of": "graphed" if timed is graphed else "eager"}


def _graphed_time(model, make_opt, run, size: dict, device, opts: dict) -> dict:
    idx, tgt = opts["batch"]

    def loss():
        with _autocast(device, size["bf16"], cache=False):
            return run(idx, tgt)[1]

    replay = graphed_step(model, lambda: make_opt(capturable=True), loss, device)
    return time_step(replay, device, opts["steps"], opts["warmup"])


def _optimizer_factory(model, size: dict):
    def make(capturable: bool) -> torch.optim.Optimizer:
        if size["optimizer"] == "sgd":  # the paper's optimiser; GPT-2 small gets the usual AdamW
            return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, capturable=capturable)

    return make


def _layer_bench(rank: int | None, device, shape: list[int], opts: dict) -> dict:
    rows, n_in, n_out = shape
    torch.manual_seed(opts["seed"])
    layer = (nn.Linear(n_in, n_out) if rank is None else BasisLinear(n_in, n_out, rank=rank)).to(device)
    # Under bf16 autocast a layer's input usually arrives in bf16 from the op before it.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(rows, n_in, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(rows, n_out, device=device, dtype=dtype)

    def forward():
        with _autocast(device, True):
            return layer(x)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        forward().backward(dy)

    row = {"status": "ok", "time_ms": time_step(step, device, opts["steps"], opts["warmup"])}
    row["step_peak_bytes"] = step_peak_bytes(step, device)
    meter = SavedTensorMeter(params=layer.parameters())
    with meter.measure():
        y = forward()
    del y
    return {**row, "activation_bytes": meter.activation_bytes, "weight_cast_bytes": meter.weight_cast_bytes,
            "input_dtype": str(dtype).removeprefix("torch.")}


def _guarded(fn, *args) -> dict:
    """One measurement; an OOM or a failure is recorded and the benchmark goes on."""
    try:
        res = fn(*args)
    except Exception as e:  # noqa: BLE001 - one broken variant must not lose the others' numbers
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        res = {"status": "oom" if oom else "error", "error": f"{type(e).__name__}: {e}"[:2000]}
        if not oom:
            res["traceback"] = traceback.format_exc()
    # The exception, and the frames holding the model, are gone by now: give the memory back.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def _ratios(rows: list[dict], base: dict | None) -> None:
    for field in ("time_ms", "step_peak_bytes", "activation_bytes"):
        for r in rows:
            num, den = r.get(field), (base or {}).get(field)
            num, den = (x["median"] if isinstance(x, dict) else x for x in (num, den))
            ok = r["status"] == "ok" and base and base["status"] == "ok" and num is not None and den
            r[f"ratio_{field}"] = num / den if ok else None


def _meta(device: torch.device, dtype: str, extra: dict) -> dict:
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": cpu_name(), "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": dtype,
            "argv": list(sys.argv), "command": command_line(__spec__, __file__), "commit": git_commit(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra}


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_bench(sizes: list[str], rank_list: list[int], variant_list: list[str], head_list: list[str], dev: torch.device,
              out: Path, steps: int = 30, warmup: int = 5, compile_model: bool = False, quick: bool = False,
              memory_table: Path | None = None, layer: bool = True, head_bench: bool = True, seed: int = 0,
              head_kernel: str = "auto", log=_say) -> int:
    """Benchmark exact, checkpointed and BASIS training steps, one linear layer and the head alone;
    writes OUT/ after every measurement and returns how many measurements failed."""
    opts = {"steps": steps, "warmup": warmup, "compile": compile_model, "quick": quick, "seed": seed,
            "head_kernel": head_kernel}
    results: list[dict] = []
    layer_res: dict = {}
    head_res: dict = {}

    def flush() -> None:
        m = (results[0] if results else layer_res or head_res)["meta"]
        md = ["# BASIS benchmark", "", f"`{bench_command(m)}`", "",
              f"{m['gpu'] or m['cpu']}, torch {m['torch']}, CUDA {m['cuda']}, commit {m.get('commit')}, {m['date']}", ""]
        for res in results:
            _write(out / f"bench_{res['size']['name']}.json", json.dumps(res, indent=1))
            md += size_md(res) + graphed_md(res)
        if layer_res:
            _write(out / "layer.json", json.dumps(layer_res, indent=1))
            md += layer_md(layer_res)
        if head_res:
            _write(out / "head.json", json.dumps(head_res, indent=1))
            md += head_md(head_res)
        _write(out / "bench.md", "\n".join(md))
        if results or head_res:
            _write(out / "memory_targets.json",
                   json.dumps(targets(results, head_res, out / "head_equivalence" / "equivalence.json"), indent=1))
        if memory_table and results:
            _write(memory_table, memory_md(results))

    def record(tag: str, rows: list[dict], row: dict, base: dict | None) -> None:
        rows.append(row)
        _ratios([r for r in rows if r.get("head") == row.get("head")], base)
        msg = f"{row['time_ms']['median']:.3f} ms" if row["status"] == "ok" else row["error"]
        log(f"[{tag}] R={row['rank'] or '-'}: {msg}")
        flush()

    for name in sizes:
        size = {**SIZES[name], **(QUICK if quick else {})}
        amp = size["bf16"] and dev.type == "cuda"
        tf32_off = dev.type == "cuda" and not size["tf32"]
        dtype = "bf16 autocast" if amp else "float32, TF32 off" if tf32_off else "float32"
        gen = torch.Generator().manual_seed(seed)  # random token ids: timing and memory do not depend on the text
        batch = [torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=gen).to(dev) for _ in "xy"]
        precision = "high" if size["tf32"] else "highest"
        res = {"meta": _meta(dev, dtype, {**opts, "float32_matmul": precision, "logits_itemsize": 2 if amp else 4}),
               "size": size, "logits_bytes": size["batch"] * size["seq"] * size["vocab"] * (2 if amp else 4),
               "logits_fp32_bytes": size["batch"] * size["seq"] * size["vocab"] * 4, "rows": []}
        results.append(res)
        runs = [(v, None, h) for h in head_list for v in variant_list if v.startswith("exact")]
        runs += [(v, r, h) for h in head_list for v in variant_list if not v.startswith("exact") for r in rank_list]
        old_precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            for variant, rank, head in runs:
                row = {"variant": variant, "rank": rank, "head": head,
                       **_guarded(_step_bench, size, variant, rank, head, dev, {**opts, "batch": batch})}
                # ratios are to exact with the same head
                base = next((r for r in res["rows"] + [row] if r["variant"] == "exact" and r["head"] == head), None)
                record(f"{name}] [{row_label(row)}", res["rows"], row, base)
        finally:
            torch.set_float32_matmul_precision(old_precision)
    if layer:
        shape = LAYER_QUICK if quick else LAYER
        layer_res.update(meta=_meta(dev, "bf16 autocast" if dev.type == "cuda" else "float32", opts),
                         shape=shape, rows=[])
        for rank in [None, *rank_list]:
            row = {"rank": rank, **_guarded(_layer_bench, rank, dev, shape, opts)}
            record("layer", layer_res["rows"], row, layer_res["rows"][0] if layer_res["rows"] else row)
    if head_bench:
        head_res.update(meta=_meta(dev, "bf16 weights and input" if dev.type == "cuda" else "float32", opts),
                        shape=HEAD_QUICK if quick else HEAD, rows=[])
        for impl in HEAD_IMPLS:
            row = {"impl": impl, **_guarded(_head_bench, impl, dev, head_res["shape"], opts)}
            head_res["rows"].append(row)
            msg = f"{row['time_ms']['median']:.3f} ms" if row["status"] == "ok" else row["status"]
            log(f"[head] {impl}: {msg}")
            flush()
    failed = [r for res in [*results, layer_res, head_res] for r in res.get("rows", []) if r["status"] == "error"]
    return len(failed)


def main() -> None:
    """`python -m basis_train.experiments.bench head OUT`: the head alone, as `basis-bench --sizes ''
    --no-layer` runs it, without typer (which the GPU machine's Python lacks)."""
    ap = argparse.ArgumentParser(description="the head alone, as basis-bench --sizes '' --no-layer runs it")
    ap.add_argument("what", choices=["head"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    a = ap.parse_args()
    failed = run_bench([], [16], [], [], torch.device(a.device), a.out, a.steps, a.warmup, quick=a.quick, layer=False)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
