"""The memory frontier (issue 27): under a fixed memory budget, the largest batch and the longest context
each memory method trains GPT-2 small with, and its speed there.

For each method (bench_sizes.FRONTIER_METHODS: config overrides of configs/gpt2-small.yaml's model) and
each budget: (a) the largest batch B at T = 1024 and (b) the longest context T at batch 1 (the model's
position table grown to T) whose training step fits, found by frontier_search.largest_fitting; then a
few timed steps at each answer give its tokens/s.

A probe builds the model and optimiser as a run does (training/setup.py), and runs training/step.py's
TrainStep eagerly (no torch.compile, no CUDA graph): forward, backward, gradient clipping and AdamW,
bf16 autocast on CUDA. Its first step lets the memory meter count what is saved for backward and
allocates optimiser state and workspaces; the second is the one measured. "Fits" on CUDA: the
allocator peak over that step (torch.cuda.max_memory_allocated after reset_peak_memory_stats: parameters,
gradients, optimiser state and the step's working memory together) is at most the budget, and no step
ran out of memory. On CPU (no allocator peak) a stand-in: the bytes saved for backward plus parameter,
gradient and optimiser-state bytes, which leaves out transient working memory (CPU_ESTIMATE).

A peak depends on the size, not on the budget, so every budget's search reads one cache of probes.
A method the config refuses is recorded with the reason; a method that fails otherwise is recorded
with its error and the frontier goes on. OUT/frontier.json, .md and .png are rewritten after every
method; --resume keeps the methods a previous run with the same settings finished.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

from basis_train.experiments.bench_sizes import (
    FRONTIER_AXES,
    FRONTIER_AXES_QUICK,
    FRONTIER_CONFIG,
    FRONTIER_METHODS,
    FRONTIER_RANK,
    FRONTIER_RANK_QUICK,
    FRONTIER_REFERENCE,
    FRONTIER_REFERENCE_QUICK,
    QUICK,
)
from basis_train.experiments.frontier_probe import GIB, Prober, host_available_bytes, say
from basis_train.experiments.frontier_search import bracket_hint, largest_fitting, parse_budgets, parse_methods
from basis_train.experiments.provenance import command_line, cpu_name
from basis_train.fsutil import atomic_write_text
from basis_train.reporting.frontier_report import budget_key, write_report
from basis_train.training.config import Config, ConfigError, apply_overrides, load_config
from basis_train.training.variants import variant_of

CUDA_PEAK = ("CUDA allocator peak: torch.cuda.max_memory_allocated() over one steady-state training step "
             "(after reset_peak_memory_stats), parameters, gradients and optimiser state included")
CPU_ESTIMATE = ("CPU estimate, not an allocator peak: the bytes saved for backward (core/memory.py's "
                "activation_bytes + weight_cast_bytes) plus parameter, gradient and optimiser-state bytes; "
                "transient working memory (a checkpointed block's recompute, the head's chunk of logits, "
                "gradients in flight) is left out, and offload keeps its copies on the CPU, which is the device")
# Offload pins a host copy of every saved activation: a probe predicted to pin more than this share of
# the host memory available at the start is not run (it would take the machine down, not the GPU).
HOST_FRACTION = 0.5


class FrontierError(ValueError):
    """A frontier that cannot start, said in one line."""


def method_config(overrides: dict, device: torch.device, quick: bool, batch: int, seq: int, seed: int = 0,
                  rank: int = FRONTIER_RANK) -> Config:
    """configs/gpt2-small.yaml at (batch, seq), eager, with a method's overrides (ConfigError if refused)."""
    base = {"train.compile": False, "train.cuda_graphs": False, "train.device": device.type, "train.seed": seed,
            "train.dtype": "bfloat16" if device.type == "cuda" else "float32", "train.batch_size": batch,
            "model.block_size": seq, "sketch.rank": rank}
    if quick:
        base |= {"model.vocab_size": QUICK["vocab"], "model.n_embd": QUICK["width"], "model.n_head": QUICK["heads"],
                 "model.n_layer": QUICK["layers"], "model.head_chunk": QUICK["head_chunk"]}
    return apply_overrides(_base_config(), {**base, **overrides})


@functools.cache
def _base_config() -> Config:
    return load_config(FRONTIER_CONFIG)


def _run_axis(prober: Prober, axis: str, spec: dict, budgets: list[float], max_probes: int | None,
              timed_steps: int) -> dict:
    size = (lambda n: (n, spec["seq"])) if axis == "batch" else (lambda n: (spec["batch"], n))
    per_budget, timed = {}, {}
    # Two small sizes first: the peak grows about linearly with the size, so a line through the measured
    # sizes around a budget (or the largest two) says where its answer lies: the search starts there and
    # asks the line again as its probes measure more.
    for n in (spec["step"], 2 * spec["step"]):
        if n <= spec["cap"]:
            prober.measure(*size(n))

    def measured_ok() -> list[tuple[int, int]]:
        return [(n, r["peak_bytes"]) for (b, t), r in prober.cache.items() for n in (b if axis == "batch" else t,)
                if size(n) == (b, t) and r["status"] == "ok"]

    for gib in budgets:
        def fits(n: int, limit: float = gib * GIB) -> bool:
            r = prober.measure(*size(n))
            return r["status"] == "ok" and r["peak_bytes"] <= limit

        def hint(limit: float = gib * GIB) -> int | None:
            return bracket_hint(measured_ok(), limit, spec["step"])

        found = largest_fitting(fits, spec["cap"], spec["step"], max_probes, hint=hint(), rehint=hint)
        r = per_budget[budget_key(gib)] = found.as_dict()
        r["stopped_by"] = sorted({prober.cache[size(n)]["status"] for n, ok in found.probes if not ok} - {"ok"})
        if found.best:
            r["peak_bytes"] = prober.cache[size(found.best)]["peak_bytes"]
            if found.best not in timed:
                timed[found.best] = prober.timed(*size(found.best), timed_steps)
            t = timed[found.best]
            r["timed_status"] = t["status"]
            r.update({k: t.get(k) for k in ("tokens_per_s", "mfu")}, time_ms=(t.get("time_ms") or {}).get("median"))
    # every size probed on this axis (the other axis's probes share the cache: B = 1 at T = 1024 is on both)
    probed = {n: r for (b, s), r in prober.cache.items() for n in (b if axis == "batch" else s,) if size(n) == (b, s)}
    return {"per_budget": per_budget, "measurements": {str(n): probed[n] for n in sorted(probed)}}


def _reference_point(prober: Prober, ref: dict, timed_steps: int) -> dict:
    """The method at one fixed size: step peak, and tokens/s where it fits the device."""
    m = prober.measure(ref["batch"], ref["seq"])
    out = {**ref, "status": m["status"], "peak_bytes": m.get("peak_bytes"),
           **{k: m.get(k) for k in ("activation_bytes", "offloaded_bytes")}}
    if m["status"] == "ok":
        t = prober.timed(ref["batch"], ref["seq"], timed_steps)
        out.update(timed_status=t["status"], tokens_per_s=t.get("tokens_per_s"), mfu=t.get("mfu"),
                   time_ms=(t.get("time_ms") or {}).get("median"))
    return out


def run_method(mid: str, label: str, overrides: dict, budgets: list[float], device: torch.device, axes: dict,
               quick: bool = False, seed: int = 0, rank: int = FRONTIER_RANK, max_probes: int | None = None,
               timed_steps: int = 5, host_limit: int | None = None, log=say, reference: dict | None = None) -> dict:
    """One method's frontier: {"status": ok | refused | error, "batch": ..., "context": ...}."""
    rec = {"label": label.format(rank=rank), "overrides": overrides}

    def make(batch: int, seq: int) -> Config:
        return method_config(overrides, device, quick, batch, seq, seed, rank)

    try:
        cfg = make(1, axes["batch"]["seq"])
    except ConfigError as e:
        log(f"[frontier] [{mid}] refused: {e}")
        return {**rec, "status": "refused", "reason": str(e)}
    # What decides its gradients, in the tags the grid's runs record: the report reads its loss cost there.
    rec.update(method=cfg.train.method, variant=variant_of(cfg))
    offload = cfg.train.saved_activations == "offload" and device.type == "cuda"
    prober = Prober(make, device, host_limit if offload else None, log, mid)
    if offload:
        rec["host_limit_bytes"] = host_limit
    t0 = time.perf_counter()
    try:
        for axis, spec in axes.items():
            rec[axis] = _run_axis(prober, axis, spec, budgets, max_probes, timed_steps)
            prober.release()
        if reference:
            rec["reference"] = _reference_point(prober, reference, timed_steps)
            prober.release()
        rec["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - one broken method must not lose the others' frontiers
        rec.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc())
        log(f"[frontier] [{mid}] error: {rec['error']}")
    finally:
        prober.release()
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _settings(budgets, device, quick, rank, axes, max_probes, timed_steps, seed, reference) -> dict:
    return {"budgets_gib": budgets, "device": device.type, "quick": quick, "rank": rank, "axes": axes,
            "reference": reference,
            "max_probes": max_probes, "timed_steps": timed_steps, "seed": seed, "config": FRONTIER_CONFIG,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def run_frontier(budgets: list[float], out: Path, device: torch.device, quick: bool = False,
                 methods: dict[str, tuple[str, dict]] | None = None, seed: int = 0, max_probes: int | None = None,
                 timed_steps: int = 5, resume: bool = False, host_limit_gib: float | None = None, log=say) -> int:
    """Every method's frontier at every budget (GiB) into OUT/frontier.{json,md,png}; returns how many
    methods failed (refused ones are not failures). `host_limit_gib`: the most host memory offload may
    pin (default: HOST_FRACTION of what is available now)."""
    methods = FRONTIER_METHODS if methods is None else methods
    axes = FRONTIER_AXES_QUICK if quick else FRONTIER_AXES
    rank = FRONTIER_RANK_QUICK if quick else FRONTIER_RANK
    budgets = sorted(set(budgets))
    reference = FRONTIER_REFERENCE_QUICK if quick else FRONTIER_REFERENCE
    settings = _settings(budgets, device, quick, rank, axes, max_probes, timed_steps, seed, reference)
    host = host_available_bytes()
    host_limit = int(host_limit_gib * GIB) if host_limit_gib else int(HOST_FRACTION * host) if host else None
    host_limit = host_limit if device.type == "cuda" else None
    cfg = method_config({}, device, quick, 1, axes["batch"]["seq"], seed, rank)
    res = {"meta": {"gpu": settings["gpu"], "device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
                    "cpu": cpu_name(), "command": command_line(__spec__, __file__),
                    "argv": list(sys.argv),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "peak": CUDA_PEAK if device.type == "cuda" else CPU_ESTIMATE,
                    "peak_kind": "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_estimate",
                    "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
                    "model": {k: getattr(cfg.model, k) for k in ("arch", "vocab_size", "n_embd", "n_head", "n_layer",
                                                                 "head", "head_chunk")},
                    "optimizer": f"{cfg.optim.name}, grad clip {cfg.optim.grad_clip}", "step": "eager TrainStep",
                    "host_limit_bytes": host_limit},
           "settings": settings, "budgets_gib": budgets, "methods": {}}
    path = out / "frontier.json"
    if resume and path.is_file():
        old = json.loads(path.read_text())
        if (theirs := old.get("settings")) != (ours := json.loads(json.dumps(settings))):
            # refused rather than started over: the next write would replace the finished methods
            differ = sorted(k for k in {*ours, *(theirs or {})} if (theirs or {}).get(k) != ours.get(k))
            raise FrontierError(f"--resume: {path} was made with other settings ({', '.join(differ)}); "
                                "give another --out, or leave out --resume to start over")
        res["methods"] = {k: v for k, v in old.get("methods", {}).items() if v.get("status") in ("ok", "refused")}
        log(f"[frontier] resuming: {len(res['methods'])} method(s) kept from {path}")

    def flush() -> None:
        atomic_write_text(path, json.dumps(res, indent=1))
        write_report(out, res)

    old_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as basis-bench's gpt2-small size: TF32 where autocast leaves float32
    try:
        for mid, (label, overrides) in methods.items():
            if mid in res["methods"]:
                continue
            res["methods"][mid] = run_method(mid, label, overrides, budgets, device, axes, quick, seed, rank,
                                             max_probes, timed_steps, host_limit, log, reference)
            flush()
        flush()
    finally:
        torch.set_float32_matmul_precision(old_precision)
    return sum(m["status"] == "error" for m in res["methods"].values())


def main(argv: list[str] | None = None) -> None:
    """`python -m basis_train.experiments.frontier`: the frontier without typer (argparse)."""
    p = argparse.ArgumentParser(prog="python -m basis_train.experiments.frontier",
                                description="Memory frontier: largest batch and context per memory method under "
                                            "fixed budgets (also: basis-bench --frontier).")
    p.add_argument("--budget", required=True, help="memory budgets in GiB, comma-separated (e.g. 8,16,40)")
    p.add_argument("--out", type=Path, default=Path("runs/frontier"), help="output directory")
    p.add_argument("--methods", default="all", help=f"comma-separated, from {list(FRONTIER_METHODS)}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="tiny model and sizes, for a CPU smoke test")
    p.add_argument("--resume", action="store_true", help="keep the methods OUT/frontier.json already has")
    p.add_argument("--max-probes", type=int, default=None, help="per search [default: what a full search needs]")
    p.add_argument("--timed-steps", type=int, default=5, help="timed steps at each answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--host-limit-gib", type=float, default=None,
                   help=f"most host memory offload may pin [default: {HOST_FRACTION:g} of MemAvailable at the start]")
    a = p.parse_args(argv)
    try:
        budgets, names = parse_budgets(a.budget), parse_methods(a.methods, FRONTIER_METHODS)
    except ValueError as e:
        p.error(str(e))
    if a.max_probes is not None and a.max_probes < 1 or a.timed_steps < 1:
        p.error("--max-probes and --timed-steps must be >= 1")
    if a.host_limit_gib is not None and not a.host_limit_gib > 0:
        p.error("--host-limit-gib must be > 0")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    try:
        failed = run_frontier(budgets, a.out, dev, a.quick, {k: FRONTIER_METHODS[k] for k in names}, a.seed,
                              a.max_probes, a.timed_steps, a.resume, a.host_limit_gib)
    except FrontierError as e:
        p.error(str(e))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
