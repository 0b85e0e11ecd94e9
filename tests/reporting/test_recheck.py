"""The re-check verdict: a re-run grid's gaps against the committed grid's CIs."""

import json

from basis_train.reporting.recheck import compare_grids, main


def _grid(root, losses: dict[str, list[float]]):
    for label, vals in losses.items():
        method, rank = ("exact", None) if label == "exact" else ("basis", int(label[1:]))
        for seed, v in enumerate(vals):
            d = root / "runs" / (f"{label}-s{seed}")
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps({
                "method": method, "rank": rank, "variant": "", "seed": seed, "steps": 10, "final_val_loss": v,
                "val_protocol": "heldout"}))
    return root


EXACT = [6.30, 6.29, 6.28, 6.31, 6.27]


def test_gaps_inside_and_outside_the_committed_ci(tmp_path):
    ref = _grid(tmp_path / "ref", {"exact": EXACT, "R32": [x + g for x, g in zip(EXACT, [.06, .07, .065, .06, .07])]})
    same = _grid(tmp_path / "same", {"exact": EXACT, "R32": [x + g for x, g in zip(EXACT, [.066, .064, .06, .07, .065])]})
    moved = _grid(tmp_path / "moved", {"exact": EXACT, "R32": [x + g for x, g in zip(EXACT, [.10, .11, .10, .105, .1])]})
    rows = {r["label"]: r for r in compare_grids(ref, same)}
    assert rows["basis R=32"]["what"] == "paired gap to exact" and rows["basis R=32"]["inside"]
    assert rows["exact"]["what"] == "mean validation loss" and rows["exact"]["inside"]
    assert main([str(ref), str(same)]) == 0 and "all inside (2 of 2)" in (same / "recheck.md").read_text()
    rows = {r["label"]: r for r in compare_grids(ref, moved)}
    assert not rows["basis R=32"]["inside"] and rows["exact"]["inside"]
    assert main([str(ref), str(moved), "--out", str(tmp_path / "m.md")]) == 1
    assert "**no**" in (tmp_path / "m.md").read_text()


def test_means_mode_checks_every_configuration_mean_too(tmp_path):
    """--means (issue 13's fleet criterion): a second row per configuration with a gap, its mean inside the
    committed CI of the mean. A grid whose gaps hold but whose losses all moved up fails on the means."""
    r32 = [x + g for x, g in zip(EXACT, [.06, .07, .065, .06, .07])]
    ref = _grid(tmp_path / "ref", {"exact": EXACT, "R32": r32})
    shifted = _grid(tmp_path / "shifted", {"exact": [x + 0.5 for x in EXACT], "R32": [x + 0.5 for x in r32]})
    rows = compare_grids(ref, shifted, means=True)
    assert [(r["label"], r["what"]) for r in rows] == [
        ("exact", "mean validation loss"), ("basis R=32", "paired gap to exact"), ("basis R=32", "mean validation loss")]
    assert [r["inside"] for r in rows] == [False, True, False]
    assert main([str(ref), str(shifted), "--means", "--out", str(tmp_path / "s.md")]) == 1
    assert len(compare_grids(ref, shifted)) == 2  # without --means: issue 11's criterion, gaps only
    same = _grid(tmp_path / "same", {"exact": EXACT, "R32": r32})
    assert main([str(ref), str(same), "--means", "--out", str(tmp_path / "ok.md")]) == 0
    text = (tmp_path / "ok.md").read_text()
    assert "all inside (3 of 3)" in text and f"{sum(r32) / 5:.4f}" in text
