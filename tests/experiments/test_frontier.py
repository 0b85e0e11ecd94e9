"""The memory frontier (experiments/frontier.py): the search on made-up predicates, then the command end
to end on CPU at --quick size, where "fits" reads the CPU estimate (saved tensors + parameters,
gradients and AdamW state), since a CPU has no allocator peak."""

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from basis_train.cli.bench import app
from basis_train.core.model import build_gpt
from basis_train.experiments import frontier, provenance
from basis_train.experiments.bench_sizes import FRONTIER_AXES_QUICK, FRONTIER_METHODS, FRONTIER_REFERENCE_QUICK
from basis_train.experiments.frontier_search import (
    affine_hint,
    bracket_hint,
    largest_fitting,
    max_probes_needed,
    parse_budgets,
    parse_methods,
)
from basis_train.reporting import frontier_report
from basis_train.training.setup import gpt_config

# The quick model (width 32, 2 layers, vocabulary 512) has about 43k parameters: float32 parameters,
# gradients and AdamW's two moments take 16 bytes each, about 0.7 MB, and a sequence of 32 tokens saves
# roughly 0.1 MB under exact backprop. 1.5 MiB-ish then fits a few exact sequences and 3 MiB-ish
# about twenty, well inside the batch cap of 64, while full checkpointing (each block keeps only its
# input) fits many more at either budget.
BUDGETS = (0.0015, 0.003)


def _single_threaded(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: OpenMP's spinning workers on a shared box only slow them
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ the search

def _counting(pred):
    asked = []

    def fits(n):
        asked.append(n)
        return pred(n)

    return fits, asked


@pytest.mark.parametrize("cap,step", [(1, 1), (7, 1), (512, 1), (500, 1), (65536, 256), (1000, 32)])
def test_search_finds_every_boundary_within_its_probe_bound(cap, step):
    grid = range(0, cap + 1, step)
    worst = 0
    for boundary in grid:  # sizes up to `boundary` fit; 0: none does
        fits, asked = _counting(lambda n, b=boundary: n <= b)
        res = largest_fitting(fits, cap, step)
        assert res.best == boundary and not res.exhausted
        assert res.capped == (boundary == cap // step * step)
        assert all(n % step == 0 and step <= n <= cap for n in asked) and len(set(asked)) == len(asked)
        assert [n for n, _ in res.probes] == asked
        worst = max(worst, len(asked))
    # the bound is the worst case, met exactly; about 2 log2(cap / step), not cap / step
    assert worst == max_probes_needed(cap, step) <= 2 * (cap // step).bit_length() + 2


def test_search_when_nothing_fits_asks_once():
    fits, asked = _counting(lambda n: False)
    res = largest_fitting(fits, 512)
    assert (res.best, res.capped, res.exhausted, asked) == (0, False, False, [1])
    fits, asked = _counting(lambda n: False)
    assert largest_fitting(fits, 65536, 256).best == 0 and asked == [256]


def test_search_when_everything_fits_stops_at_the_cap():
    fits, asked = _counting(lambda n: True)
    res = largest_fitting(fits, 512)
    assert res.best == 512 and res.capped and asked == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    fits, asked = _counting(lambda n: True)
    res = largest_fitting(fits, 1000, 32)  # a cap off the grid: the largest multiple of 32 below it
    assert res.best == 992 and res.capped and asked[-1] == 992


def test_probe_limit_bounds_the_search_and_says_so():
    fits, asked = _counting(lambda n: n <= 300)
    res = largest_fitting(fits, 512, max_probes=5)
    assert len(asked) == 5 and res.exhausted and res.best == 16  # 1, 2, 4, 8, 16 fit: a lower bound
    fits, asked = _counting(lambda n: n <= 300)
    res = largest_fitting(fits, 512, max_probes=12)
    assert len(asked) == 12 and res.exhausted and res.best <= 300 and fits(res.best)
    with pytest.raises(ValueError):
        largest_fitting(lambda n: True, 512, max_probes=0)
    with pytest.raises(ValueError):
        largest_fitting(lambda n: True, 100, step=256)


@pytest.mark.parametrize("step", [1, 256])
@pytest.mark.parametrize("hint_error", [0, 1, -1, 3, -7, 40, -40, 10_000])
def test_a_hinted_search_finds_the_same_boundary_and_a_good_hint_saves_probes(step, hint_error):
    cap = 512 * step
    for boundary in (0, 1, 2, 37, 200, 511, 512):  # the largest size (in steps) that fits; 0: none
        hint = (boundary + hint_error) * step
        plain = largest_fitting(lambda n, b=boundary: n <= b * step, cap, step)
        hinted = largest_fitting(lambda n, b=boundary: n <= b * step, cap, step, hint=hint)
        assert hinted.best == plain.best == boundary * step, (boundary, hint_error)
        assert hinted.capped == (boundary == 512) and not hinted.exhausted
        assert len({n for n, _ in hinted.probes}) == len(hinted.probes)  # no size asked twice
        if hint_error in (0, 1) and 2 < boundary < 512:
            assert len(hinted.probes) <= 3 < len(plain.probes), hinted.probes  # the answer and its neighbour


def test_affine_hint_is_where_the_line_through_the_two_largest_sizes_meets_the_limit():
    points = [(1, 1_000 + 300), (2, 1_000 + 600), (4, 1_000 + 1_200)]  # 1,000 fixed, 300 per unit
    assert affine_hint(points, 1_000 + 300 * 37 + 10) == 37
    assert affine_hint(points, 1_000 + 300 * 37 + 10, step=4) == 36  # rounded down to the step
    assert affine_hint(points[:1], 5_000) is None and affine_hint([(1, 9), (2, 9)], 5_000) is None
    assert affine_hint(points, 10) == 1  # below the smallest size: the search starts at the first step


def _axis(peak, budgets, cap, step, rehinted):
    """frontier._run_axis's loop on a made-up peak: two small sizes, then each budget's search hinted by
    the measured peaks; (answers, probes per budget)."""
    measured = {n: peak(n) for n in (step, 2 * step)}

    def fits(n, limit):
        measured[n] = peak(n)
        return measured[n] <= limit

    answers, probes = [], []
    for limit in budgets:
        def hint(limit=limit):
            return bracket_hint(list(measured.items()), limit, step)

        res = largest_fitting(lambda n, limit=limit: fits(n, limit), cap, step, hint=hint(),
                              rehint=hint if rehinted else None)
        assert len({n for n, _ in res.probes}) == len(res.probes) and not res.exhausted
        answers.append(res.best)
        probes.append(len(res.probes))
    return answers, probes


@pytest.mark.parametrize("step,cap", [(1, 512), (256, 65536)])
def test_a_search_that_takes_its_hint_again_finds_the_same_sizes_with_fewer_probes(step, cap):
    """Checkpointing's peak on the GPU: flat over the small sizes (parameters, optimiser state and the step's
    transients) and linear beyond, so the line through the first two sizes points at the cap. The search
    that asks the measured line again after each probe finds every answer in a few probes."""
    def peak(n):
        return max(2_200 + n // step, 1_900 + 70 * n // step)  # about flat up to 4 steps, then 70 a step

    budgets = (8_000, 16_000, 36_000)
    truth = [min(cap, (b - 1_900) // 70 * step) for b in budgets]
    once, probes_once = _axis(peak, budgets, cap, step, rehinted=False)
    again, probes_again = _axis(peak, budgets, cap, step, rehinted=True)
    assert once == again == truth
    assert probes_again[0] <= 5 < probes_once[0], (probes_again, probes_once)
    assert sum(probes_again) < sum(probes_once) / 2, (probes_again, probes_once)


@pytest.mark.parametrize("bad", ["below", "above", "edge", "creep", "none"])
def test_a_misleading_rehint_costs_probes_never_the_answer(bad):
    cap = 512
    for boundary in (0, 1, 2, 37, 200, 511, 512):
        for hint in (1, boundary, 300, 512):
            state = {"fit": 0}

            def fits(n, b=boundary, state=state):
                if n <= b:
                    state["fit"] = max(state["fit"], n)
                return n <= b

            def rehint(state=state, boundary=boundary):
                state["n"] = state.get("n", 0) + 1  # a different wrong size each time
                # creep: one past the largest size seen to fit, which taken every time would cost a probe a size
                return {"below": 1 + state["n"], "above": cap - state["n"], "edge": boundary + 2,
                        "creep": state["fit"] + 1, "none": None}[bad]

            plain = largest_fitting(lambda n, b=boundary: n <= b, cap, hint=hint)
            res = largest_fitting(fits, cap, hint=hint, rehint=rehint)
            assert res.best == plain.best == boundary and not res.exhausted, (bad, boundary, hint)
            assert res.capped == (boundary == cap)
            assert len({n for n, _ in res.probes}) == len(res.probes)
            assert len(res.probes) <= 2 * (2 * max_probes_needed(cap) + 2), (bad, boundary, hint, res.probes)


def test_bracket_hint_interpolates_between_the_sizes_around_the_limit():
    flat_then_linear = [(1, 2_200), (2, 2_200), (512, 1_900 + 70 * 512)]
    assert affine_hint(flat_then_linear[:2], 8_000) is None  # no growth seen: no line
    n = bracket_hint(flat_then_linear, 8_000)
    assert 2 < n < 512 and abs(n - (2 + (8_000 - 2_200) * 510 / (37_740 - 2_200))) < 1
    assert bracket_hint(flat_then_linear, 8_000, step=4) == n // 4 * 4
    points = [(1, 1_300), (2, 1_600), (4, 2_200)]  # nothing measured above the limit: the two largest's line
    assert bracket_hint(points, 1_000 + 300 * 37 + 10) == affine_hint(points, 1_000 + 300 * 37 + 10) == 37


def test_parse_budgets_and_methods():
    assert parse_budgets("16, 8,8,40") == [8.0, 16.0, 40.0]
    for bad in ("", "8,x", "0", "-1", "inf"):
        with pytest.raises(ValueError):
            parse_budgets(bad)
    assert parse_methods("all", FRONTIER_METHODS) == list(FRONTIER_METHODS)
    assert parse_methods("ckpt,exact,ckpt", FRONTIER_METHODS) == ["ckpt", "exact"]
    with pytest.raises(ValueError, match="unknown"):
        parse_methods("exact,nope", FRONTIER_METHODS)


def test_out_of_memory_is_a_size_that_does_not_fit(monkeypatch):
    """A probe that runs out of memory answers "does not fit"; the search goes on below it."""
    def point(self, batch, seq, steps):
        if batch > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"status": "ok", "peak_bytes": batch}

    monkeypatch.setattr(frontier.Prober, "_point", point)
    prober = frontier.Prober(lambda b, s: None, torch.device("cpu"), log=lambda line: None)
    res = frontier._run_axis(prober, "batch", {"seq": 32, "cap": 64, "step": 1}, [1.0], None, 1)
    r = res["per_budget"]["1"]
    assert r["best"] == 5 and r["stopped_by"] == ["oom"] and res["measurements"]["6"]["status"] == "oom"


def test_offload_stops_where_host_memory_would_run_out(monkeypatch):
    """Offload pins a host copy of what it saves: sizes predicted (from the bytes per token that smaller
    sizes pinned) to pin more than the host limit are not run and count as not fitting."""
    ran = []

    def point(self, batch, seq, steps):
        ran.append(batch)
        return {"status": "ok", "peak_bytes": batch, "offloaded_bytes": 10 * batch * seq}

    monkeypatch.setattr(frontier.Prober, "_point", point)
    prober = frontier.Prober(lambda b, s: None, torch.device("cpu"), host_limit=10 * 32 * 12, log=lambda line: None)
    res = frontier._run_axis(prober, "batch", {"seq": 32, "cap": 64, "step": 1}, [1.0], None, 1)
    r = res["per_budget"]["1"]
    assert r["best"] == 12 and r["stopped_by"] == ["host-memory"] and max(ran) == 12
    assert res["measurements"]["13"]["status"] == "host-memory"


# ------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def frontier_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    args = ["--frontier", "--budget", ",".join(map(str, BUDGETS)), "--quick", "--device", "cpu",
            "--timed-steps", "1", "--out", str(out)]
    result = _single_threaded(lambda: CliRunner().invoke(app, args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, json.loads((out / "frontier.json").read_text())


def test_the_three_files_with_every_method(frontier_out):
    out, res = frontier_out
    assert list(res["methods"]) == list(FRONTIER_METHODS)
    assert res["budgets_gib"] == list(BUDGETS)
    assert {"gpu", "torch", "command", "date", "peak", "peak_kind"} <= res["meta"].keys()
    assert res["meta"]["peak_kind"] == "cpu_estimate" and "not an allocator peak" in res["meta"]["peak"]
    md = (out / "frontier.md").read_text()
    assert "not an allocator peak" in md
    for gib in BUDGETS:
        assert f"## {gib:g} GiB" in md
    for mid, m in res["methods"].items():
        assert m["status"] in ("ok", "refused"), (mid, m.get("error"))
        assert md.count(f"| {m['label']} |") == len(BUDGETS) + 1  # and the reference size's table
        if m["status"] == "refused":
            assert m["reason"]
            continue
        for axis, spec in FRONTIER_AXES_QUICK.items():
            for gib in BUDGETS:
                r = m[axis]["per_budget"][f"{gib:g}"]
                assert r["best"] > 0 and r["probes"] >= 1, (mid, axis, gib)
                assert r["peak_bytes"] <= gib * 2**30 and r["tokens_per_s"] > 0
                sizes = {int(n): p for n, p in m[axis]["measurements"].items()}
                above = r["best"] + spec["step"]
                assert r["capped"] or sizes[above]["peak_bytes"] > gib * 2**30  # the answer is the boundary
    ref = FRONTIER_REFERENCE_QUICK
    assert res["settings"]["reference"] == ref and f"## Every method at B {ref['batch']} x T {ref['seq']}" in md
    for m in res["methods"].values():
        if m["status"] == "ok":
            r = m["reference"]
            assert (r["batch"], r["seq"], r["status"]) == (ref["batch"], ref["seq"], "ok")
            assert r["tokens_per_s"] > 0 and r["peak_bytes"] == m["batch"]["measurements"][str(ref["batch"])]["peak_bytes"]
    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_the_report_is_written_again_from_the_json_alone(frontier_out, tmp_path):
    out, _ = frontier_out
    (tmp_path / "frontier.json").write_bytes((out / "frontier.json").read_bytes())
    frontier_report.main([str(tmp_path)])
    assert (tmp_path / "frontier.md").read_text() == (out / "frontier.md").read_text()
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        frontier_report.main([str(tmp_path / "none")])


def test_cpu_estimate_counts_parameters_gradients_and_adamw_state(frontier_out):
    """The CPU stand-in for the peak: saved bytes plus float32 parameters, gradients and AdamW's two
    moments (4 x 4 bytes a parameter) and AdamW's per-tensor step counters (a scalar each)."""
    _, res = frontier_out
    cfg = frontier.method_config({"train.method": "exact"}, torch.device("cpu"), True, 1, 32)
    params = list(build_gpt(gpt_config(cfg), seed=0, method="exact").parameters())
    n = sum(p.numel() for p in params)
    for m in res["methods"].values():
        r = m["batch"]["measurements"]["1"]  # T = 32 on the batch axis: the position table of 32 rows
        assert 16 * n <= r["static_bytes"] <= 16 * n + 8 * len(params)
        assert r["peak_bytes"] == r["static_bytes"] + r["activation_bytes"] + r["weight_cast_bytes"]


def test_more_memory_per_token_fits_no_larger_batch(frontier_out):
    """Exact keeps every block's activations, full checkpointing only each block's input: at one budget
    exact never fits a larger batch or a longer context, and here it fits strictly less."""
    _, res = frontier_out
    exact, ckpt = res["methods"]["exact"], res["methods"]["ckpt"]
    for axis in FRONTIER_AXES_QUICK:
        for gib in BUDGETS:
            e, c = (m[axis]["per_budget"][f"{gib:g}"] for m in (exact, ckpt))
            assert 0 < e["best"] < c["best"], (axis, gib)
            assert not e["capped"]
    # and more budget never fits less
    for m in res["methods"].values():
        for axis in FRONTIER_AXES_QUICK:
            bests = [m[axis]["per_budget"][f"{g:g}"]["best"] for g in BUDGETS]
            assert bests == sorted(bests)


def test_a_refused_or_failing_method_leaves_the_others(tmp_path):
    methods = {"compiled-int8": ("int8 under torch.compile", {"train.compile": True, "train.saved_activations": "int8"}),
               "cce-on-cpu": ("CCE head on CPU", {"train.method": "exact", "model.head_kernel": "cce"}),
               "exact": FRONTIER_METHODS["exact"]}
    failed = _single_threaded(lambda: frontier.run_frontier(
        [BUDGETS[0]], tmp_path, torch.device("cpu"), quick=True, methods=methods, max_probes=3, timed_steps=1,
        log=lambda line: None))
    res = json.loads((tmp_path / "frontier.json").read_text())
    assert failed == 1
    assert [m["status"] for m in res["methods"].values()] == ["refused", "error", "ok"]
    assert "not supported with train.compile" in res["methods"]["compiled-int8"]["reason"]
    assert "CCE" in res["methods"]["cce-on-cpu"]["error"] and res["methods"]["cce-on-cpu"]["traceback"]
    md = (tmp_path / "frontier.md").read_text()
    assert "| int8 under torch.compile | refused: train.saved_activations int8" in md
    assert "| CCE head on CPU | error: RuntimeError" in md


def test_argparse_entry_point_and_resume(tmp_path):
    """`python -m basis_train.experiments.frontier` (no typer), and --resume keeping finished methods."""
    common = ["--budget", str(BUDGETS[0]), "--quick", "--device", "cpu", "--out", str(tmp_path), "--timed-steps", "1",
              "--max-probes", "4"]

    def run(*extra):
        with pytest.raises(SystemExit) as exit_:
            _single_threaded(lambda: frontier.main([*common, *extra]))
        return exit_.value.code

    assert run("--methods", "exact") == 0
    first = json.loads((tmp_path / "frontier.json").read_text())["methods"]["exact"]
    assert run("--methods", "exact,int8", "--resume") == 0
    res = json.loads((tmp_path / "frontier.json").read_text())
    assert list(res["methods"]) == ["exact", "int8"] and res["methods"]["exact"] == first  # kept, not rerun
    assert run("--methods", "exact", "--resume", "--timed-steps", "2") == 2  # other settings: refused, not overwritten
    assert json.loads((tmp_path / "frontier.json").read_text()) == res
    assert run("--methods", "nope") == 2
    assert run("--methods", "exact", "--budget", "-3") == 2


def test_the_recorded_command_is_the_one_a_user_types(monkeypatch):
    def command_line():  # as run_frontier records it
        return provenance.command_line(frontier.__spec__, frontier.__file__)

    monkeypatch.setattr(sys, "argv", [frontier.__file__, "--budget", "8,16", "--out", "a b"])
    assert command_line() == "python -m basis_train.experiments.frontier --budget 8,16 --out 'a b'"
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/basis-bench", "--frontier", "--budget", "8"])
    assert command_line() == "basis-bench --frontier --budget 8"
