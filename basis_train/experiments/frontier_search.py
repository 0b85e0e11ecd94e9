"""The frontier's search: the largest size that fits, found with few probes. Torch-free and pure, so
that it is tested on made-up predicates (tests/experiments/test_frontier.py).

Sizes are multiples of `step` up to `cap` (batch sizes: step 1; contexts: step 256). `fits(n)` must
be monotone: if n fits, every smaller size fits (memory grows with the batch and the context). Without
a hint the search doubles from `step` until a size does not fit or the cap is reached, then bisects
between the largest size seen to fit and the smallest seen not to; with one (bracket_hint: where the
measured peaks' line meets the budget) it starts there and gallops outward before bisecting, taking
the hint again from each new measurement. At most
`max_probes` calls of `fits`; a search stopped by that limit returns the largest size seen to fit, a
lower bound, and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# Rehints a search takes at most: each restarts the gallop, so a misleading source stays cheap.
MAX_REHINTS = 3


@dataclass
class SearchResult:
    best: int  # the largest size that fits; 0 when not even `step` fits
    probes: list[tuple[int, bool]] = field(default_factory=list)  # (size, fits) in the order asked
    capped: bool = False  # every size up to the cap fits: the true limit may lie above it
    exhausted: bool = False  # the probe limit stopped the search: `best` is a lower bound

    def as_dict(self) -> dict:
        return {"best": self.best, "probes": len(self.probes), "sizes_probed": [n for n, _ in self.probes],
                "capped": self.capped, "exhausted": self.exhausted}


def max_probes_needed(cap: int, step: int = 1) -> int:
    """The most probes a search over multiples of `step` up to `cap` can take: the doublings (sizes
    step, 2 step, 4 step, ..., 2^m step, then the cap), then one per halving of the gap they left."""
    k = cap // step
    m = k.bit_length() - 1  # 2^m <= k < 2^(m+1)
    failed_at_power = 2 * m  # m + 1 doublings, the last failing; m - 1 halvings of a gap of 2^(m-1)
    if k == 1 << m:
        return max(1, failed_at_power)
    return max(failed_at_power, m + 2 + (k - (1 << m) - 1).bit_length())  # failed at the cap


def largest_fitting(fits: Callable[[int], bool], cap: int, step: int = 1, max_probes: int | None = None,
                    hint: int | None = None, rehint: Callable[[], int | None] | None = None) -> SearchResult:
    """The largest multiple of `step` in [step, cap] for which the monotone `fits` holds (see the module).
    With a `hint` (a size the answer is expected near), the search starts there and gallops outward
    (distances 1, 2, 4, ... steps) until it has a size that fits and one that does not, then bisects:
    about 2 log2(error) + 2 probes instead of 2 log2(answer). A wrong hint costs probes, never the answer.
    Without one it starts at `step`, where galloping upward is doubling.
    `rehint()`, asked after each probe, may name a better start from what the probes measured
    (bracket_hint): a size inside the bracket still open is probed next in place of the gallop's or
    bisection's step, at most every other probe. A bad one costs probes (at most twice the hinted
    search's bound), never the answer."""
    if step < 1 or cap < step:
        raise ValueError(f"need 1 <= step <= cap, got step {step}, cap {cap}")
    if max_probes is None:  # the doubling's bound; a gallop from a hint's, and twice that with rehints
        needed = max_probes_needed(cap, step)
        max_probes = (needed if hint is None and rehint is None else 2 * needed + 2) * (2 if rehint else 1)
    if max_probes < 1:
        raise ValueError(f"max_probes must be >= 1, got {max_probes}")
    k_cap = cap // step
    res = SearchResult(best=0)

    def probe(k: int) -> bool | None:
        if len(res.probes) >= max_probes:
            res.exhausted = True
            return None
        ok = bool(fits(k * step))
        res.probes.append((k * step, ok))
        return ok

    def suggested(lo: int, hi: int | None) -> int | None:
        """rehint's size in steps, if it lies in the open bracket (lo, hi)."""
        r = rehint() if rehint is not None else None
        k = None if r is None else r // step
        return k if k is not None and lo < k <= k_cap and (hi is None or k < hi) else None

    k = min(max((step if hint is None else hint) // step, 1), k_cap)
    ok = probe(k)
    if ok is None:
        return res
    # lo fits (0: nothing seen to), hi does not (None: none seen); every probe lies in the open bracket
    # (lo, hi), so none is asked twice. From the start, and from each rehint taken, the step gallops
    # (distances 1, 2, 4, ...) the way its probe points: up from a size that fits, down from one that
    # does not, until the answer is bracketed on that side; then it bisects.
    lo, hi = (k, None) if ok else (0, k)
    way, d, rehints, took = (1 if ok else -1), 1, 0, False
    while hi is None or hi - lo > 1:
        if hi is None and lo == k_cap:
            res.best, res.capped = k_cap * step, True
            return res
        nxt = None if took or rehints >= MAX_REHINTS else suggested(lo, hi)
        if nxt is not None:
            rehints, took = rehints + 1, True
        elif way > 0:
            nxt, d, took = min(lo + d, k_cap if hi is None else hi - 1), 2 * d, False
        elif way < 0:
            nxt, d, took = max(hi - d, lo + 1), 2 * d, False
        else:
            nxt, took = (lo + hi) // 2, False
        ok = probe(nxt)
        if ok is None:
            break
        if took:  # gallop on from the rehinted size, the way it points
            way, d = (1 if ok else -1), 1
        elif way and ok != (way > 0):  # the gallop crossed the answer: bracketed, bisect
            way = 0
        lo, hi = (nxt, hi) if ok else (lo, nxt)
        res.best = lo * step
    return res


def bracket_hint(points: list[tuple[int, int]], limit: float, step: int = 1) -> int | None:
    """Where the measured peaks' line crosses `limit` between the largest size measured at or under it and
    the smallest measured above it; with none above (or none under), affine_hint's line through the two
    largest. A peak flat at small sizes (fixed costs) and growing beyond them misleads the second, not
    the first, once one size above the limit has been measured."""
    pts = sorted(dict(points).items())
    under = [q for q in pts if q[1] <= limit]
    over = [q for q in pts if q[1] > limit]
    if not (under and over) or over[0][0] <= under[-1][0]:
        return affine_hint(points, limit, step)
    (n1, p1), (n2, p2) = under[-1], over[0]
    return max(step, int((n1 + (limit - p1) * (n2 - n1) / (p2 - p1)) // step * step))


def affine_hint(points: list[tuple[int, int]], limit: float, step: int = 1) -> int | None:
    """The size at which a peak that grows linearly with the size (activations do, in the batch and,
    with flash attention, in the context) reaches `limit`, from the two largest measured sizes
    (size, peak bytes); None without two distinct sizes or a growing peak."""
    pts = sorted(dict(points).items())
    if len(pts) < 2:
        return None
    (n1, p1), (n2, p2) = pts[-2], pts[-1]
    slope = (p2 - p1) / (n2 - n1)
    if slope <= 0:
        return None
    return max(step, int((n2 + (limit - p2) / slope) // step * step))


def parse_budgets(text: str) -> list[float]:
    """"8,16,40" -> [8.0, 16.0, 40.0] (GiB), ascending and without repeats; ValueError on anything else."""
    parts = [x.strip() for x in text.split(",") if x.strip()]
    try:
        budgets = [float(x) for x in parts]
    except ValueError:
        raise ValueError(f"budgets must be numbers of GiB, comma-separated, got {text!r}") from None
    if not budgets or not all(0 < b < float("inf") for b in budgets):
        raise ValueError(f"budgets must be positive numbers of GiB, got {text!r}")
    return sorted(set(budgets))


def parse_methods(text: str, known) -> list[str]:
    """"exact,ckpt" -> ["exact", "ckpt"], each one of `known`; "all" (or nothing) -> all of them."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or names == ["all"]:
        return list(known)
    if unknown := [x for x in names if x not in known]:
        raise ValueError(f"unknown frontier method(s) {unknown}; choose from {list(known)}")
    return list(dict.fromkeys(names))
