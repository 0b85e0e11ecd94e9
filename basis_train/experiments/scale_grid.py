"""Issue 25's GPT-2-small grid, run in chunks of one device call under a wall-clock budget.

    TIME_BUDGET=540 python -m basis_train.experiments.scale_grid --grid /tmp/scale25 [--gpus 0,1]

Each call starts the unfinished runs that its budget can finish, in priority order (the main grid's
seed-0 pairs first), one per GPU (`--gpus 0,0`: two on GPU 0, each recording runs_per_gpu 2); finished
runs (summary.json of the same config) are skipped, runs with a checkpoint resume. Near the deadline
the running ones get SIGTERM, checkpoint and stop; the next call resumes them on the same (warm)
machine. `--seed-from DIR` first copies in the finished runs of a previous machine, `--pack FILE` tars
the finished ones (no checkpoints) for the trip back.

Only the standard library and basis_train's config and training code are imported (the GPU
machine's Python has no typer): each run is a child process of this module (`--child`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from basis_train.experiments.grid_state import (
    DIVERGED,
    Timings,
    diverged,
    finished,
    pack,
    seed_from,
    stale,
    steps_done,
)
from basis_train.experiments.sgd_sweep import SGD, sgd_basis_lrs, sgd_sweep
from basis_train.training.config import apply_overrides, dump_config, load_config

MAIN_SEEDS = (0, 1, 2)
# In the order a short GPU session should spend its time: the pairs that answer the most first.
MAIN = [("exact", "exact", {}), ("basis_R1024", "basis", {"sketch.rank": 1024}),
        ("basis_R256", "basis", {"sketch.rank": 256}),
        ("basis_R1024_all", "basis", {"sketch.rank": 1024, "sketch.layers": "all"}),
        ("basis_R64", "basis", {"sketch.rank": 64}), ("basis_R4096", "basis", {"sketch.rank": 4096}),
        ("exact_ckpt", "exact", {"model.checkpoint_blocks": True})]
EXACT, R1024 = MAIN[0], MAIN[1]
_SGD_BASIS_NAME = re.compile(r"basis_R1024_sgd[0-9.e+-]+-s0")  # plan()'s names of the SGD BASIS runs
LR_FACTORS = (0.25, 0.5, 2.0)
LONG_STEPS = 8000
# An evaluation scores all 1.6M held-out tokens (3 s on an H100): every 250 steps, 30% of a long run. It
# changes no training (tests/training/test_train.py), only how often the gap is read.
LONG_EVAL_EVERY = 1000
NANOGPT_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "nanogpt_reference.py"
MARGIN_S = 45  # left at the end of the budget to stop runs, write the report and pack


@dataclass
class Job:
    name: str  # run directory name under grid/runs
    group: str  # main-s0, reference, lr, sgd-exact, sgd-basis, long-s0, ...
    overrides: dict
    kind: str = "train"  # or "nanogpt": scripts/nanogpt_reference.py on the same batches


def plan(grid: Path, base, nanogpt: bool = False) -> list[Job]:
    """Every run of the grid in priority order; the SGD BASIS runs appear once exact's sweep is done.
    After seed 0's main grid, the checks of its exact baseline: nanoGPT's model on the same batches
    (with `nanogpt`) and exact without torch.compile, with and without CUDA graphs (speed must change
    no result)."""
    jobs = []
    for seed in MAIN_SEEDS:
        jobs += [Job(f"{name}-s{seed}", f"main-s{seed}", {"train.method": m, **ov, "train.seed": seed})
                 for name, m, ov in MAIN]
        if seed == MAIN_SEEDS[0]:
            if nanogpt:
                jobs.append(Job(f"nanogpt-s{seed}", "reference", {"train.seed": seed}, kind="nanogpt"))
            jobs.append(Job(f"exact_eager-s{seed}", "reference",
                            {"train.method": "exact", "train.compile": False, "train.seed": seed}))
            # Not compiled ended 0.046 above compiled on an H200 (not on a CPU): is it the eager step's CUDA
            # graph, or does eager bf16 cost that much outside this project too (nanoGPT not compiled)?
            jobs.append(Job(f"exact_eager_nographs-s{seed}", "reference",
                            {"train.method": "exact", "train.compile": False, "train.cuda_graphs": False, "train.seed": seed}))
            if nanogpt:
                jobs.append(Job(f"nanogpt_eager-s{seed}", "reference", {"train.seed": seed, "train.compile": False}, "nanogpt"))
        elif nanogpt:
            # The outside reference on every seed's batches: whether exact's spread over seeds is the data's or ours.
            jobs.append(Job(f"nanogpt-s{seed}", "reference", {"train.seed": seed}, kind="nanogpt"))
    for f in LR_FACTORS:
        for name, m, ov in (EXACT, R1024):
            jobs.append(Job(f"{name}_lr{f:g}x-s0", "lr", {"train.method": m, **ov, "optim.lr_factor": f, "train.seed": 0}))
    lrs, _ = sgd_sweep(grid)
    jobs += [Job(f"exact_sgd{lr:g}-s0", "sgd-exact", {"train.method": "exact", **SGD, "optim.lr": lr, "train.seed": 0})
             for lr in lrs]
    jobs += [Job(f"basis_R1024_sgd{lr:g}-s0", "sgd-basis",
                 {"train.method": "basis", "sketch.rank": 1024, **SGD, "optim.lr": lr, "train.seed": 0})
             for lr in sgd_basis_lrs(grid)]
    # TF32 on (train.tf32), seed 1 (H100s ran its plain pair): exact's run reruns exact-s1's configuration (TF32
    # cannot reach an exact step): how far two runs of one seed drift; BASIS's, what TF32 does to the head's dW product.
    jobs += [Job(f"{name}_tf32-s1", "tf32", {"train.method": m, **ov, "train.tf32": True, "train.seed": 1})
             for name, m, ov in (EXACT, R1024)]
    # The memory methods that change gradients (8-bit saved activations, alone and under BASIS). Their
    # hooks need the model uncompiled, so they pair with exact uncompiled of the same seeds.
    for seed in MAIN_SEEDS:
        eager = {"train.compile": False, "train.seed": seed}
        if seed != MAIN_SEEDS[0]:  # seed 0's is the reference group's
            jobs.append(Job(f"exact_eager-s{seed}", "methods", {"train.method": "exact", **eager}))
        jobs.append(Job(f"exact_int8-s{seed}", "methods",
                        {"train.method": "exact", "train.saved_activations": "int8", **eager}))
        jobs.append(Job(f"basis_R1024_int8-s{seed}", "methods",
                        {"train.method": "basis", "sketch.rank": 1024, "train.saved_activations": "int8", **eager}))
    stretch = LONG_STEPS / base.train.steps  # the whole schedule stretched: warmup too
    long = {"train.steps": LONG_STEPS, "optim.warmup_steps": round(base.optim.warmup_steps * stretch),
            "train.eval_every": LONG_EVAL_EVERY}
    for seed in (0, 1):
        for name, m, ov in (EXACT, R1024):
            jobs.append(Job(f"{name}_{LONG_STEPS}-s{seed}", f"long-s{seed}",
                            {"train.method": m, **ov, **long, "train.seed": seed}))
    # Beyond the issue: the MLPs without the head (whose sketch saves no memory), paired with mlp+head.
    jobs += [Job(f"basis_R1024_mlp-s{s}", "layers", {"train.method": "basis", **R1024[2], "sketch.layers": "mlp",
                                                     "train.seed": s}) for s in MAIN_SEEDS]
    return jobs


# ------------------------------------------------------------------ the scheduler


class Grid:
    def __init__(self, args):
        self.args, self.grid = args, Path(args.grid)
        (self.grid / "runs").mkdir(parents=True, exist_ok=True)
        self.base = apply_overrides(load_config(args.config), args.overrides)
        self.deadline = time.monotonic() + args.budget - MARGIN_S
        self.timings = Timings(self.grid / "timings.jsonl", args.default_s_per_step, args.startup_s)
        # What the longest call could finish: a run beyond it may be started partway (see fits).
        self.longest = max(args.budget, args.call_s) - MARGIN_S
        self.lock, self.taken, self.procs, self.warned, self.stopping = threading.Lock(), set(), {}, set(), False
        self.per_gpu = {g: args.gpus.split(",").count(g) for g in args.gpus.split(",")} if args.gpus else {}

    def say(self, msg: str) -> None:
        print(line := f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
        with (self.grid / "grid.log").open("a") as f:
            f.write(line + "\n")

    def cfg(self, job: Job):
        return apply_overrides(self.base, {**job.overrides, "log.out": str(self.grid / "runs" / job.name)})

    def fits(self, job: Job, cfg, todo: int, left: float) -> bool:
        """Whether to start a run with `left` seconds to the deadline: if it finishes by then; or,
        for a run longer than any one call could be (--call-s: the 8,000-step ones, on a slow trainer),
        if it reaches its next checkpoint, from which the next call on the same warm machine resumes it
        (the nanoGPT reference keeps no checkpoint). A run that a full call could finish waits for one:
        started at the end of a short call, it would be stopped, and lost with the machine."""
        est = self.timings.estimate(cfg, todo, job.kind)
        if est <= left:
            return True
        return (job.kind == "train" and est > self.longest
                and left >= self.timings.estimate(cfg, cfg.train.checkpoint_every) * 1.2)

    def selected(self, job: Job) -> bool:
        """Whether --only (groups or run names; empty: all) takes this job."""
        return not self.args.only or job.group in self.args.only or job.name in self.args.only

    def plan(self) -> list[Job]:
        return plan(self.grid, self.base, nanogpt=bool(self.args.nanogpt))

    def unknown_only(self) -> list[str]:
        """--only entries that name no run or group of the plan. The SGD BASIS runs count as known
        before exact's sweep has placed them in the plan (their group and names come with it)."""
        jobs = self.plan()
        known = {j.name for j in jobs} | {j.group for j in jobs} | {"sgd-basis"}
        return sorted(o for o in self.args.only if o not in known and not _SGD_BASIS_NAME.fullmatch(o))

    @staticmethod
    def done(job: Job, run: Path, cfg) -> bool:
        if job.kind == "nanogpt":  # its summary has no config hash: the seed and steps say it is this one
            try:
                s = json.loads((run / "summary.json").read_text())
            except (OSError, ValueError):
                return False
            return (s.get("seed") == cfg.train.seed and s.get("steps") == cfg.train.steps
                    and s.get("compile", True) == cfg.train.compile)
        return finished(run, cfg)

    def settled(self, job: Job, run: Path, cfg) -> bool:
        """Nothing left to run: finished, or diverged (a result of an lr sweep, not a run to retry)."""
        return self.done(job, run, cfg) or diverged(run, cfg)

    def next_job(self):
        """The first unfinished, untaken job that fits before the deadline."""
        with self.lock:
            if self.stopping:
                return None
            left = self.deadline - time.monotonic()
            for job in self.plan():
                if job.name in self.taken or not self.selected(job):
                    continue
                cfg, run = self.cfg(job), self.grid / "runs" / job.name
                if self.settled(job, run, cfg):
                    continue
                if job.kind == "train" and stale(run, cfg):
                    if job.name not in self.warned:
                        self.warned.add(job.name)
                        self.say(f"skip {job.name}: {run} holds a finished run of another config; move it away")
                    continue
                todo = cfg.train.steps - (steps_done(run, cfg) if job.kind == "train" else 0)
                if not self.fits(job, cfg, todo, left):
                    continue
                self.taken.add(job.name)
                return job, cfg, todo
            return None

    def run_one(self, job: Job, cfg, todo: int, gpu: str | None) -> int:
        run = self.grid / "runs" / job.name
        run.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run / "requested.yaml")
        resume = job.kind == "train" and (run / "checkpoint.pt").is_file()
        if job.kind == "nanogpt":
            cmd = [sys.executable, str(NANOGPT_SCRIPT), "--model-py", str(self.args.nanogpt), "--out", str(run),
                   "--config", str(self.args.config), "--seed", str(cfg.train.seed),
                   *(() if cfg.train.compile else ("--no-compile",)),
                   *((f"--data-files={cfg.data.data_files}",) if cfg.data.data_files else ()),
                   *(("--dataset", cfg.data.dataset) if cfg.data.dataset not in (None, "files") else ())]
        else:
            cmd = [sys.executable, "-m", "basis_train.experiments.scale_grid", "--child",
                   str(run / "requested.yaml"), str(run)] + (["--resume"] if resume else [])
        env = dict(os.environ, BASIS_TRAIN_RUNS_PER_GPU=str(self.per_gpu.get(gpu, 1)),
                   **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {}))
        self.say(f"start {job.name} ({job.group}, {'resume, ' if resume else ''}{todo} steps"
                 f"{f', GPU {gpu}' if gpu is not None else ''}; estimate {self.timings.estimate(cfg, todo, job.kind):.0f}s)")
        t = time.monotonic()
        with (run / "train.log").open("a") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            with self.lock:
                self.procs[job.name] = proc
            rc = proc.wait()
        with self.lock:
            self.procs.pop(job.name, None)
        wall = time.monotonic() - t
        if rc == 0:
            self.timings.add(cfg, todo, wall, job.kind)
        if rc in (0, 3) and not self.args.keep_checkpoints:  # 3: diverged, nothing to resume
            (run / "checkpoint.pt").unlink(missing_ok=True)
        self.say(f"{'done' if rc == 0 else f'stopped rc={rc}'}: {job.name} ({wall:.0f}s)")
        return rc

    def worker(self, gpu: str | None) -> None:
        while (picked := self.next_job()) is not None:
            self.run_one(*picked, gpu)

    def watchdog(self, workers: list[threading.Thread]) -> None:
        """At the deadline, stop the running children (SIGTERM: they checkpoint, exit 130)."""
        while any(w.is_alive() for w in workers):
            if time.monotonic() > self.deadline:
                with self.lock:
                    self.stopping = True
                    procs = list(self.procs.items())
                for name, proc in procs:
                    self.say(f"deadline: stopping {name} (it checkpoints; the next call resumes it)")
                    os.killpg(proc.pid, signal.SIGTERM)
                for w in workers:
                    w.join(timeout=60)
                return
            time.sleep(1)

    def run(self) -> None:
        gpus = self.args.gpus.split(",") if self.args.gpus else [None]
        workers = [threading.Thread(target=self.worker, args=(g,), daemon=True) for g in gpus]
        for w in workers:
            w.start()
        self.watchdog(workers)
        cfgs = [(j, self.cfg(j)) for j in self.plan() if self.selected(j)]
        left = [j.name for j, c in cfgs if not self.done(j, self.grid / "runs" / j.name, c)]
        gone = [j.name for j, c in cfgs if diverged(self.grid / "runs" / j.name, c)]
        self.say(f"finished {len(cfgs) - len(left)} of {len(cfgs)} planned runs"
                 + (f"; diverged (non-finite loss): {', '.join(gone)}" if gone else "")
                 + (f"; still to run: {', '.join(n for n in left if n not in gone)}" if set(left) - set(gone) else ""))


def child(config: Path, out: Path, resume: bool) -> int:
    from basis_train.training.config import config_hash
    from basis_train.training.train import Interrupted, NonFiniteLoss, train

    cfg = load_config(config)
    try:
        train(cfg, out, resume=resume, overwrite=not resume, progress=False)
    except Interrupted as e:
        print(e, flush=True)
        return 130
    except NonFiniteLoss as e:
        print(e, flush=True)
        (out / DIVERGED).write_text(json.dumps({"message": str(e), "config_hash": config_hash(cfg)}) + "\n")
        return 3
    return 0


def _overrides(pairs: list[str]) -> dict:
    """--set section.key=value: the value read as YAML (true, 1.0e-3, [0.9, 0.95])."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set wants section.key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m basis_train.experiments.scale_grid", description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=Path, default=Path("/tmp/scale25"), help="working grid directory (runs/ inside)")
    ap.add_argument("--config", default="configs/gpt2-small-code.yaml")
    ap.add_argument("--data-files", help="corpus glob [default: every **/*.py of this Python's site-packages]")
    ap.add_argument("--dataset", help="fineweb-edu instead of files")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run, e.g. train.compile=false (repeatable)")
    ap.add_argument("--gpus", default=os.environ.get("GPUS", ""), help="comma list: one run at a time on each, 0,0: two")
    ap.add_argument("--only", default="", help="comma list of groups (main-s0, reference, lr, ...: plan's) or run "
                                               "names (exact-s1); the grid's order either way [default: all]")
    ap.add_argument("--seed-from", type=Path, help="copy finished runs from this grid (or runs/) directory first")
    ap.add_argument("--pack", type=Path, help="write the finished runs (no checkpoints) to this .tgz at the end")
    ap.add_argument("--report", type=Path, help="write the scale report of the finished runs here at the end")
    ap.add_argument("--default-s-per-step", type=float, default=0.08, help="estimate before any run finished")
    ap.add_argument("--startup-s", type=float, default=60.0, help="start-up of a run (data, compile) in estimates")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--call-s", type=float, default=600.0, help="the longest call the machine gives (s): runs that"
                    " no call can finish start if they reach a checkpoint")
    ap.add_argument("--nanogpt", type=Path, help="nanoGPT's model.py (kept out of the repository): the outside reference")
    ap.add_argument("--tokenize-only", action="store_true", help="build the corpus's token cache and stop")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(Path(args.child[0]), Path(args.child[1]), args.resume)
    args.budget = float(os.environ.get("TIME_BUDGET", "540"))
    args.only = {g for g in args.only.split(",") if g}
    data = {"data.dataset": args.dataset} if args.dataset else {"data.data_files": args.data_files or site_glob()}
    args.overrides = {**data, **_overrides(args.sets)}
    grid = Grid(args)
    if args.seed_from:
        grid.say(f"copied {seed_from(args.seed_from, grid.grid)} finished runs from {args.seed_from}")
    unknown = grid.unknown_only()
    if unknown:  # a misspelt name would otherwise select nothing and spend a GPU call on it
        hint = " (nanoGPT's runs need --nanogpt)" if not args.nanogpt and any(u.startswith("nanogpt") for u in unknown) else ""
        print(f"error: --only names no run or group of this grid: {', '.join(unknown)}{hint}", file=sys.stderr)
        return 2
    _tokenize(grid)
    if args.tokenize_only:
        return 0
    grid.run()
    if args.report:
        try:  # needs matplotlib and scipy; the runs matter more than a report written here
            from basis_train.reporting.scale import write_report

            write_report(grid.grid, args.report,
                         command=" ".join(["python -m basis_train.experiments.scale_grid", *sys.argv[1:]]))
        except (ImportError, OSError, ValueError) as e:
            grid.say(f"report not written: {type(e).__name__}: {e}")
    if args.pack:
        pack(grid.grid, args.pack)
    return 0


def site_glob() -> str:
    import site

    return f"{site.getsitepackages()[0]}/**/*.py"


def _tokenize(grid: Grid) -> None:
    """Once, on all cores, before the runs start (they then read the token cache)."""
    from basis_train.training.setup import load_data

    t = time.monotonic()
    splits, source = load_data(grid.base)
    grid.say(f"corpus ready in {time.monotonic() - t:.0f}s: {source}; {splits.info['n_train_chunks']:,} train chunks")


if __name__ == "__main__":
    sys.exit(main())
