"""A short CPU run of the paper config against metrics committed before the model and sketch
layer were restructured: the `paper` architecture must train exactly as it did.

The reference file was written by `python tests/training/test_paper_reference.py` at commit
dccd6ee (before `model.arch` existed). Same kind of machine, same torch: the losses are the same
float64 sums of float32 losses; the tolerance allows only last-digit differences that a
different CPU's vectorisation of float32 matmuls could give (rounding, not a behaviour change,
which moves these losses by 1e-3 or more).
"""

import json
import sys
from pathlib import Path

import pytest

from basis_train.training.config import apply_overrides, load_config
from basis_train.training.train import train

REFERENCE = Path(__file__).parent.parent / "data" / "reference" / "paper_cpu_metrics.json"
OVERRIDES = {"train.steps": 40, "train.eval_every": 20, "train.checkpoint_every": 40, "train.device": "cpu",
             "data.heldout_min_tokens": 20000, "data.max_docs": 2000}


def short_paper_run(method: str, out: Path) -> list[dict]:
    cfg = apply_overrides(load_config("paper"), {**OVERRIDES, "train.method": method})
    train(cfg, out, progress=False)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "train_loss", "val_loss")} for r in recs]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["basis", "exact"])
def test_paper_config_trains_as_before(tmp_path, method):
    expected = json.loads(REFERENCE.read_text())[method]
    got = short_paper_run(method, tmp_path / method)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for g, e in zip(got, expected):
        for k in ("train_loss", "val_loss"):
            assert g[k] == pytest.approx(e[k], rel=1e-6, abs=0), (method, g["step"], k)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        ref = {m: short_paper_run(m, Path(d) / m) for m in ("basis", "exact")}
    REFERENCE.write_text(json.dumps({"command": "python tests/training/test_paper_reference.py",
                                     "overrides": OVERRIDES, **ref}, indent=1) + "\n")
    print(REFERENCE.read_text(), file=sys.stderr)
