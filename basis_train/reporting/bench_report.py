"""Markdown for basis-bench: the per-size, single-layer and head tables, and the memory
table whose "where the memory goes" text is generated from the measured breakdown."""

from __future__ import annotations

MIB = 2**20
CATEGORY_NAMES = {"head": "logits/head", "attention": "attention", "mlp_hidden": "MLP hidden",
                  "width_d": "width-d and LayerNorm inputs", "sketches": "BASIS sketches", "seeds": "seeds",
                  "other": "other"}


def _mib(x) -> str:
    return "-" if x is None else f"{x / MIB:.3f}" if x < 10 * MIB else f"{x / MIB:.1f}"


def _x(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _speed(r: dict) -> str:
    tps = r.get("tokens_per_s")
    return "-" if tps is None else f"{tps:,.0f}" + (" g" if r.get("speed_of") == "graphed" else "")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(t: dict) -> str:
    return f"{t['median']:.3f} [{t['q25']:.3f}, {t['q75']:.3f}]"


def row_label(r: dict) -> str:
    name = r["variant"] if r["rank"] is None else f"basis {r['variant']}"
    return f"{name}, {r['head']} head" if r.get("head") else name


def _table(header: list[str], rows: list[dict], name, cells, rank=lambda r: str(r["rank"] or "-")) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        rest = cells(r) if r["status"] == "ok" else [r["status"].upper()] + ["-"] * (len(header) - 3)
        out.append("| " + " | ".join([name(r), rank(r), *rest]) + " |")
    return [*out, ""]


def _breakdown(r: dict) -> str:
    b = r.get("activation_breakdown") or {}
    return "; ".join(f"{CATEGORY_NAMES.get(c, c)} {_mib(nb)}" for c, nb in sorted(b.items(), key=lambda kv: -kv[1]) if nb)


def size_md(res: dict) -> list[str]:
    s, m = res["size"], res["meta"]
    return [
        (f"## {s['name']}: B={s['batch']}, T={s['seq']}, V={s['vocab']}, width {s['width']}, {s['heads']} heads, "
         f"{s['layers']} layers; {m['dtype']}; {s['optimizer']}; fused head chunk {s['head_chunk']} rows"), "",
        (f"Logits: {_mib(res['logits_bytes'])} MiB (B*T*V*{m['logits_itemsize']} bytes); the float32 copy the plain "
         f"head's loss is computed on: {_mib(res['logits_fp32_bytes'])} MiB."), "",
        *_table(["variant", "R", "ms/step median [IQR]", "ratio to exact", "tokens/s", "MFU", "step peak MiB",
                 "activation MiB", "ratio to exact", "weight casts MiB"], res["rows"], row_label,
                lambda r: [_ms(r["time_ms"]), _x(r["ratio_time_ms"]), _speed(r), _pct(r.get("mfu")),
                           _mib(r["step_peak_bytes"]), _mib(r["activation_bytes"]), _x(r["ratio_activation_bytes"]),
                           _mib(r["weight_cast_bytes"])]),
        "tokens/s and MFU: of the graphed step where it was timed (marked g), else the eager one; MFU by "
        "nanoGPT's count, 6 N + 12 L H Q T FLOPs a token, against the GPU's bf16 dense peak "
        "(core/flops.py; BASIS charged exact's FLOPs; - without a known GPU).", "",
        "Activation bytes by category (MiB):", "",
        *_table(["variant", "R", "breakdown"], res["rows"], row_label, lambda r: [_breakdown(r)]),
    ]


def graphed_md(res: dict) -> list[str]:
    """The CUDA-graphed step (what basis-train replays on CUDA), where it was measured."""
    rows = [r for r in res["rows"] if r["status"] == "ok" and "graphed_time_ms" in r]
    if not rows:
        return []
    def cells(r):
        # ratios are to exact with the same head
        exact = next((e["graphed_time_ms"] for e in rows if e["variant"] == "exact" and e.get("head") == r.get("head")),
                     None)
        g = r["graphed_time_ms"]
        if "median" not in g:
            return [g.get("status", "error").upper(), "-", _x(None)]
        ratio = g["median"] / exact["median"] if exact and "median" in exact else None
        return [_ms(g), _x(ratio), _x(r["time_ms"]["median"] / g["median"])]

    return ["Whole step as one CUDA-graph replay (core/graphs.py, as basis-train runs it):", "",
            *_table(["variant", "R", "graphed ms/step median [IQR]", "ratio to exact", "eager / graphed"],
                    rows, row_label, cells)]


def layer_md(res: dict) -> list[str]:
    rows, n_in, n_out = res["shape"]
    return [f"## single layer: {rows} rows, {n_in} -> {n_out}, fwd+bwd; {res['meta']['dtype']}", "",
            *_table(["layer", "R", "ms median [IQR]", "ratio to nn.Linear", "activation MiB", "ratio to nn.Linear",
                     "weight casts MiB", "step peak MiB"], res["rows"],
                    lambda r: "nn.Linear" if r["rank"] is None else "BasisLinear",
                    lambda r: [_ms(r["time_ms"]), _x(r["ratio_time_ms"]), _mib(r["activation_bytes"]),
                               _x(r["ratio_activation_bytes"]), _mib(r["weight_cast_bytes"]),
                               _mib(r["step_peak_bytes"])])]


def head_md(res: dict) -> list[str]:
    rows, n, v = res["shape"]
    return [f"## head alone: {rows} rows, {n} -> {v}, loss + backward, eager; {res['meta']['dtype']}", "",
            "Peak: allocator peak of one step after warm-up above the resident input, weight and targets.", "",
            *_table(["implementation", "R", "ms median [IQR]", "step peak MiB"], res["rows"], lambda r: r["impl"],
                    lambda r: [_ms(r["time_ms"]), _mib(r["step_peak_bytes"])],
                    rank=lambda r: str(r.get("rank") or "-")),
            *[f"- {r['impl']}: skipped ({r['reason']})" for r in res["rows"] if r["status"] == "skipped"], ""]


def where_memory_goes(res: dict) -> str:
    """A paragraph on one size, generated only from the measured breakdown."""
    s, rows = res["size"], res["rows"]
    text = ""
    for head in ("plain", "fused"):
        exact = next((r for r in rows if r["variant"] == "exact" and r.get("head") == head and r["status"] == "ok"),
                     None)
        if exact is None or not exact["activation_bytes"]:
            continue
        total = exact["activation_bytes"]
        parts = [f"{CATEGORY_NAMES.get(c, c)} {100 * nb / total:.1f}%"
                 for c, nb in sorted(exact["activation_breakdown"].items(), key=lambda kv: -kv[1]) if nb >= 0.01 * total]
        text += (f" With the {head} head, exact backprop at {s['name']} size saves {_mib(total)} MiB for backward: "
                 + "; ".join(parts) + ".")
        for variant, what in (("mlp+head", "sketching the MLP and head"), ("all", "sketching every linear layer"),
                              ("exact+ckpt", "checkpointing every block (exact gradients)")):
            ok = [r for r in rows if r["variant"] == variant and r.get("head") == head and r["status"] == "ok"
                  and r["ratio_activation_bytes"]]
            if ok:
                r = min(ok, key=lambda r: r["ratio_activation_bytes"])
                at = f" at R={r['rank']}" if r["rank"] else ""
                peak = f", step peak {r['ratio_step_peak_bytes']:.3f}x" if r.get("ratio_step_peak_bytes") else ""
                text += f" {what.capitalize()}{at}: {r['ratio_activation_bytes']:.3f}x{peak}."
    return text.strip() or f"At {s['name']} size exact backprop was not measured, so there is no breakdown."


def memory_md(results: list[dict]) -> str:
    m = results[0]["meta"]
    lines = ["# Memory at two scales", "",
             (f"Measured on {m['gpu'] or m['device']} (torch {m['torch']}, CUDA {m['cuda']}), {m['date']}. "
              "Activation bytes: what autograd keeps for backward over one step, parameters and casts of parameters "
              "excluded (the casts are the weight-cast column). Step peak: allocator peak over one steady-state "
              "training step (forward, backward, optimiser) minus what was allocated before it. Ratios are to exact "
              "with the same head. Definitions: basis_train/core/memory.py."), ""]
    for res in results:
        s = res["size"]
        lines += [(f"## {s['name']} (B={s['batch']}, T={s['seq']}, V={s['vocab']}, width {s['width']}, "
                   f"{s['layers']} layers; {res['meta']['dtype']})"), "",
                  *_table(["variant", "R", "activation MiB", "ratio to exact", "weight casts MiB", "step peak MiB",
                           "ratio to exact"], res["rows"], row_label,
                          lambda r: [_mib(r["activation_bytes"]), _x(r["ratio_activation_bytes"]),
                                     _mib(r["weight_cast_bytes"]), _mib(r["step_peak_bytes"]),
                                     _x(r["ratio_step_peak_bytes"])]),
                  where_memory_goes(res), ""]
    return "\n".join(lines)
