"""Did the science move? A re-run grid against the committed one, configuration by configuration.

Issue 11 changed the sketch's random family (a keyed Feistel bijection instead of a sort of
hash keys): the same seed now draws other bins and signs, so a re-run matches the committed
losses statistically, not bit for bit. The criterion: each configuration's new paired gap to
exact lies inside the committed 95% CI of that gap (and, for exact, the new mean inside the
committed CI of the mean). Issue 13's fleets (the same experiments as single runs, so the same
seeds should land on the same statistics) ask for more: with --means, every configuration's mean
validation loss must also lie inside the committed CI of its mean.

    python -m basis_train.reporting.recheck REF_GRID NEW_GRID [--out NEW_GRID/recheck.md] [--means]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from basis_train.reporting.report import collect_runs, summarize


def _summary(grid: Path) -> dict[str, dict]:
    return {e["label"]: e for e in summarize(collect_runs(sorted((grid / "runs").iterdir())))}


def compare_grids(ref: Path, new: Path, means: bool = False) -> list[dict]:
    """One row per configuration of `new` that `ref` also has: its paired gap to exact, or for
    exact its mean; with `means`, a second row of the mean for configurations with a gap."""
    old, now = _summary(ref), _summary(new)
    rows = []
    for label, e in now.items():
        r = old.get(label)
        if r is None:
            continue
        checks = []
        if e["diff_n"]:  # a configuration with a paired gap to exact
            checks.append(("paired gap to exact", e["diff_mean"], r["diff_ci_low"], r["diff_ci_high"]))
        if means or not e["diff_n"]:
            checks.append(("mean validation loss", e["val_mean"], r["val_ci_low"], r["val_ci_high"]))
        for what, value, lo, hi in checks:
            rows.append({"label": label, "what": what, "n_ref": r["n"], "n_new": e["n"], "ref": r, "new": e,
                         "value": value, "ref_ci": (lo, hi), "inside": lo is not None and lo <= value <= hi})
    return rows


def _gap(e: dict, what: str) -> str:
    if what == "mean validation loss":
        return f"{e['val_mean']:.4f} [{e['val_ci_low']:.4f}, {e['val_ci_high']:.4f}]"
    return f"{e['diff_mean']:+.4f} [{e['diff_ci_low']:+.4f}, {e['diff_ci_high']:+.4f}]"


def write_md(rows: list[dict], ref: Path, new: Path, path: Path) -> None:
    lines = [f"# Re-check: {new} against {ref}", "",
             "| configuration | compared | committed (n) | re-run (n) | re-run value inside the committed 95% CI |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['what']} | {_gap(r['ref'], r['what'])} ({r['n_ref']}) | {_gap(r['new'], r['what'])} "
                     f"({r['n_new']}) | {'yes' if r['inside'] else '**no**'} |")
    verdict = "all inside" if rows and all(r["inside"] for r in rows) else "NOT all inside"
    lines += ["", f"Verdict: {verdict} ({sum(r['inside'] for r in rows)} of {len(rows)}).", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--means", action="store_true", help="also each configuration's mean inside the committed CI")
    a = ap.parse_args(argv)
    rows = compare_grids(a.ref, a.new, a.means)
    out = a.out or a.new / "recheck.md"
    write_md(rows, a.ref, a.new, out)
    print(out.read_text())
    return 0 if rows and all(r["inside"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
