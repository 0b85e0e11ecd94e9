"""Data-parallel scaling of basis-train: exact and BASIS on 1 and N GPUs, GPT-2-small size.

    python3 scripts/ddp_bench.py                      # on a 2-GPU machine, writes $OUT/ddp_results.json, $OUT/ddp.md

Every run is a real `torchrun ... -m basis_train.cli` launch (1 GPU too: WORLD_SIZE=1 is the
plain single-process path). Throughput is read from metrics.jsonl after the first
evaluation, so start-up, the measuring first step and lazy initialisation are excluded.
DDP turns CUDA graphs off, so scaling efficiency is taken against the 1-GPU run without
graphs; 1-GPU runs with graphs follow when the time budget allows, to show what graphs add.

Offline: the token cache must already be under $BASIS_TRAIN_CACHE (default ./.cache), e.g. the
embedded wiki corpus for configs/gpt2-small.yaml; the machine needs neither datasets nor wandb.
`--config ... --device cpu` runs the same pipeline on CPU (gloo) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# NVLink multicast must stay off on the lent GPUs; set in every launch's environment.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GIB = 2**30


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/gpt2-small.yaml")
    p.add_argument("--gpus", type=int, default=2, help="the multi-GPU world size to compare against 1 GPU")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50, help="the first interval is warm-up, not timed")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--budget-s", type=float, default=420, help="skip optional runs past this much wall time")
    p.add_argument("--run-timeout-s", type=float, default=150, help="per launch; the 4 required runs fit 10 min")
    return p.parse_args()


def base_env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    env.setdefault("BASIS_TRAIN_CACHE", str(ROOT / ".cache"))
    env.update(NO_MULTICAST)
    return env


def check_cache(config: str, env: dict) -> str:
    from basis_train.data.corpus import cached_corpus_path
    from basis_train.training.config import load_config

    d = load_config(Path(config)).data
    path = cached_corpus_path(d.dataset, d.data_files, d.max_docs, d.cache_dir or env["BASIS_TRAIN_CACHE"])
    if not (path / "meta.json").is_file():
        sys.exit(f"no token cache at {path}: build it where `datasets` is installed "
                 f"(basis-train --steps 1 ...) and carry it, or set BASIS_TRAIN_CACHE")
    return str(path)


def command(a, method: str, gpus: int, graphs: bool, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "basis_train.cli", "--quiet", "--config", a.config, "--method", method,
           "--steps", str(a.steps), "--eval-every", str(a.eval_every), "--checkpoint-every", str(10 * a.steps),
           "--device", a.device, "--wandb", "off", "--out", str(out)]
    if method == "basis":
        cmd += ["--rank", str(a.rank), "--sketch-layers", "mlp+head"]
    cmd.append("--cuda-graphs" if graphs else "--no-cuda-graphs")
    return cmd


def timed_throughput(metrics: list[dict], eval_every: int) -> dict:
    """Tokens/s over the evaluation intervals after the first (metrics' timings exclude eval)."""
    timed, prev, secs, tokens = [], None, 0.0, 0.0
    for m in metrics:
        if prev is not None and m["step"] > eval_every:
            dt = m["ms_per_step"] * (m["step"] - prev) / 1000
            secs, tokens = secs + dt, tokens + m["tokens_per_s"] * dt
            timed.append(m["step"] - prev)
        prev = m["step"]
    if not secs:
        return {"tokens_per_s": None, "ms_per_step": None, "timed_steps": 0}
    return {"tokens_per_s": tokens / secs, "ms_per_step": 1000 * secs / sum(timed), "timed_steps": sum(timed)}


def one_run(a, method: str, gpus: int, graphs: bool, work: Path, env: dict) -> dict:
    name = f"{method}-{gpus}gpu-{'graphs' if graphs else 'nographs'}"
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(a, method, gpus, graphs, out)
    row = {"name": name, "method": method, "gpus": gpus, "cuda_graphs_requested": graphs,
           "command": " ".join(f"{k}={v}" for k, v in NO_MULTICAST.items()) + " " + shlex.join(cmd)}
    print(f"== {name}: {row['command']}", flush=True)
    t0 = time.perf_counter()
    # Own session: on a timeout the whole group goes, workers included, not just torchrun.
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=a.run_timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        rc = "timeout"
    row["wall_s"] = time.perf_counter() - t0
    if rc != 0 or not (out / "summary.json").is_file():
        row.update(ok=False, returncode=rc, stderr_tail=err[-3000:])
        print(f"   FAILED ({rc}):\n{err[-3000:]}", flush=True)
        return row
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    by_rank = summary.get("by_rank", {})
    row.update(
        ok=True, world_size=summary.get("world_size"), global_batch_size=summary.get("global_batch_size"),
        cuda_graphs=summary["cuda_graphs"], gpu=summary.get("gpu"), torch=summary.get("torch"),
        **timed_throughput(metrics, a.eval_every),
        activation_bytes=summary["activation_bytes"],
        step_peak_bytes_by_rank=by_rank.get("step_peak_bytes"),
        cuda_max_allocated_bytes_by_rank=by_rank.get("cuda_max_allocated_bytes"),
        final_train_loss=summary["final_train_loss"], final_val_loss=summary["final_val_loss"],
        metrics=metrics,
    )
    print(f"   {row['tokens_per_s'] or 0:,.0f} tokens/s, {row['wall_s']:.0f} s wall", flush=True)
    shutil.rmtree(out, ignore_errors=True)  # the checkpoint is GBs at this size
    return row


def _gib(values) -> str:
    if not values or any(v is None for v in values):
        return "-"
    return " / ".join(f"{v / GIB:.2f}" for v in values)


def markdown(a, rows: list[dict], cache: str) -> str:
    lines = [
        f"# DDP scaling: {a.config}, {a.steps} steps, timed after step {a.eval_every}",
        "",
        ("Per-GPU batch from the config; global batch = per-GPU batch x GPUs. Scaling = "
        f"{a.gpus}-GPU tokens/s / 1-GPU tokens/s and efficiency = scaling / {a.gpus}, both against the 1-GPU run "
        "without CUDA graphs (DDP disables them). "
        "Memory columns list rank 0 / rank 1 ...: the allocator peak of one training step "
        "after warm-up (step_peak_bytes) and torch.cuda.max_memory_allocated over the run."),
        "",
        ("| run | GPUs | CUDA graphs | global batch | tokens/s | ms/step | scaling | efficiency "
        "| activation bytes / GPU (GiB) | step peak / GPU (GiB) | max allocated / GPU (GiB) | train loss | val loss |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['name']} | {r['gpus']} | failed: {r['returncode']} | | | | | | | | | | |")
            continue
        scaling, eff = (f"{r[k]:.3f}" if k in r else "-" for k in ("scaling", "efficiency"))
        lines.append(
            f"| {r['name']} | {r['gpus']} | {r['cuda_graphs']} | {r['global_batch_size']} "
            f"| {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {scaling} | {eff} "
            f"| {r['activation_bytes'] / GIB:.3f} | {_gib(r['step_peak_bytes_by_rank'])} "
            f"| {_gib(r['cuda_max_allocated_bytes_by_rank'])} | {r['final_train_loss']:.4f} | {r['final_val_loss']:.4f} |"
        )
    gpu = next((r.get("gpu") for r in rows if r.get("ok")), None)
    lines += ["", f"GPU: {gpu}; torch {next((r.get('torch') for r in rows if r.get('ok')), '?')}; token cache {cache}.",
              "", "Commands (run from the repository root with PYTHONPATH=. and BASIS_TRAIN_CACHE set):", "", "```"]
    lines += [r["command"] for r in rows]
    lines += ["```", ""]
    return "\n".join(lines)


def main() -> None:
    a = parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "ddp_bench_runs"
    env = base_env()
    cache = check_cache(a.config, env)
    plan = [("exact", 1, False), ("exact", a.gpus, False), ("basis", 1, False), ("basis", a.gpus, False),
            ("exact", 1, True), ("basis", 1, True)]
    required = 4
    t_start, rows = time.perf_counter(), []
    for i, (method, gpus, graphs) in enumerate(plan):
        elapsed = time.perf_counter() - t_start
        longest = max((r["wall_s"] for r in rows), default=0)
        if i >= required and elapsed + 1.2 * longest > a.budget_s:
            print(f"== skipping {method} {gpus} GPU graphs={graphs}: {elapsed:.0f} s used of {a.budget_s:.0f}")
            continue
        rows.append(one_run(a, method, gpus, graphs, work, env))
    for r in rows:
        base = next((b for b in rows if b["ok"] and b["method"] == r["method"] and b["gpus"] == 1
                     and not b["cuda_graphs"]), None)
        if r["ok"] and base and r["gpus"] > 1:
            r["scaling"] = r["tokens_per_s"] / base["tokens_per_s"]  # N-GPU tokens/s over 1-GPU tokens/s
            r["efficiency"] = r["scaling"] / r["gpus"]
    result = {"config": a.config, "steps": a.steps, "timed_after_step": a.eval_every, "gpus": a.gpus,
              "sketch_rank": a.rank, "token_cache": cache, "env": NO_MULTICAST,
              "total_wall_s": time.perf_counter() - t_start, "runs": rows}
    (out / "ddp_results.json").write_text(json.dumps(result, indent=1))
    (out / "ddp.md").write_text(markdown(a, rows, cache))
    print((out / "ddp.md").read_text())
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
