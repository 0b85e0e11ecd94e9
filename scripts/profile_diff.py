"""Where two rows of `speed_gpt2.py --profile` differ: GPU time per step, kernel by kernel.

    python scripts/profile_diff.py PROFILE.txt "ours exact, fused head, compiled + CUDA graph" \
        "ours BASIS mlp+head R=256, fused head, compiled + CUDA graph" [--top 25]

Each section of PROFILE.txt is torch.profiler's key_averages table of a few steps. The kernels
Inductor generates are numbered per graph (triton_poi_fused_gelu_view_10 in one, ..._17 in the other),
so the trailing number is dropped and kernels of one name summed before the two rows are compared.
Self CUDA time only: the nested op rows (aten::mm over its kernel) would count a kernel twice. The
tables hold their top rows only, so the totals come from each table's "Self CUDA time total" line.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

_TITLE = re.compile(r"^## (.*) \((\d+) steps\)$")
_NUMBERED = re.compile(r"^(triton_\w+?)_\d+$")


def _ms(cell: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if cell.endswith(unit):
            return float(cell[: -len(unit)]) * scale
    raise ValueError(f"not a time: {cell!r}")


TOTAL = "Self CUDA time total"  # the key under which `sections` puts a table's total (ms per step, 0 calls)


def sections(text: str) -> dict[str, dict[str, tuple[float, int]]]:
    """{row title: {kernel or op: (self CUDA ms per step, calls per step)}, with TOTAL}."""
    out: dict[str, dict[str, tuple[float, int]]] = {}
    title, steps, table, name_end = None, 1, {}, None
    for line in text.splitlines():
        if m := _TITLE.match(line):
            title, steps, table, name_end = m.group(1), int(m.group(2)), {}, None
            out[title] = table
        elif title is None or not line.strip() or line.startswith("-"):
            continue
        elif line.startswith(TOTAL + ":"):
            table[TOTAL] = (_ms(line.split(":")[1].strip()) / steps, 0)
        elif name_end is None and "Self CUDA" in line:
            name_end = line.index("Name") + len("Name")  # names are right-aligned up to the header's "Name"
        elif name_end is not None and not line.startswith("Self "):
            cells = line[name_end:].split()  # Self CPU %, ..., Self CUDA (6th), ..., # of Calls (10th)
            if len(cells) != 10:
                continue
            name = _NUMBERED.sub(r"\1", line[:name_end].strip())
            prev = table.get(name, (0.0, 0))
            table[name] = (prev[0] + _ms(cells[5]) / steps, prev[1] + int(cells[9]) / steps)
    return out


def diff(a: dict[str, tuple[float, int]], b: dict[str, tuple[float, int]]) -> list[tuple[str, float, float, float, float]]:
    """(name, ms a, ms b, calls a, calls b) per step, the largest change of GPU time first."""
    none = (0.0, 0)
    rows = [(n, a.get(n, none)[0], b.get(n, none)[0], a.get(n, none)[1], b.get(n, none)[1])
            for n in (set(a) | set(b)) - {TOTAL}]
    return sorted(rows, key=lambda r: (-abs(r[2] - r[1]), r[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("a", help="row title (as in the ## lines)")
    ap.add_argument("b")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    secs = sections(args.profile.read_text())
    for t in (args.a, args.b):
        if t not in secs:
            raise SystemExit(f"no section {t!r}; there are: {list(secs)}")
    a, b = secs[args.a], secs[args.b]
    total = [f"{t[TOTAL][0]:.3f} ms" if TOTAL in t else "?" for t in (a, b)]
    print(f"GPU time per step (self CUDA, all kernels): {total[0]} -> {total[1]}")
    print("| change (ms/step) | a | b | calls/step a -> b | kernel or op |\n|---|---|---|---|---|")
    for name, ma, mb, ca, cb in diff(a, b)[: args.top]:
        print(f"| {mb - ma:+.3f} | {ma:.3f} | {mb:.3f} | {ca:g} -> {cb:g} | `{name[:90]}` |")


if __name__ == "__main__":
    main()
