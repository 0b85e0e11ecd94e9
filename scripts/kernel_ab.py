"""A/B timing of the sketch kernels, v1 against v2, in ONE process on a CUDA GPU (issue 11).

    PYTHONPATH=$PWD python scripts/kernel_ab.py [--out FILE] [--reps 50] [--fp32] [--tunings 'A;B']

Prints one JSON object per line as each section finishes (so a crash keeps what came before),
then the whole result as one JSON object (also written to --out):
- "check": v2 against v1 and against the CPU reference on one shape (bins, signs, sums agree);
- "sketch": each sketch call alone (X: 8192 x 768, dY: 8192 x 3072 with norm and column
  sums, bf16) for v1, v2 and a few v2 launch shapes, each captured as a CUDA graph and
  replayed interleaved with the others; "floor_ms" is one read of the matrix at a nominal
  4.8 TB/s (H200 HBM3e), "read_ms" a torch column sum (one real read of it) for scale;
- "layer": BasisLinear forward + backward (8192 x 768 -> 3072, bf16 autocast) at R = 16, 64,
  256 with v1 and with v2 (and v2 with a torch finish at R = 64), and nn.Linear, all CUDA
  graphs replayed interleaved; ratio =
  BasisLinear / nn.Linear (issue 11's target: <= 0.75 at R = 64).
Every contender is set up in its own try block: one failure is recorded as {"error": ...}
and the others are still timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import types
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basis_train.core import sketch  # noqa: E402
from basis_train.experiments import bench_kernels as bk  # noqa: E402

HBM_TBPS = 4.8
ROWS, N_IN, N_OUT = bk.LAYER
RANKS = (16, 64, 256)
# v2 launch shapes worth comparing (BASIS_SKETCH_V2 syntax); "" is the default.
TUNINGS = ("", "programs=1056", "programs=264", "tile_rows=64,warps=8", "block_c=256,warps=8")


def emit(section: str, value) -> None:
    print(json.dumps({section: value}), flush=True)


def error(e: BaseException) -> dict:
    traceback.print_exc(file=sys.stderr)
    return {"error": f"{type(e).__name__}: {e}"}


@contextmanager
def kernels(version: str, tuning: str = ""):
    """Use kernel `version` (and a v2 launch shape) while a graph is warmed up and captured;
    a captured graph keeps the launches it recorded."""
    old_version, old_tuning = sketch.kernel_version(), os.environ.get("BASIS_SKETCH_V2")
    sketch.set_kernel_version(version)
    os.environ["BASIS_SKETCH_V2"] = tuning
    try:
        yield sketch._kernel_module()
    finally:
        sketch.set_kernel_version(old_version)
        if old_tuning is None:
            os.environ.pop("BASIS_SKETCH_V2", None)
        else:
            os.environ["BASIS_SKETCH_V2"] = old_tuning


def check(device) -> dict:
    """v1 and v2 on one bf16 shape: same result up to float32 summation order, and the CPU reference."""
    torch.manual_seed(0)
    m = torch.randn(4096, 1000, device=device).bfloat16()
    seed = torch.tensor(2**32 - 5, device=device)
    out = {}
    with kernels("v1") as k1:
        a = k1.sketch_stats(m, seed, 64, colsum=True)
    with kernels("v2") as k2:
        b = k2.sketch_stats(m, seed, 64, colsum=True)
        b_again = k2.sketch_stats(m, seed, 64, colsum=True)
    ref = sketch.count_sketch_reference(m.double().cpu(), seed.cpu(), 64)
    out["v2_deterministic"] = all(torch.equal(x, y) for x, y in zip(b, b_again))
    out["v2_vs_reference_max_abs"] = (b[0].double().cpu() - ref).abs().max().item()
    out["v1_vs_reference_max_abs"] = (a[0].double().cpu() - ref).abs().max().item()
    out["v2_vs_v1_sumsq_rel"] = abs(b[1].item() / a[1].item() - 1)
    out["v2_vs_v1_colsum_max_abs"] = (b[2] - a[2]).abs().max().item()
    out["ok"] = out["v2_deterministic"] and out["v2_vs_reference_max_abs"] < 1e-2
    return out


def sketch_section(reps: int, tunings: tuple[str, ...], device) -> dict:
    torch.manual_seed(0)
    mats = {"X 8192x768": torch.randn(ROWS, N_IN, device=device).bfloat16(),
            "dY 8192x3072": torch.randn(ROWS, N_OUT, device=device).bfloat16()}
    seed = torch.tensor(123456789, device=device)
    result = {}
    for name, m in mats.items():
        colsum = name.startswith("dY")
        for rank in RANKS:
            graphs, errors = {}, {}

            def add(label, version, tuning=""):
                try:
                    with kernels(version, tuning) as k:
                        def step(k=k):
                            k.sketch_stats(m, seed, rank, colsum)
                        graphs[label] = bk._graph_of(step, [], device)
                except Exception as e:  # noqa: BLE001 -- record it, time the others
                    errors[label] = error(e)

            add("v1", "v1")
            for t in tunings:
                add(f"v2 {t}".strip(), "v2", t)

            def read(m=m):
                m.sum(0, dtype=torch.float32)
            try:
                graphs["read"] = bk._graph_of(read, [], device)
            except Exception as e:  # noqa: BLE001
                errors["read"] = error(e)
            ms = bk._interleaved(graphs, reps) if graphs else {}
            key = f"{name} R={rank}{' +norm+colsum' if colsum else ' +norm'}"
            result[key] = {**{k: round(v * 1000, 2) for k, v in ms.items()}, **errors, "unit": "us",
                           "floor_us": round(m.numel() * m.element_size() / HBM_TBPS / 1e6, 2)}
            del graphs
    return result


def layer_section(reps: int, bf16: bool, device) -> dict:
    graphs, errors = {}, {}
    try:
        graphs["linear"] = bk._layer_graph(None, bf16, device)
    except Exception as e:  # noqa: BLE001
        errors["linear"] = error(e)
    # "v2-torch-finish": v2's table and gather, but the split sums and rescale in torch ops as v1
    # (what the fused finish kernels save).
    for version in ("v1", "v2", "v2-torch-finish"):
        for rank in RANKS if version != "v2-torch-finish" else (64,):
            label = f"{version} R={rank}"
            try:
                with kernels(version[:2]) as k:
                    if version == "v2-torch-finish":
                        sketch._kernels = types.SimpleNamespace(sketch_stats=k.sketch_stats)
                    graphs[label] = bk._layer_graph(rank, bf16, device)
            except Exception as e:  # noqa: BLE001
                errors[label] = error(e)
    ms = bk._interleaved(graphs, reps) if graphs else {}
    out = {"dtype": "bf16 autocast" if bf16 else "float32, TF32 off", "unit": "us",
           **{k: round(v * 1000, 2) for k, v in ms.items()}, **errors}
    if "linear" in ms:
        out["ratio"] = {k: round(v / ms["linear"], 4) for k, v in ms.items() if k != "linear"}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--fp32", action="store_true", help="also the layer in float32 (TF32 off)")
    p.add_argument("--tunings", default=";".join(TUNINGS),
                   help="v2 launch shapes to time alone, ';'-separated BASIS_SKETCH_V2 values ('' = default)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_ab.py times CUDA kernels; no CUDA device here")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    result = {"device": torch.cuda.get_device_name(), "default_version": sketch.kernel_version()}
    sections = [("check", lambda: check(device)),
                ("sketch", lambda: sketch_section(args.reps, tuple(args.tunings.split(";")), device)),
                ("layer", lambda: layer_section(args.reps, True, device))]
    if args.fp32:
        sections.append(("layer_fp32", lambda: layer_section(args.reps, False, device)))
    for name, run in sections:
        try:
            result[name] = run()
        except Exception as e:  # noqa: BLE001 -- keep the other sections
            result[name] = error(e)
        emit(name, result[name])
        torch.cuda.empty_cache()
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
