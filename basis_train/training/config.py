"""Typed, validated run configuration.

Defaults are the paper's protocol (docs/paper.md section 2), so `load_config(None)` is the paper run,
except that fineweb-edu and local files are shuffled unless `data.shuffle` says otherwise
(configs/paper.yaml pins the reference's stream order).
Every entry point funnels through `config_from_dict`, so YAML files, CLI overrides and configs read
back from an output directory are all checked by the same code.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from basis_train.core.options import (
    ARCHS,
    CHECKPOINT_POLICIES,
    HEADS,
    KERNELS,
    METHODS,
    SAVED_ACTIVATIONS,
    SKETCH_KINDS,
    SKETCH_LAYERS,
    ModelConfig,
    SketchConfig,
)
from basis_train.fsutil import atomic_write_text
from basis_train.training.yaml_strict import StrictLoader


class ConfigError(Exception):
    """A configuration problem, described in one line fit to show the user as is."""


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    lr_scale_sketched: float = 1.0
    # lr actually used = lr * lr_factor; a grid's learning-rate sensitivity variants set it.
    lr_factor: float = 1.0
    # constant (the paper) or cosine: linear warmup over warmup_steps, then cosine decay to
    # min_lr_ratio * lr at the last step.
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    # global gradient-norm clipping (torch.nn.utils.clip_grad_norm_); 0 = off (the paper)
    grad_clip: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    method: str = "basis"
    steps: int = 50000
    batch_size: int = 1
    eval_every: int = 1000
    checkpoint_every: int = 1000
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    compile: bool = False
    cuda_graphs: bool = True
    saved_activations: str = "keep"  # keep | offload | int8 | fp8 (core/options.py's SAVED_ACTIVATIONS)
    # TF32 for a CUDA run's float32 matmuls (off: as the paper's T4). Under 16-bit autocast it reaches the
    # BASIS head's dW product from its float32 sketches (an exact step has no float32 matmul).
    tf32: bool = False


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "wiki-offline"
    data_files: str | None = None
    val_protocol: str = "heldout"
    max_docs: int = 50000
    paper_val_docs: int = 500
    paper_val_batches: int = 30
    heldout_every: int = 20
    heldout_min_tokens: int = 100000
    eval_batch_size: int = 128
    # Training chunks in a seeded random order (a permutation per pass, loaders.TrainLoader) or in
    # the stream's order. None: shuffled for files and fineweb-edu, whose stream order is an
    # artefact (sorted paths, hub order); the stream order for wiki-offline, the paper protocol.
    shuffle: bool | None = None
    cache_dir: str | None = None
    # true: a run that would need a second pass over the training tokens is refused at start.
    single_pass: bool = False

    @property
    def shuffled(self) -> bool:
        """Whether the training chunks are read in a seeded random order (shuffle resolved)."""
        return self.dataset in SHUFFLED_BY_DEFAULT if self.shuffle is None else self.shuffle


SHUFFLED_BY_DEFAULT: tuple[str, ...] = ("files", "fineweb-edu")


@dataclass(frozen=True)
class LogConfig:
    out: str | None = None
    wandb: str = "off"
    wandb_project: str = "basis-train"
    run_name: str | None = None


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sketch: SketchConfig = field(default_factory=SketchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS: dict[str, type] = dict(typing.get_type_hints(Config))

CHOICES: dict[str, tuple[str, ...]] = {
    # what the model accepts, from core, so a new choice there is a new choice here
    "model.arch": ARCHS, "sketch.layers": SKETCH_LAYERS, "model.head": HEADS, "model.head_kernel": KERNELS,
    "model.checkpoint_policy": CHECKPOINT_POLICIES, "train.saved_activations": SAVED_ACTIVATIONS,
    "sketch.hashing": SKETCH_KINDS, "train.method": METHODS,
    "optim.name": ("sgd", "adamw"), "optim.schedule": ("constant", "cosine"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("float32", "bfloat16", "float16"),
    "data.dataset": ("wiki-offline", "fineweb-edu", "files"),
    "data.val_protocol": ("heldout", "paper"),
    "log.wandb": ("off", "offline", "online"),
}

# Inclusive lower bounds.
MIN_VALUES: dict[str, float] = {
    "model.vocab_size": 1, "model.block_size": 1, "model.n_embd": 1, "model.n_head": 1,
    "model.n_layer": 1, "model.mlp_ratio": 1, "model.head_chunk": 1, "model.checkpoint_every": 1, "sketch.rank": 1,
    "optim.weight_decay": 0,
    "train.steps": 1, "train.batch_size": 1, "train.eval_every": 1, "train.checkpoint_every": 1,
    "train.seed": 0, "data.max_docs": 1, "data.paper_val_docs": 1, "data.paper_val_batches": 1,
    "data.heldout_min_tokens": 1, "data.eval_batch_size": 1, "optim.warmup_steps": 0,
    "optim.min_lr_ratio": 0, "optim.grad_clip": 0,
    # holding out every 1st document would leave nothing to train on
    "data.heldout_every": 2,
}
# Inclusive upper bounds. A billion steps is far past any run, and keeps step counts exact
# in the float64 arithmetic of the lr schedule and the ETA.
MAX_VALUES: dict[str, float] = {
    "train.steps": 10**9, "train.eval_every": 10**9, "train.checkpoint_every": 10**9, "optim.warmup_steps": 10**9,
}
POSITIVE: tuple[str, ...] = ("optim.lr", "optim.eps", "optim.lr_scale_sketched", "optim.lr_factor")
UNIT_INTERVAL: tuple[str, ...] = ("sketch.lam", "optim.momentum")  # 0 <= v < 1


# Fields that change speed or bookkeeping but not the numbers a run produces. The head
# implementation is one: fused and plain compute the same loss and gradients up to float
# rounding (tests/core/test_head.py), so runs made before it existed keep their hashes.
# The head kernel is not: CCE adds dX and dW in bf16, which changed GPT-2-small losses by
# about 0.06 nats (core/head_cce.py), so head_kernel cce is hashed; auto and native (both
# ours, auto's meaning since then) are left out, so runs made before the key keep their hash.
# summary.json's "head_kernel" records which kernel ran.
HASH_IGNORE: tuple[str, ...] = ("log", "train.compile", "train.cuda_graphs", "model.head", "model.head_chunk")
# Keys added after runs were committed: left out of the hash while at these defaults, so
# finished runs keep their hash and resumable grids do not rerun them.
HASH_OMIT_DEFAULTS: dict[str, object] = {
    "optim.lr_factor": 1.0, "optim.schedule": "constant", "optim.warmup_steps": 0,
    "optim.min_lr_ratio": 0.1, "data.single_pass": False, "model.arch": "paper", "optim.grad_clip": 0.0,
    "model.checkpoint_policy": "full", "model.checkpoint_every": 1, "train.saved_activations": "keep",
    "train.tf32": False,
}


# The configs ship inside the package, so `--config tiny` (or `configs/tiny.yaml`) works from
# any directory and in an installed wheel; the repository's configs/ is a link to this folder.
SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A config file as given, else a shipped config by name: `tiny`, `tiny.yaml` or `configs/tiny.yaml`."""
    path = Path(path)
    if path.exists() or path.parent.name not in ("", "configs") or len(path.parts) > 2:
        return path
    shipped = SHIPPED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return shipped if shipped.is_file() else path


def _field_types(section: str) -> dict[str, object]:
    return typing.get_type_hints(SECTIONS[section])


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    options = list(options)
    close = difflib.get_close_matches(name, options, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (expected one of: {', '.join(options)})"


def _describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def _check_type(key: str, value: object, tp: object) -> object:
    """Return `value` normalised to `tp`, or raise; bool is never taken for a number."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, args[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be bool, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be int, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key} must be float, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be str, got {_describe(value)}")
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {inner.__name__}, got {_describe(value)}")
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _check_values(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            close = difflib.get_close_matches(value, list(allowed), n=1) if isinstance(value, str) else []
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}"
                              + (f" (did you mean '{close[0]}'?)" if close else ""))
    for key, low in MIN_VALUES.items():
        value = _get(cfg, key)
        if not value >= low:
            raise ConfigError(f"{key} must be >= {low:g}, got {value!r}")
    for key, high in MAX_VALUES.items():
        value = _get(cfg, key)
        if not value <= high:
            raise ConfigError(f"{key} must be <= {high:,}, got {value!r}")
    for key in POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key} must be > 0, got {_get(cfg, key)!r}")
    for key in UNIT_INTERVAL:
        if not 0.0 <= _get(cfg, key) < 1.0:
            raise ConfigError(f"{key} must satisfy 0 <= value < 1, got {_get(cfg, key)!r}")
    m, o, d = cfg.model, cfg.optim, cfg.data
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd ({m.n_embd}) must be divisible by model.n_head ({m.n_head})")
    if (m.checkpoint_policy, m.checkpoint_every) != ("full", 1) and not m.checkpoint_blocks:
        raise ConfigError("model.checkpoint_policy and model.checkpoint_every need model.checkpoint_blocks true")
    if cfg.train.saved_activations != "keep" and cfg.train.compile:  # hooks around a compiled forward: untested
        raise ConfigError(f"train.saved_activations {cfg.train.saved_activations} is not supported with train.compile")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas must be two values in [0, 1), got {o.betas!r}")
    if d.data_files is not None and not d.data_files.strip():
        # An empty --data-files would otherwise fall back to the embedded corpus without a word.
        raise ConfigError("data.data_files is empty: give a file, directory glob (dir/**) or "
                          "comma-separated list, or leave it out to train on the embedded corpus")
    if d.dataset == "files" and not d.data_files:
        raise ConfigError("data.dataset 'files' needs data.data_files (a path or glob)")
    if d.data_files and d.dataset != "files":
        # Silently ignoring the files would leave the hash and the reader disagreeing.
        raise ConfigError(f"data.data_files is set but data.dataset is {d.dataset!r}; "
                          "use data.dataset 'files' or drop data.data_files")


def _get(cfg: Config, dotted: str) -> object:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def config_from_dict(d: object, source: str = "config") -> Config:
    """Build and validate a Config from a (possibly partial) nested mapping."""
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(d).__name__}")
    sections = {}
    for name, body in d.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section '{name}'{_suggest(str(name), SECTIONS)}")
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise ConfigError(f"section '{name}' must be a mapping, got {_describe(body)}")
        hints = _field_types(name)
        values = {}
        for key, value in body.items():
            if key not in hints:
                raise ConfigError(f"unknown key '{name}.{key}'{_suggest(str(key), hints)}")
            values[key] = _check_type(f"{name}.{key}", value, hints[key])
        if name == "data" and values.get("data_files") and "dataset" not in values:
            values["dataset"] = "files"
        sections[name] = SECTIONS[name](**values)
    cfg = Config(**sections)
    _check_values(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, dict[str, object]]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None) -> Config:
    """Read a YAML config (a path or a shipped config's name); None gives the paper's defaults.

    Any subset of keys may be set."""
    if path is None:
        return config_from_dict({})
    path = resolve_config_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (shipped configs: {', '.join(shipped_configs())})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}); is it really a YAML config?") from None
    try:
        data = yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: the file sets nothing (empty or only comments); leave out --config "
                          "for the paper's defaults")
    try:
        return config_from_dict(data, source=str(path))
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def apply_overrides(cfg: Config, overrides: dict[str, object]) -> Config:
    """Return a new Config with dotted keys ("sketch.rank": 8) replaced, fully revalidated."""
    d = config_to_dict(cfg)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not key or "." in key:
            raise ConfigError(f"override key must look like 'section.key', got '{dotted}'")
        if section not in d:
            raise ConfigError(f"unknown section '{section}'{_suggest(section, d)}")
        if key not in d[section]:
            raise ConfigError(f"unknown key '{dotted}'{_suggest(key, d[section])}")
        d[section][key] = value
    if overrides.get("data.data_files") and "data.dataset" not in overrides:
        d["data"]["dataset"] = "files"
    return config_from_dict(d, source="overrides")


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML atomically, so a crash never leaves a half-written config behind."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    atomic_write_text(path, text)


def config_hash(cfg: Config, ignore: typing.Iterable[str] = HASH_IGNORE) -> str:
    """Short stable digest of everything in `cfg` that can change a run's numbers.

    `ignore` holds section names ("log") or dotted keys ("train.compile").
    """
    ignore = set(ignore)
    ignore |= {k for k, default in HASH_OMIT_DEFAULTS.items() if _get(cfg, k) == default}
    if _get(cfg, "model.head_kernel") != "cce":
        ignore.add("model.head_kernel")
    body = config_to_dict(cfg)
    # The order, not how it was asked for: an unset shuffle hashes as the order it resolves to.
    body["data"]["shuffle"] = cfg.data.shuffled
    d = {
        section: {k: v for k, v in fields.items() if f"{section}.{k}" not in ignore}
        for section, fields in body.items()
        if section not in ignore
    }
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]
