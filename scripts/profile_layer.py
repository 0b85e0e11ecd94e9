"""Where a BasisLinear step spends its time on the GPU: kernels vs host.

    python3 scripts/profile_layer.py --out $OUT/profile     # writes profile.json, profile.md

One process, one shape (default rows 8192, 768 -> 3072, R = 64, bf16 autocast like basis-bench's
layer benchmark), for nn.Linear and BasisLinear as this process's sketch is configured. To
profile another sketch implementation, run it again with the environment that selects it
(the fused Triton kernel on CUDA; the PyTorch sketch where Triton is missing) and a --tag naming it. For each: the wall time of a
forward + backward (CUDA events, median), the host time to issue it (the CPU returns before the
GPU finishes unless it is the bottleneck), and from torch.profiler the kernels launched per step,
their summed device time and the largest ones. Wall time well above the kernels' sum means the
step is launch/host bound; close to it means the kernels themselves are the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basis_train.core.basis_linear import BasisLinear  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--n-in", type=int, default=768)
    p.add_argument("--n-out", type=int, default=3072)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default="out/profile")
    p.add_argument("--tag", default="", help="appended to the BasisLinear row's name, e.g. 'eager sketch'")
    return p.parse_args()


def make_step(layer, x, dy, autocast: bool):
    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        y.backward(dy)
    return step


def measure(name: str, step, iters: int) -> dict:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    walls, hosts = [], []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        step()
        hosts.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        walls.append(start.elapsed_time(end))
    prof_iters = 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(prof_iters):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    n_kernels = sum(c for c, _ in kernels.values()) / prof_iters
    kernel_ms = sum(t for _, t in kernels.values()) / prof_iters / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:8]
    return {
        "name": name, "wall_ms_median": statistics.median(walls), "host_ms_median": statistics.median(hosts),
        "kernels_per_step": n_kernels, "kernel_ms_per_step": kernel_ms,
        "top_kernels": [{"name": k[:120], "per_step": c / prof_iters, "ms_per_step": t / prof_iters / 1e3}
                        for k, (c, t) in top],
    }


def main():
    a = parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    autocast = a.dtype == "bf16"
    dtype = torch.bfloat16 if autocast else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, a.n_in, generator=g).to("cuda", dtype).requires_grad_(True)
    dy = torch.randn(a.rows, a.n_out, generator=g).to("cuda", dtype)
    rows = []
    ref = nn.Linear(a.n_in, a.n_out).cuda()
    rows.append(measure("nn.Linear", make_step(ref, x, dy, autocast), a.iters))
    basis = BasisLinear(a.n_in, a.n_out, rank=a.rank).cuda()
    name = f"BasisLinear R={a.rank}" + (f", {a.tag}" if a.tag else "")
    rows.append(measure(name, make_step(basis, x, dy, autocast), a.iters))
    base = rows[0]["wall_ms_median"]
    for r in rows:
        r["ratio_to_linear"] = r["wall_ms_median"] / base
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "argv": sys.argv,
            "shape": [a.rows, a.n_in, a.n_out], "rank": a.rank, "dtype": a.dtype, "iters": a.iters,
            "env": {k: v for k, v in os.environ.items() if k.startswith("BASIS_")}}
    (out / "profile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# BasisLinear profile: rows {a.rows}, {a.n_in} -> {a.n_out}, R = {a.rank}, {a.dtype}",
             "", f"{meta['gpu']}, torch {meta['torch']}; `{' '.join(sys.argv)}`", "",
             "| layer | wall ms (median) | ratio to nn.Linear | host ms to issue | kernels / step | kernel ms / step |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['wall_ms_median']:.3f} | {r['ratio_to_linear']:.2f} | "
                     f"{r['host_ms_median']:.3f} | {r['kernels_per_step']:.0f} | {r['kernel_ms_per_step']:.3f} |")
    for r in rows:
        lines += ["", f"Largest kernels, {r['name']}:", ""]
        lines += [f"- {k['ms_per_step']:.3f} ms ({k['per_step']:.0f}x) {k['name']}" for k in r["top_kernels"]]
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
