"""Markdown for basis-bench: the per-size and single-layer tables, and the memory table
whose "where the memory goes" text is generated from the measured breakdown."""

from __future__ import annotations

MIB = 2**20


def _mib(x) -> str:
    return "-" if x is None else f"{x / MIB:.3f}" if x < 10 * MIB else f"{x / MIB:.1f}"


def _x(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ms(t: dict) -> str:
    return f"{t['median']:.3f} [{t['q25']:.3f}, {t['q75']:.3f}]"


def row_label(r: dict) -> str:
    return r["variant"] if r["rank"] is None else f"basis {r['variant']}"


def _table(header: list[str], rows: list[dict], name, cells) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        rest = cells(r) if r["status"] == "ok" else [r["status"].upper()] + ["-"] * (len(header) - 3)
        out.append("| " + " | ".join([name(r), str(r["rank"] or "-"), *rest]) + " |")
    return [*out, ""]


def size_md(res: dict) -> list[str]:
    s, m = res["size"], res["meta"]
    return [
        (f"## {s['name']}: B={s['batch']}, T={s['seq']}, V={s['vocab']}, width {s['width']}, {s['heads']} heads, "
         f"{s['layers']} layers; {m['dtype']}; {s['optimizer']}"), "",
        (f"Logits: {_mib(res['logits_bytes'])} MiB (B*T*V*{m['logits_itemsize']} bytes); the float32 copy the loss "
         f"is computed on: {_mib(res['logits_fp32_bytes'])} MiB."), "",
        *_table(["variant", "R", "ms/step median [IQR]", "ratio to exact", "CUDA peak MiB", "saved-for-backward MiB",
                 "ratio to exact"], res["rows"], row_label, lambda r: [_ms(r["time_ms"]), _x(r["ratio_time_ms"]),
                                                                     _mib(r["cuda_peak_bytes"]), _mib(r["saved_bytes"]),
                                                                     _x(r["ratio_saved_bytes"])]),
        "Largest saved-for-backward tensors (shape dtype, what it is: MiB):", "",
        *_table(["variant", "R", "top 5"], res["rows"], row_label, lambda r: ["; ".join(
            f"{tuple(e['shape'])} {e['dtype']}, {e['category']}: {_mib(e['bytes'])}" for e in r["saved_top"])]),
    ]


def graphed_md(res: dict) -> list[str]:
    """The CUDA-graphed step (what basis-train replays on CUDA), where it was measured."""
    rows = [r for r in res["rows"] if r["status"] == "ok" and "graphed_time_ms" in r]
    if not rows:
        return []
    exact = next((r["graphed_time_ms"] for r in rows if r["variant"] == "exact"), None)

    def cells(r):
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
            *_table(["layer", "R", "ms median [IQR]", "ratio to nn.Linear", "saved MiB", "ratio to nn.Linear",
                     "CUDA peak MiB"], res["rows"], lambda r: "nn.Linear" if r["rank"] is None else "BasisLinear",
                    lambda r: [_ms(r["time_ms"]), _x(r["ratio_time_ms"]), _mib(r["saved_bytes"]),
                               _x(r["ratio_saved_bytes"]), _mib(r["cuda_peak_bytes"])])]


def where_memory_goes(res: dict) -> str:
    """A paragraph on one size, generated only from the measured breakdown."""
    s, rows = res["size"], res["rows"]
    exact = next((r for r in rows if r["variant"] == "exact" and r["status"] == "ok"), None)
    if exact is None or not exact["saved_bytes"]:
        return f"At {s['name']} size exact backprop was not measured, so there is no breakdown."
    total, parts = exact["saved_bytes"], []
    for cat, nb in exact["saved_by_category"].items():
        if nb >= 0.01 * total:
            shapes = [f"{tuple(e['shape'])} {e['dtype']}" for e in exact["saved_by_shape"] if e["category"] == cat]
            parts.append(f"{cat} [{', '.join(shapes[:2])}] {100 * nb / total:.1f}%")
    text = (f"At {s['name']} size (B={s['batch']}, T={s['seq']}, V={s['vocab']}, width {s['width']}) exact backprop "
            f"saves {_mib(total)} MiB for backward: " + "; ".join(parts) + ".")
    for variant, what in (("mlp+head", "Sketching the MLP and head"), ("all", "Sketching every linear layer"),
                          ("exact+ckpt", "Checkpointing every block (exact gradients)")):
        ok = [r for r in rows if r["variant"] == variant and r["status"] == "ok" and r["ratio_saved_bytes"]]
        if not ok:
            continue
        r = min(ok, key=lambda r: r["ratio_saved_bytes"])
        peak = f" and the CUDA step peak to {r['ratio_cuda_peak_bytes']:.3f}x" if r["ratio_cuda_peak_bytes"] else ""
        logits = sum(nb for c, nb in r["saved_by_category"].items() if c.startswith("logits")) / r["saved_bytes"]
        at = f" at R={r['rank']}" if r["rank"] else ""
        text += (f" {what}{at} brings saved bytes to {r['ratio_saved_bytes']:.3f}x exact{peak}; logits-sized "
                 f"tensors are then {100 * logits:.1f}% of what is saved.")
    return text


def memory_md(results: list[dict]) -> str:
    m = results[0]["meta"]
    lines = ["# Memory at two scales", "",
             (f"Measured on {m['gpu'] or m['device']} (torch {m['torch']}, CUDA {m['cuda']}), {m['date']}. "
              "Saved-for-backward: bytes autograd keeps between forward and backward, parameters excluded. "
              "CUDA step peak: allocator peak over one training step (forward, backward, optimiser) minus what was "
              "allocated before it."), ""]
    for res in results:
        s = res["size"]
        lines += [(f"## {s['name']} (B={s['batch']}, T={s['seq']}, V={s['vocab']}, width {s['width']}, "
                   f"{s['layers']} layers; {res['meta']['dtype']})"), "",
                  *_table(["variant", "R", "saved-for-backward MiB", "ratio to exact", "CUDA step peak MiB",
                           "ratio to exact"], res["rows"], row_label,
                          lambda r: [_mib(r["saved_bytes"]), _x(r["ratio_saved_bytes"]), _mib(r["cuda_peak_bytes"]),
                                     _x(r["ratio_cuda_peak_bytes"])]),
                  where_memory_goes(res), ""]
    return "\n".join(lines)
