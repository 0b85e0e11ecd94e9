"""The scale report from synthetic run directories: configurations paired only within a protocol,
gaps at the final step and at every evaluation, lr tables, old field names, and the figures'
legibility (distinct series, labels that overlap nothing; memory.png: tests/reporting/test_plotstyle.py)."""

import csv
import json
import shutil

import pytest
import yaml

from basis_train.reporting.scale import write_report
from basis_train.reporting.stats import paired_diff

CORPUS = {"n_files_matched": 30, "n_files_used": 25, "n_duplicates": 3, "n_unreadable": 0, "n_not_utf8": 1,
          "n_binary": 1, "n_empty": 0, "bytes_used": 215_000, "documents": "one per file", "n_docs": 25,
          "n_tokens": 100_000}
DATA = {"protocol": "heldout", "n_docs": 25, "source": "files x", "heldout_every": 5, "n_train_docs": 20,
        "n_val_docs": 5, "n_train_tokens": 80_000, "n_val_tokens": 20_000, "n_train_chunks": 78, "corpus": CORPUS}
BREAKDOWN = {"attention": 2**28, "mlp_hidden": 2**29, "width_d": 2**28}


def fake_run(root, name, method, rank, variant, seed, val, step_peak=8 * 2**30, *, steps=20, optimizer="adamw",
             lr=6e-4, lr_factor=1.0, new_names=True, epoch=0, curve=None, **extra):
    """A run directory as train.py writes it; `curve`: {step: val loss} (default two evaluations)."""
    d = root / name
    d.mkdir(parents=True)
    mem = ({"activation_bytes": 2**30, "step_peak_bytes": step_peak} if new_names
           else {"peak_activation_bytes": 2**30, "cuda_peak_step_bytes": step_peak})
    summary = {"method": method, "rank": rank, "variant": variant, "seed": seed, "steps": steps,
               "final_val_loss": val, "final_train_loss": val + 0.1, "tokens_per_s": 1000.0 * (seed + 1),
               "wall_s": 3.0, "val_protocol": "heldout", "tokens_seen": steps * 8 * 1024, "epoch": epoch,
               "optimizer": optimizer, "lr": lr, "lr_factor": lr_factor, "data_order": "shuffled",
               "stream_fraction": steps / 100, "activation_breakdown": BREAKDOWN, "data": DATA, **mem, **extra}
    (d / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if v is not None}))
    curve = curve or {steps // 2: val + 0.5, steps: val}
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n" for s, v in curve.items()))
    return d


EXACT = [4.00, 4.10, 3.95]
BASIS = [4.05, 4.12, 4.04]
HALF = [4.60, 4.58, 4.70]  # BASIS R=256 at step 10


@pytest.fixture
def grid(tmp_path):
    g = tmp_path / "grid" / "runs"
    for s in range(3):
        fake_run(g, f"exact-s{s}", "exact", None, "", s, EXACT[s], new_names=s != 1)
        fake_run(g, f"exact_ckpt-s{s}", "exact", None, "ckpt", s, EXACT[s] + 0.001, 3 * 2**30)
        fake_run(g, f"basis_R256-s{s}", "basis", 256, "", s, BASIS[s], 7 * 2**30,
                 curve={10: HALF[s], 20: BASIS[s]}, mfu=0.30)
        fake_run(g, f"basis_R1024_all-s{s}", "basis", 1024, "layers=all", s, BASIS[s] + 0.1, 6 * 2**30)
    fake_run(g, "exact_lr0.5x-s0", "exact", None, "lr0.5x", 0, 3.90, lr_factor=0.5)
    fake_run(g, "basis_R256_lr0.5x-s0", "basis", 256, "lr0.5x", 0, 3.99, 7 * 2**30, lr_factor=0.5)
    for lr, v in ((0.1, 5.0), (0.3, 4.8)):
        fake_run(g, f"exact_sgd{lr}-s0", "exact", None, "", 0, v, optimizer="sgd", lr=lr)
    fake_run(g, "basis_R256_sgd0.3-s0", "basis", 256, "", 0, 4.9, 7 * 2**30, optimizer="sgd", lr=0.3)
    fake_run(g, "exact_80-s0", "exact", None, "", 0, 3.5, steps=80)
    fake_run(g, "basis_R256_80-s0", "basis", 256, "", 0, 3.62, 7 * 2**30, steps=80)
    return g.parent


def _line(md, start):
    return next(ln for ln in md.splitlines() if ln.startswith(start))


def test_report_files_and_rows(grid, tmp_path):
    res = tmp_path / "results"
    write_report(grid, res, command="python scripts/scale_grid.py")
    for name in ("results.csv", "summary.md", "val_loss.png", "gap_vs_step.png", "pareto.png", "memory.png",
                 "corpus.md"):
        assert (res / name).stat().st_size > 0, name
    rows = list(csv.DictReader((res / "results.csv").open()))
    assert len(rows) == 19
    assert {r["step_peak_bytes"] for r in rows if r["label"] == "exact"} == {str(8 * 2**30)}  # old name read too
    assert {r["label"] for r in rows} >= {"exact [sgd,lr=0.3]", "basis R=256 [sgd,lr=0.3]", "exact [80 steps]",
                                          "basis R=256 [lr0.5x]", "basis R=1024 [layers=all]"}
    corpus = (res / "corpus.md").read_text()
    assert "| duplicates dropped (identical bytes) | 3 |" in corpus and "| bytes per token | 2.15 |" in corpus
    assert "| order of the training chunks | shuffled |" in corpus and "0.200–0.800" in corpus


def test_gaps_are_paired_within_a_protocol(grid, tmp_path):
    write_report(grid, tmp_path / "r")
    md = (tmp_path / "r" / "summary.md").read_text()
    d = paired_diff(BASIS, EXACT)
    line = _line(md, "| basis R=256 |")
    assert f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] (0/3 better) | {d['p_value']:.4f}" in line
    assert "| 1024.0 | 7.00 | 2,000 | 30.0% |" in line  # activation MiB, step peak GiB, tokens/s, MFU
    # Each against exact of its own protocol, not the main grid's exact:
    assert "+0.1000 (1 seed, no CI)" in _line(md, "| basis R=256 [sgd,lr=0.3] |")
    assert "+0.1200 (1 seed, no CI)" in _line(md, "| basis R=256 [80 steps] |")
    assert "+0.0900 (1 seed, no CI)" in _line(md, "| basis R=256 [lr0.5x] |")
    assert "(baseline)" in _line(md, "| exact [sgd,lr=0.1] |")
    at10 = paired_diff(HALF, [v + 0.5 for v in EXACT])
    table = md[md.index("### Gap to exact (adamw, lr 0.0006, 20 steps"):]
    assert table.splitlines()[2] == "| step | exact [ckpt] | basis R=256 | basis R=1024 [layers=all] |"
    assert f"| 10 | +0.001 [+0.001, +0.001] | {at10['mean']:+.3f} [{at10['ci_low']:+.3f}, {at10['ci_high']:+.3f}] |" \
        in table


def test_lr_tables(grid, tmp_path):
    write_report(grid, tmp_path / "r")
    md = (tmp_path / "r" / "summary.md").read_text()
    adam = md[md.index("### adamw, 20 steps"):]
    assert "| exact | 3.9000 | 4.0000 |" in adam and "| basis R=256 | 3.9900 (+0.090) | 4.0500 (+0.050) |" in adam
    assert "[ckpt]" not in adam.split("###")[1]
    sgd = md[md.index("### sgd, 20 steps"):]
    assert "| lr 0.1 | lr 0.3 (exact's best) |" in sgd and "| basis R=256 | – | 4.9000 (+0.100) |" in sgd


def test_a_missing_baseline_is_said(tmp_path):
    g = tmp_path / "g"
    fake_run(g, "basis-s0", "basis", 64, "", 0, 4.0, optimizer="sgd", lr=0.01)
    fake_run(g, "exact-s0", "exact", None, "", 0, 3.0)
    fake_run(g, "exact-s1", "exact", None, "", 1, 3.1)
    write_report(g, tmp_path / "r")  # run directories directly under the grid directory
    assert "no baseline (exact [sgd,lr=0.01] not run)" in (tmp_path / "r" / "summary.md").read_text()


def test_a_rank_clamped_to_the_rows_is_the_rank_asked_for(tmp_path):
    """Two ranks above the rows of a step both run R = rows (train.py records rank and
    rank_requested): they stay two configurations, each saying the R that ran."""
    g = tmp_path / "g"
    for s in range(2):
        fake_run(g, f"exact-s{s}", "exact", None, "", s, 4.0 + s)
        for r in (1024, 4096):
            fake_run(g, f"basis_R{r}-s{s}", "basis", 32, "", s, 4.1 + s, rank_requested=r)
    write_report(g, tmp_path / "r")
    rows = list(csv.DictReader((tmp_path / "r" / "results.csv").open()))
    assert {r["label"] for r in rows} == {"exact", "basis R=1024 [ran R=32]", "basis R=4096 [ran R=32]"}


def test_diverged_runs_are_named(grid, tmp_path):
    (grid / "runs" / "exact_sgd1-s0").mkdir()
    (grid / "runs" / "exact_sgd1-s0" / "diverged.json").write_text("{}")
    write_report(grid, tmp_path / "r")
    assert "Diverged (non-finite training loss, no final loss, left out above): exact_sgd1-s0." in \
        (tmp_path / "r" / "summary.md").read_text()


def test_old_runs_without_the_new_fields(tmp_path):
    """Runs written before lr_factor and data_order: the variant tag and config.yaml say them."""
    g = tmp_path / "g"
    for s in range(2):
        d = fake_run(g, f"exact_lr2x-s{s}", "exact", None, "lr2x", s, 4.0 + s, lr_factor=None, data_order=None)
        (d / "config.yaml").write_text("data:\n  shuffle: false\n")
        fake_run(g, f"exact-s{s}", "exact", None, "", s, 4.1 + s)
    write_report(g, tmp_path / "r")
    rows = list(csv.DictReader((tmp_path / "r" / "results.csv").open()))
    assert {(r["label"], r["lr_factor"], r["data_order"]) for r in rows} == {
        ("exact [lr2x,stream]", "2.0", "stream"), ("exact", "1.0", "shuffled")}


def test_flags_a_second_epoch_and_refuses_mixed_splits(grid, tmp_path):
    fake_run(grid / "runs", "basis_R64-s0", "basis", 64, "", 0, 4.2, epoch=1)
    write_report(grid, tmp_path / "r")
    assert "not a single-pass grid" in (tmp_path / "r" / "summary.md").read_text()
    path = grid / "runs" / "exact-s0" / "summary.json"
    s = json.loads(path.read_text())
    path.write_text(json.dumps({**s, "data": {**DATA, "n_val_tokens": 1}}))
    with pytest.raises(ValueError, match="different data splits"):
        write_report(grid, tmp_path / "r2")


def test_speed_of_runs_that_shared_a_gpu_is_left_out(tmp_path):
    g = tmp_path / "grid"
    for s in range(3):
        fake_run(g, f"exact-s{s}", "exact", None, "", s, 4.0 + s / 10, **({"runs_per_gpu": 2} if s else {}))
    write_report(g, tmp_path / "res")
    line = _line((tmp_path / "res" / "summary.md").read_text(), "| exact |")
    assert line.endswith("| 1,000 | – |"), line  # seed 0's 1000 tok/s, not the mean 2000 of all three
    rows = list(csv.DictReader((tmp_path / "res" / "results.csv").open()))
    assert sorted((r["runs_per_gpu"], r["tokens_per_s"]) for r in rows) == [
        ("1", "1000.0"), ("2", "2000.0"), ("2", "3000.0")]


# ------------------------------------------------------------------ figures


def _entries(grid):
    from basis_train.reporting.grid_stats import read_runs, reference_protocol, summarize_settings
    from basis_train.reporting.scale import run_dirs

    runs = read_runs(run_dirs(grid))
    return summarize_settings(runs), reference_protocol(runs)


def test_every_series_of_a_panel_has_its_own_colour_and_style(tmp_path):
    from basis_train.reporting.scale_plots import plot_val_loss

    g = tmp_path / "g"
    for r in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384):  # 12 series: colours repeat
        fake_run(g, f"basis_R{r}-s0", "basis", r, "", 0, 4.0 + r / 1e5)
    fake_run(g, "exact-s0", "exact", None, "", 0, 4.0)
    entries, ref = _entries(g)
    ((styles, _),) = plot_val_loss(entries, ref, tmp_path / "v.png")
    assert len(styles) == 12 and len(set(styles)) == 12


def test_pareto_names_every_point_with_its_speed(tmp_path):
    from basis_train.reporting.scale_plots import plot_pareto

    g = tmp_path / "g"
    for i, r in enumerate((64, 256, 1024, 4096)):  # memory and loss close together: labels beside them collide
        fake_run(g, f"basis_R{r}-s0", "basis", r, "", 0, 4.0 + 0.001 * i, (3 + 0.01 * i) * 2**30)
    fake_run(g, "basis_all-s0", "basis", 1024, "layers=all", 0, 4.002, 3.005 * 2**30)
    fake_run(g, "exact-s0", "exact", None, "", 0, 4.001, 3.02 * 2**30)
    fake_run(g, "exact_ckpt-s0", "exact", None, "ckpt", 0, 4.001, 1 * 2**30)
    entries, _ = _entries(g)
    texts = plot_pareto(entries, tmp_path / "p.png")
    assert len(texts) == 7 and len(set(texts)) == 7
    assert all(t.endswith("tok/s") or t.endswith("not measured alone") for t in texts), texts
    assert {t.split(" (n=")[0] for t in texts} == {e["label"] for e in entries if e.get("step_peak_bytes_mean")}


def test_pareto_points_beyond_ten_keep_their_own_colour_and_marker(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from basis_train.reporting.scale_plots import plot_pareto

    g = tmp_path / "g"
    for i, r in enumerate(2 ** k for k in range(4, 15)):  # 11 BASIS points and exact: colours repeat
        fake_run(g, f"basis_R{r}-s0", "basis", r, "", 0, 4.0 + 0.01 * i, (3 + 0.01 * i) * 2**30)
    fake_run(g, "exact-s0", "exact", None, "", 0, 4.0, 3.2 * 2**30)
    entries, _ = _entries(g)
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    plot_pareto(entries, tmp_path / "p.png")
    handles, labels = drawn[0].axes[0].get_legend_handles_labels()
    looks = {(h.lines[0].get_color(), h.lines[0].get_marker()) for h in handles}  # an errorbar's data line
    assert len(labels) == 12 and len(looks) == 12


def test_the_main_panel_splits_basis_from_exact_s_other_modes_and_references(tmp_path):
    from basis_train.reporting.scale_plots import panels

    g = tmp_path / "g"
    for name, method, rank, variant, val in (("exact-s0", "exact", None, "", 4.0), ("basis_R256-s0", "basis", 256, "", 4.3),
                                             ("exact_ckpt-s0", "exact", None, "ckpt", 4.01),
                                             ("nanogpt-s0", "nanogpt", None, "", 3.99)):
        fake_run(g, name, method, rank, variant, 0, val)
    fake_run(g, "exact_lr2x-s0", "exact", None, "", 0, 4.2, lr_factor=2.0)
    entries, ref = _entries(g)
    got = [(title, [e["label"] for e in es]) for title, es in panels(entries, ref)]
    assert [t.rsplit(": ", 1)[-1] for t, _ in got] == ["BASIS", "exact's other modes and methods, outside references",
                                                      "adamw at other lrs, 20 steps"]
    assert got[0][1] == ["exact", "basis R=256"] and got[1][1] == ["exact", "exact [ckpt]", "nanogpt"]
    # with nothing beside BASIS and exact (or nothing beside exact's variants), one main panel, as before
    for drop in ("exact_ckpt-s0", "nanogpt-s0"):
        shutil.rmtree(g / drop)
    entries, ref = _entries(g)
    assert [len(es) for _, es in panels(entries, ref)] == [2, 1]


@pytest.mark.parametrize(("first", "shown"), [(4.3, True), (9.0, False)])
def test_val_loss_axis_hides_only_a_first_evaluation_far_above_the_rest(tmp_path, first, shown):
    from basis_train.reporting.scale_plots import plot_val_loss

    g = tmp_path / "g"
    curve = {250: first, 500: 3.6, 750: 3.3, 1000: 3.1}  # as BASIS R = 64 at GPT-2 small: 4.3 at step 250
    fake_run(g, "basis_R64-s0", "basis", 64, "", 0, 3.1, curve=curve)
    fake_run(g, "exact-s0", "exact", None, "", 0, 2.9, curve={250: 3.7, 500: 3.3, 750: 3.0, 1000: 2.9})
    entries, ref = _entries(g)
    ((_, (low, high)),) = plot_val_loss(entries, ref, tmp_path / "v.png")
    assert low < 2.9 and (high > first) == shown and high > 3.6


def test_a_run_in_another_execution_mode_is_tagged_and_paired_with_exact(tmp_path):
    # Exact compiled and graphed (the grid), exact not compiled, exact neither: one seed, three settings.
    from basis_train.reporting.grid_stats import read_runs

    g = tmp_path / "g"
    for name, val, train in (("exact-s0", 2.44, {"compile": True, "cuda_graphs": True}),
                             ("basis_R256-s0", 3.04, {"compile": True, "cuda_graphs": True}),
                             ("exact_eager-s0", 2.49, {"compile": False, "cuda_graphs": True}),
                             ("exact_eager_nographs-s0", 2.45, {"compile": False, "cuda_graphs": False})):
        d = fake_run(g, name, "basis" if "basis" in name else "exact", 256 if "basis" in name else None, "", 0, val)
        (d / "config.yaml").write_text(yaml.safe_dump({"train": train}))
    runs = {r.run_dir.name: r for r in read_runs(sorted(g.iterdir()))}
    assert runs["exact-s0"].setting.tags == "" and runs["basis_R256-s0"].setting.tags == ""
    assert runs["exact_eager-s0"].setting.tags == "eager"
    assert runs["exact_eager_nographs-s0"].setting.tags == "eager,no-graphs"
    assert runs["exact_eager-s0"].setting.baseline == runs["exact-s0"].setting


def test_a_method_run_uncompiled_pairs_with_exact_uncompiled(tmp_path):
    # 8-bit saved activations need the model uncompiled: their cost is measured against exact
    # uncompiled of the same seed, not against compiled exact (which differs on its own).
    from basis_train.reporting.grid_stats import read_runs, summarize_settings
    from basis_train.reporting.scale import main_table

    g = tmp_path / "g"
    compiled, eager = {"compile": True}, {"compile": False}
    for seed, (e, u, q) in enumerate(((2.44, 2.49, 2.50), (2.45, 2.50, 2.52))):
        for name, method, val, train, variant in (("exact", "exact", e, compiled, ""),
                                                   ("basis_R256", "basis", e + 0.6, compiled, ""),
                                                   ("exact_eager", "exact", u, eager, ""),
                                                   ("exact_int8", "exact", q, eager, "act=int8")):
            d = fake_run(g, f"{name}-s{seed}", method, 256 if method == "basis" else None, variant, seed, val)
            (d / "config.yaml").write_text(yaml.safe_dump({"train": train}))
    runs = read_runs(sorted(g.iterdir()))
    by = {r.run_dir.name: r.setting for r in runs}
    assert by["exact_int8-s0"].baseline == by["exact_eager-s0"]
    assert by["exact_eager-s0"].baseline == by["exact-s0"] and by["basis_R256-s0"].baseline == by["exact-s0"]
    gaps = {e["label"]: e["gap"]["mean"] for e in summarize_settings(runs) if e.get("gap")}
    assert gaps["exact [act=int8,eager]"] == pytest.approx(0.015)  # (0.01 + 0.02) / 2: against uncompiled
    assert gaps["exact [eager]"] == pytest.approx(0.05)
    table = "\n".join(main_table(summarize_settings(runs)))
    assert "vs exact [eager]" in table


def test_an_outside_reference_pairs_with_the_usual_exact_in_any_mode(tmp_path):
    # nanoGPT's model not compiled checks the exact run the gaps are measured against, not our
    # exact run in its mode (which has its own gap to check).
    from basis_train.reporting.grid_stats import read_runs, summarize_settings

    g = tmp_path / "g"
    for name, method, val, compiled in (("exact-s0", "exact", 2.44, True), ("exact_eager-s0", "exact", 2.49, False),
                                        ("nanogpt-s0", "nanogpt", 2.45, True),
                                        ("nanogpt_eager-s0", "nanogpt", 2.46, False)):
        fake_run(g, name, method, None, "", 0, val, compile=compiled)
    runs = read_runs(sorted(g.iterdir()))
    by = {r.run_dir.name: r.setting for r in runs}
    assert by["nanogpt_eager-s0"].tags == "eager" and by["nanogpt_eager-s0"].baseline == by["exact-s0"]
    gaps = {e["label"]: e["gap"]["mean"] for e in summarize_settings(runs) if e.get("gap")}
    assert gaps["nanogpt [eager]"] == pytest.approx(0.02) and gaps["exact [eager]"] == pytest.approx(0.05)


def test_speed_and_step_peak_come_from_one_gpu_and_are_listed_per_gpu(tmp_path):
    # Two seeds on one GPU kind, one on another, slower and with another step peak: the main table's
    # speed and peak are the common GPU's alone, and the per-GPU table shows both.
    g = tmp_path / "grid"
    for s, gpu in enumerate(("H100", "H100", "H200")):
        # fake_run's tokens/s: 1000 (seed + 1)
        fake_run(g, f"exact-s{s}", "exact", None, "", s, 4.0, step_peak=(4 if gpu == "H100" else 3) * 2**30, gpu=gpu)
    write_report(g, tmp_path / "res")
    md = (tmp_path / "res" / "summary.md").read_text()
    assert _line(md, "| exact |").endswith("| 4.00 | 1,500 | – |")  # seeds 0-1 on the H100
    assert "| exact | H100 | 2 | 4.00 | 1,500 | – |" in md and "| exact | H200 | 1 | 3.00 | 3,000 | – |" in md
    assert "the runs on H100, the GPU most runs used" in md
    rows = list(csv.DictReader((tmp_path / "res" / "results.csv").open()))
    assert sorted(r["gpu"] for r in rows) == ["H100", "H100", "H200"]


def test_tf32_is_a_mode_basis_in_it_pairs_with_exact_in_it(tmp_path):
    # train.tf32 changes no exact bf16 step (it has no float32 matmul), so exact [tf32] against exact is a
    # rerun of one seed, and BASIS [tf32] is measured against exact [tf32], as any run in another mode.
    from basis_train.reporting.grid_stats import read_runs, summarize_settings

    g = tmp_path / "g"
    for name, method, variant, val in (("exact-s1", "exact", "", 2.48), ("exact_tf32-s1", "exact", "tf32", 2.50),
                                       ("basis_R1024-s1", "basis", "", 2.74),
                                       ("basis_R1024_tf32-s1", "basis", "tf32", 2.73)):
        d = fake_run(g, name, method, 1024 if method == "basis" else None, variant, 1, val)
        (d / "config.yaml").write_text(yaml.safe_dump({"train": {"compile": True}}))
    runs = read_runs(sorted(g.iterdir()))
    by = {r.run_dir.name: r.setting for r in runs}
    assert by["basis_R1024_tf32-s1"].baseline == by["exact_tf32-s1"]
    assert by["exact_tf32-s1"].baseline == by["exact-s1"] == by["basis_R1024-s1"].baseline
    gaps = {e["label"]: e["gap"]["mean"] for e in summarize_settings(runs) if e.get("gap")}
    assert gaps == pytest.approx({"exact [tf32]": 0.02, "basis R=1024 [tf32]": 0.23, "basis R=1024": 0.26})
