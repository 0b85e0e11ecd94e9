"""A grid's runs grouped into configurations, each paired by seed with its own exact baseline.

A configuration is everything about a run but its seed: method, rank, sketched layers, the other
variant tags (checkpointing, ...), optimiser, lr, lr factor, steps and data order. Its baseline is
the plain exact run that shares all of the training protocol (optimiser, lr, lr factor, steps, data
order), so an SGD run is compared with exact SGD at its lr and an 8,000-step run with exact at
8,000 steps; never across protocols. Gaps are paired by seed (same initial weights and batches) at
the final step and at every evaluation both runs logged.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from basis_train.reporting.report import config_label, load_metrics
from basis_train.reporting.stats import mean_ci, paired_diff

# The memory fields under their current names, then the names older summaries used.
_RENAMED = {"activation_bytes": "peak_activation_bytes", "step_peak_bytes": "cuda_peak_step_bytes"}


@dataclass(frozen=True, order=True)
class Protocol:
    """How a run was trained, method aside: runs are paired only within one protocol."""

    optimizer: str
    lr: float
    lr_factor: float
    steps: int
    data_order: str


# How a run executed, which must change no result: the tag a run gets when it departs from the others.
_MODE_TAGS = {"compiled": ("compiled", "eager"), "graphs": ("graphs", "no-graphs")}
# TF32 (variant_of's tag) is a mode too: an exact bf16 step has no float32 matmul for it to round.
MODE_TAG_NAMES = frozenset(t for pair in _MODE_TAGS.values() for t in pair) | {"tf32"}
# Other implementations trained on the same batches (scripts/nanogpt_reference.py).
REFERENCE_METHODS = frozenset({"nanogpt"})


@dataclass(frozen=True)
class Setting:
    """One configuration: a protocol and the method with its options."""

    protocol: Protocol
    method: str
    rank: int | None
    tags: str  # variant_of's tags without the lr factor's (layers=all, ckpt, cce, lam0, ...)

    @property
    def baseline(self) -> Setting:
        """Exact of the same protocol. A method run in another execution mode (not compiled, say, as
        saved-activation hooks require) pairs with exact in that mode, so that the mode's own effect
        is not charged to the method; plain exact in another mode pairs with the usual exact, which
        is the check that the mode changes no result. So does an outside reference in any mode: it
        checks the exact run the study's gaps are measured against."""
        tags = [t for t in self.tags.split(",") if t]
        mode = [t for t in tags if t in MODE_TAG_NAMES]
        if self.method in REFERENCE_METHODS or (self.method == "exact" and len(mode) == len(tags)):
            mode = []
        return Setting(self.protocol, "exact", None, ",".join(mode))

    @property
    def is_baseline(self) -> bool:
        return self == self.baseline


@dataclass
class RunRecord:
    setting: Setting
    seed: int
    summary: dict
    curve: dict[int, float]  # step -> validation loss
    run_dir: Path
    extra: dict = field(default_factory=dict)


def _lr_tag(tag: str) -> bool:
    return tag.startswith("lr") and tag.endswith("x") and tag[2:-1].replace(".", "", 1).isdigit()


def _config_yaml(run_dir: Path) -> dict:
    """The run's config.yaml where a summary lacks a field (runs written before it existed)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _data_order(s: Mapping, cfg: Mapping) -> str:
    if s.get("data_order"):
        return s["data_order"]
    shuffle = (cfg.get("data") or {}).get("shuffle")
    return "shuffled" if shuffle else "stream" if shuffle is False else "unknown"


def read_run(run_dir: Path) -> RunRecord:
    s = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    for new, old in _RENAMED.items():
        s[new] = s.get(new, s.get(old))
    cfg = _config_yaml(run_dir)
    tags = [t for t in (s.get("variant") or "").split(",") if t]
    lr_factor = s.get("lr_factor")
    if lr_factor is None:
        lr_factor = next((float(t[2:-1]) for t in tags if _lr_tag(t)),
                         (cfg.get("optim") or {}).get("lr_factor", 1.0))
    protocol = Protocol(s.get("optimizer") or "?", float(s.get("lr") or 0.0), float(lr_factor), int(s["steps"]),
                        _data_order(s, cfg))
    rank = None
    tags = [t for t in tags if not _lr_tag(t)]
    if s["method"] != "exact":
        # A configuration is what was asked for; an R clamped to the rows of a step is said beside it.
        ran, rank = s.get("rank"), s.get("rank_requested") or s.get("rank")
        if ran is not None and rank != ran:
            tags.append(f"ran R={ran}")
    setting = Setting(protocol, s["method"], rank, ",".join(tags))
    curve = {}
    if (run_dir / "metrics.jsonl").is_file():
        for rec in load_metrics(run_dir):
            v = rec.get("val_loss")
            if v is not None and "step" in rec and math.isfinite(float(v)):
                curve[int(rec["step"])] = float(v)
    train = cfg.get("train") or {}
    mode = {"compiled": bool(s.get("compile", train.get("compile", False))),
            "graphs": bool(train.get("cuda_graphs", True))}
    return RunRecord(setting, int(s["seed"]), s, curve, run_dir, extra=mode)


def read_runs(run_dirs: Iterable[Path]) -> list[RunRecord]:
    runs = [read_run(Path(d)) for d in run_dirs]
    # torch.compile and CUDA graphs must change no result: a run that departs from the others' mode
    # is tagged, so that it pairs with (and is not mistaken for) the exact run of its seed.
    for key, (on, off) in _MODE_TAGS.items():
        usual = Counter(r.extra.get(key) for r in runs).most_common(1)[0][0] if runs else None
        for r in runs:
            if r.extra.get(key) is not None and r.extra[key] != usual:
                tag = on if r.extra[key] else off
                r.setting = replace(r.setting, tags=",".join(t for t in (r.setting.tags, tag) if t))
    seen: dict[tuple, Path] = {}
    for r in runs:
        key = (r.setting, r.seed)
        if key in seen:
            raise ValueError(f"{r.run_dir} and {seen[key]} are the same configuration and seed: pairing is ambiguous")
        seen[key] = r.run_dir
    return runs


def reference_protocol(runs: Sequence[RunRecord]) -> Protocol:
    """The protocol most runs share (the main grid's): labels name only departures from it."""
    return Counter(r.setting.protocol for r in runs).most_common(1)[0][0]


def label(setting: Setting, ref: Protocol) -> str:
    """'basis R=1024', 'exact [ckpt]', 'basis R=1024 [lr0.5x]', 'exact [sgd,lr=0.1]', 'exact [8000 steps]'."""
    p, tags = setting.protocol, [t for t in setting.tags.split(",") if t]
    if p.optimizer != ref.optimizer:
        tags.append(p.optimizer)
    if p.lr != ref.lr:
        tags.append(f"lr={p.lr:g}")
    if p.lr_factor != 1.0:
        tags.append(f"lr{p.lr_factor:g}x")
    if p.steps != ref.steps:
        tags.append(f"{p.steps} steps")
    if p.data_order != ref.data_order:
        tags.append(p.data_order)
    return config_label(setting.method, setting.rank, ",".join(tags))


def _mean(values: Iterable) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return math.fsum(xs) / len(xs) if xs else None


def _sort_key(setting: Setting, ref: Protocol) -> tuple:
    # The main grid first, then the other protocols by length, optimiser and effective lr; within
    # one, exact, its variants, then BASIS by options and from the largest rank down (Table 3).
    p, rank = setting.protocol, setting.rank if setting.rank is not None else math.inf
    return (p != ref, p.steps, p.optimizer != ref.optimizer, p.optimizer, p.lr * p.lr_factor, p.data_order,
            not setting.is_baseline, setting.method != "exact", setting.tags, -rank)


def _gap(a: Mapping[int, float], b: Mapping[int, float], level: float) -> dict:
    seeds = sorted(set(a) & set(b))
    d = paired_diff([a[s] for s in seeds], [b[s] for s in seeds], level)
    return {"n": d["n"], "mean": d["mean"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
            "p_value": d["p_value"], "n_better": d["n_better"], "seeds": seeds}


def summarize_settings(runs: Sequence[RunRecord], level: float = 0.95) -> list[dict]:
    """One entry per configuration, in table order, with its paired gaps to its baseline.

    tokens/s and MFU average only runs that had their GPU to themselves (runs_per_gpu 1): a shared
    GPU's speed measures the sharing. Speed and step peak depend on the GPU, so an entry's means
    (`step_peak_bytes_mean`, `tokens_per_s_mean`, `mfu_mean`) take the runs on the grid's most common
    GPU (`gpu`) and `by_gpu` holds them per GPU; the losses and saved bytes pool every GPU. Gap
    curves cover the evaluation steps every paired seed logged.
    """
    ref = reference_protocol(runs)
    gpu = reference_gpu(runs)
    groups: dict[Setting, dict[int, RunRecord]] = {}
    for r in sorted(runs, key=lambda r: (_sort_key(r.setting, ref), r.seed)):
        groups.setdefault(r.setting, {})[r.seed] = r
    out = []
    for setting, by_seed in groups.items():
        final = {s: r.summary["final_val_loss"] for s, r in by_seed.items()}
        final = {s: (math.nan if v is None else float(v)) for s, v in final.items()}
        by_gpu = _by_gpu(by_seed.values())
        val = mean_ci(list(final.values()), level)
        entry = {
            "setting": setting, "label": label(setting, ref), "method": setting.method, "rank": setting.rank,
            "variant": setting.tags,
            "protocol": setting.protocol, "level": level, "n": val["n"], "seeds": sorted(by_seed),
            "val_mean": val["mean"], "val_std": val["std"], "val_ci_low": val["ci_low"], "val_ci_high": val["ci_high"],
            "final": final,
            "act_bytes_mean": _mean(r.summary.get("activation_bytes") for r in by_seed.values()),
            "act_breakdown_mean": _breakdown(r.summary for r in by_seed.values()),
            "gpu": gpu, "by_gpu": by_gpu,
            **{k: (by_gpu.get(gpu) or {}).get(k) for k in ("step_peak_bytes_mean", "tokens_per_s_mean", "mfu_mean")},
            "stream_fraction_mean": _mean(r.summary.get("stream_fraction") for r in by_seed.values()),
            "curves": {s: r.curve for s, r in by_seed.items()},
            "baseline_label": label(setting.baseline, ref), "has_baseline": False, "gap": None, "gap_curve": {},
        }
        out.append(entry)
    by_setting = {e["setting"]: e for e in out}
    for e in out:
        base = by_setting.get(e["setting"].baseline)
        if base is None or e["setting"].is_baseline:
            continue
        e["has_baseline"] = True
        if set(e["final"]) & set(base["final"]):
            e["gap"] = _gap(e["final"], base["final"], level)
        steps = sorted(set.union(set(), *(set(c) for c in e["curves"].values())))
        for step in steps:
            mine = {s: c[step] for s, c in e["curves"].items() if step in c}
            theirs = {s: c[step] for s, c in base["curves"].items() if step in c}
            if set(mine) & set(theirs):
                e["gap_curve"][step] = _gap(mine, theirs, level)
    return out


def reference_gpu(runs: Sequence[RunRecord]) -> str | None:
    """The GPU most runs ran on (None: no run recorded one, as on CPU)."""
    gpus = Counter(r.summary.get("gpu") for r in runs if r.summary.get("gpu"))
    return gpus.most_common(1)[0][0] if gpus else None


def _by_gpu(records: Iterable[RunRecord]) -> dict[str | None, dict]:
    """Per GPU: how many runs, the mean step peak, and tokens/s and MFU of those alone on it."""
    groups: dict[str | None, list[Mapping]] = {}
    for r in records:
        groups.setdefault(r.summary.get("gpu"), []).append(r.summary)
    out = {}
    for gpu, ss in groups.items():
        alone = [s for s in ss if (s.get("runs_per_gpu") or 1) == 1]
        out[gpu] = {"n": len(ss), "step_peak_bytes_mean": _mean(s.get("step_peak_bytes") for s in ss),
                    "tokens_per_s_mean": _mean(s.get("tokens_per_s") for s in alone),
                    "mfu_mean": _mean(s.get("mfu") for s in alone)}
    return out


def _breakdown(summaries: Iterable[Mapping]) -> dict[str, float | None]:
    rows = [s.get("activation_breakdown") or {} for s in summaries]
    cats = sorted({c for r in rows for c in r})
    return {c: _mean(r.get(c) for r in rows) for c in cats}
