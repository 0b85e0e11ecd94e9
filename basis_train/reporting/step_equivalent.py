"""A loss gap in the currency a user pays in: how far exact's own run had to train to reach it.

For each configuration and seed, the step at which the exact run of that seed (its baseline: same
protocol, weights and batches) first brought its held-out loss down to the configuration's final
loss, reading exact's curve as straight lines between evaluations. Exact's lr at that step is not yet
annealed, so a run scheduled to end there would get to that loss no later: the step is an upper bound
on the exact steps the configuration's result is worth. With both configurations' tokens/s on one
GPU it becomes a fraction of the configuration's own training time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def steps_to_reach(curve: Mapping[int, float], loss: float) -> tuple[float, bool] | None:
    """(step, at_first_evaluation) at which `curve` first falls to `loss`; None if it never does.
    at_first_evaluation: already there at the first evaluation, so the step is only a bound."""
    prev = None
    for step, value in sorted(curve.items()):
        if value <= loss:
            if prev is None:
                return float(step), True
            s0, v0 = prev
            return s0 + (v0 - loss) / (v0 - value) * (step - s0), False
        prev = (step, value)
    return None


def equivalents(entry: Mapping, base: Mapping) -> dict[int, tuple[float, bool] | None]:
    """Per seed both ran: where exact's curve reaches the configuration's final loss."""
    return {s: steps_to_reach(base["curves"][s], entry["final"][s])
            for s in entry["seeds"] if s in base["curves"] and base["curves"][s]}


def _cell(hit: tuple[float, bool] | None) -> str:
    if hit is None:
        return "not reached"
    step, first = hit
    return f"≤ {step:,.0f}" if first else f"{step:,.0f}"


def equivalence_table(entries: Sequence[Mapping]) -> list[str]:
    """Markdown lines: per configuration with a baseline, exact's steps to its final loss."""
    by_setting = {e["setting"]: e for e in entries}
    rows = []
    for e in entries:
        base = by_setting.get(e["setting"].baseline)
        if base is None or e["setting"].is_baseline:
            continue
        hits = equivalents(e, base)
        if not hits:
            continue
        steps = e["setting"].protocol.steps
        frac = [h[0] / steps for h in hits.values() if h is not None]
        # a mean only where every seed's loss was reached: one unreached seed would bias it down
        mean = sum(frac) / len(frac) if len(frac) == len(hits) else None
        mine, theirs = e.get("tokens_per_s_mean"), base.get("tokens_per_s_mean")
        time = mean * mine / theirs if mean is not None and mine and theirs else None
        rows.append(f"| {e['label']} | {len(hits)} | {' / '.join(_cell(hits[s]) for s in sorted(hits))} | "
                    f"{'–' if mean is None else f'{mean:.2f}'} | {'–' if time is None else f'{time:.2f}'} |")
    if not rows:
        return []
    return ["", "## Exact's steps to each configuration's final loss", "",
            "The step at which the exact run of the same seed and protocol first reached the configuration's final "
            "held-out loss (linear between evaluations; ≤: already there at the first evaluation; not reached: "
            "below exact's whole curve). Exact's lr there is not yet annealed, so these are upper bounds on the "
            "exact steps each result is worth. Time: that fraction of the steps times the configuration's "
            "tokens/s over exact's (the GPU of the main table).", "",
            "| configuration | seeds | exact's step, per seed | fraction of the steps (mean) | fraction of the time |",
            "|---|---|---|---|---|", *rows]
