"""The mechanism table pairs each variant with the plain estimator of the same rank and seed."""

import pytest

from basis_train.experiments.ablations import main, mechanism_effects


def _row(method, rank, variant, seed, loss):
    return {"method": method, "rank": "" if rank is None else str(rank), "variant": variant, "seed": str(seed),
            "final_val_loss": str(loss)}


def test_effects_are_paired_against_the_same_rank():
    rows = []
    for s in range(4):
        noise = 0.1 * s  # shared by all configs of a seed: pairing must cancel it
        rows += [_row("exact", None, "", s, 6.0 + noise), _row("exact", None, "lr-matched", s, 6.01 + noise),
                 _row("basis", 32, "", s, 6.2 + noise), _row("basis", 32, "uniform", s, 6.25 + noise + 0.001 * s),
                 _row("basis", 8, "", s, 6.5 + noise), _row("basis", 8, "uniform", s, 6.4 + noise)]
    effects = {(e["scope"], e["variant"]): e for e in mechanism_effects(rows)}
    assert set(effects) == {("exact", "lr-matched"), ("R=32", "uniform"), ("R=8", "uniform")}
    assert effects[("exact", "lr-matched")]["mean"] == pytest.approx(0.01)
    r32 = effects[("R=32", "uniform")]
    assert r32["mean"] == pytest.approx(0.0515) and r32["n"] == 4 and r32["n_better"] == 0
    assert r32["ci_low"] > 0.049 and r32["ci_high"] < 0.054  # seed noise of 0.3 cancelled
    assert effects[("R=8", "uniform")]["mean"] == pytest.approx(-0.1)
    assert effects[("R=8", "uniform")]["n_better"] == 4


def test_cli_writes_the_table_and_fails_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no results.csv"):
        main([str(tmp_path)])
    (tmp_path / "results.csv").write_text(
        "method,rank,variant,seed,final_val_loss\n"
        + "".join(f"basis,32,,{s},{6.2 + s / 10}\nbasis,32,lam0,{s},{6.19 + s / 10}\n" for s in range(3)))
    main([str(tmp_path)])
    md = (tmp_path / "mechanisms.md").read_text()
    assert "| R=32 | lam0 | basis R=32 |" in md and "-0.0100" in md
