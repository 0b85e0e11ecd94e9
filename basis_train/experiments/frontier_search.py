"""The frontier's search: the largest size that fits, found with few probes. Torch-free and pure, so
that it is tested on made-up predicates (tests/experiments/test_frontier.py).

Sizes are multiples of `step` up to `cap` (batch sizes: step 1; contexts: step 256). `fits(n)` must
be monotone: if n fits, every smaller size fits (memory grows with the batch and the context). Without
a hint the search doubles from `step` until a size does not fit or the cap is reached, then bisects
between the largest size seen to fit and the smallest seen not to; with one (affine_hint: where the
measured peaks' line meets the budget) it starts there and gallops outward before bisecting. At most
`max_probes` calls of `fits`; a search stopped by that limit returns the largest size seen to fit, a
lower bound, and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


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
                    hint: int | None = None) -> SearchResult:
    """The largest multiple of `step` in [step, cap] for which the monotone `fits` holds (see the module).
    With a `hint` (a size the answer is expected near), the search starts there and gallops outward
    (distances 1, 2, 4, ... steps) until it has a size that fits and one that does not, then bisects:
    about 2 log2(error) + 2 probes instead of 2 log2(answer). A wrong hint costs probes, never the answer."""
    if hint is not None:
        return _galloping(fits, cap, step, max_probes, hint)
    if step < 1 or cap < step:
        raise ValueError(f"need 1 <= step <= cap, got step {step}, cap {cap}")
    k_cap = cap // step
    limit = max_probes_needed(cap, step) if max_probes is None else max_probes
    if limit < 1:
        raise ValueError(f"max_probes must be >= 1, got {max_probes}")
    res = SearchResult(best=0)

    def probe(k: int) -> bool | None:
        if len(res.probes) >= limit:
            res.exhausted = True
            return None
        ok = bool(fits(k * step))
        res.probes.append((k * step, ok))
        return ok

    lo, hi, k = 0, None, 1  # in units of step: lo fits (0: nothing seen to), hi does not
    while hi is None:
        ok = probe(k)
        if ok is None:
            return res
        if not ok:
            hi = k
        elif k == k_cap:
            res.best, res.capped = k_cap * step, True
            return res
        else:
            lo, k = k, min(2 * k, k_cap)
        res.best = lo * step
    return _bisect(probe, lo, hi, step, res)


def _bisect(probe, lo: int, hi: int, step: int, res: SearchResult) -> SearchResult:
    """Halve the gap between `lo` (fits; 0: none seen to) and `hi` (does not), in units of step."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = probe(mid)
        if ok is None:
            break
        lo, hi = (mid, hi) if ok else (lo, mid)
        res.best = lo * step
    return res


def _galloping(fits, cap: int, step: int, max_probes: int | None, hint: int) -> SearchResult:
    k_cap = cap // step
    if step < 1 or k_cap < 1:
        raise ValueError(f"need 1 <= step <= cap, got step {step}, cap {cap}")
    limit = 2 * max_probes_needed(cap, step) + 2 if max_probes is None else max_probes
    res = SearchResult(best=0)
    seen: dict[int, bool] = {}

    def probe(k: int) -> bool | None:
        if k in seen:
            return seen[k]
        if len(res.probes) >= limit:
            res.exhausted = True
            return None
        seen[k] = ok = bool(fits(k * step))
        res.probes.append((k * step, ok))
        return ok

    k = min(max(hint // step, 1), k_cap)
    lo, hi = 0, None  # in units of step: lo fits (0: nothing seen to), hi does not (None: none seen)
    ok = probe(k)
    if ok is None:
        return res
    if ok:
        lo, d = k, 1
        while hi is None:
            if lo == k_cap:
                res.best, res.capped = k_cap * step, True
                return res
            nxt = min(lo + d, k_cap)
            ok = probe(nxt)
            if ok is None:
                res.best = lo * step
                return res
            lo, hi = (nxt, None) if ok else (lo, nxt)
            d *= 2
    else:
        hi, d = k, 1
        while lo == 0 and hi > 1:
            nxt = max(hi - d, 1)
            ok = probe(nxt)
            if ok is None:
                return res
            if ok:
                lo = nxt
            else:
                hi = nxt
            d *= 2
        if lo == 0:  # not even `step` fits
            return res
    res.best = lo * step
    return _bisect(probe, lo, hi, step, res)


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
