"""Named departures from the paper's estimator and optimiser, written once: the variants a grid runs
(basis-compare --variants) and the tag a run records as its variant (summary.json, the reports)."""

from __future__ import annotations

from basis_train.training.config import Config

BASIS, EXACT = frozenset({"basis"}), frozenset({"exact"})
# name: (overrides, the methods a grid runs it for)
VARIANTS: dict[str, tuple[dict[str, object], frozenset[str]]] = {
    "lam0": ({"sketch.lam": 0.0}, BASIS),
    "no-scalars": ({"sketch.invariant_scalars": False}, BASIS),
    "uniform": ({"sketch.hashing": "uniform"}, BASIS),
    "gaussian": ({"sketch.hashing": "gaussian"}, BASIS),
    "all": ({"sketch.layers": "all"}, BASIS),
    "mlp": ({"sketch.layers": "mlp"}, BASIS),  # the head left exact
    "ckpt": ({"model.checkpoint_blocks": True}, BASIS | EXACT),
    "lr0.5x": ({"optim.lr_factor": 0.5}, BASIS | EXACT),
    "lr2x": ({"optim.lr_factor": 2.0}, BASIS | EXACT),
    # Exact backprop with the sketchable weights' lr scaled by (1 - 0.01)^2: what lambda does.
    "lr-matched": ({"optim.lr_scale_sketched": 0.9801}, EXACT),
    # Cut Cross-Entropy as the exact head (CUDA, bf16/fp16): what its bf16 gradient sums cost
    "cce": ({"model.head_kernel": "cce"}, EXACT),
}


def grid_variants(method: str) -> dict[str, dict[str, object]]:
    """The variants a grid runs for `method` as overrides, "" (the plain run) first."""
    return {"": {}, **{name: ov for name, (ov, methods) in VARIANTS.items() if method in methods}}


# The keys a run's tag reports, in the tag's order, and the tag of a value no variant names (None: no
# tag; auto and native are both our head kernel). The sketch's keys only count for BASIS runs.
_TAG_OF_VALUE = {
    "sketch.hashing": str,
    "sketch.invariant_scalars": lambda v: "no-scalars",
    "sketch.lam": lambda v: f"lam{v:g}",
    "sketch.layers": lambda v: f"layers={v}",  # the reports read layers=all, the grid's variant is "all"
    "model.checkpoint_blocks": lambda v: "ckpt",
    "model.checkpoint_policy": lambda v: f"ckpt={v}",
    "model.checkpoint_every": lambda v: f"ckpt-every{v}",
    "train.saved_activations": lambda v: f"act={v}",
    "model.head_kernel": lambda v: None,
    "optim.lr_factor": lambda v: f"lr{v:g}x",
    "optim.lr_scale_sketched": lambda v: f"lrx{v:g}",
    "train.tf32": lambda v: "tf32",
}
_NAMED = {(key, value): name for name, (ov, _) in VARIANTS.items() for key, value in ov.items()
          if key != "sketch.layers"}


def _value(cfg: Config, key: str) -> object:
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    return round(value, 9) if isinstance(value, float) else value  # 0.9801 typed by hand is still lr-matched


def variant_of(cfg: Config) -> str:
    """Short tag of everything that departs from the paper's estimator and optimiser."""
    tags, default = [], Config()
    for key, tag_of in _TAG_OF_VALUE.items():
        if key.startswith("sketch.") and cfg.train.method != "basis":
            continue
        value = _value(cfg, key)
        if value != _value(default, key):
            tag = _NAMED.get((key, value)) or tag_of(value)
            if tag:
                tags.append(tag)
    return ",".join(tags)
