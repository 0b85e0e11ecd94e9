"""scripts/speed_gpt2.py --targets: issue 22's target ratios from one process's rows and the grid's
compiled and eager exact runs, merged into targets.json beside the other parts."""

import json
from pathlib import Path

from tests.scripts_module import load_script


def _script():
    return load_script("speed_gpt2")


def _speed(tmp_path):
    rows = [{"row": "nanoGPT model.py, compiled", "ms": 20.0, "mfu": 0.4},
            {"row": "nanoGPT model.py, MLP+head as BasisLinear R=256, compiled", "ms": 23.0, "mfu": 0.3},
            {"row": "ours exact, fused head, compiled + CUDA graph", "ms": 18.0, "mfu": 0.46},
            {"row": "ours BASIS mlp+head R=256, fused head, compiled + CUDA graph", "ms": 17.0, "mfu": 0.5},
            {"row": "ours BASIS all R=256, fused head, compiled + CUDA graph", "error": "RuntimeError: x"}]
    meta = {"command": "python scripts/speed_gpt2.py o.json", "commit": "abc", "gpu": "NVIDIA H200",
            "torch": "2.11", "mfu_peak": "H200 bf16 dense peak 989 TFLOP/s"}
    path = tmp_path / "speed.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def test_targets_are_the_ratios_of_the_rows_and_the_runs(tmp_path):
    mod = _script()
    runs = tmp_path / "runs"
    # exact-s0 ran on another GPU than the rows: its speed is not compared with them, exact-s1's is
    for name, loss, gpu in (("exact-s0", 2.640, "NVIDIA H100"), ("exact_eager-s0", 2.655, "NVIDIA H100"),
                            ("exact_eager_nographs-s0", 2.643, "NVIDIA H200"), ("exact-s1", 2.7, "NVIDIA H200")):
        (runs / name).mkdir(parents=True)
        # 8 x 1024 tokens in 25.6 ms a step
        (runs / name / "summary.json").write_text(json.dumps({"final_val_loss": loss, "tokens_per_s": 320_000.0,
                                                             "gpu": gpu}))
    old = [{"target": "layer", "part": "layer", "measured": 0.9}, {"target": "stale", "part": "gpt2-speed",
                                                                     "command": "x (commit y, NVIDIA H200, torch z)"},
           {"target": "other gpu", "part": "gpt2-speed", "gpu": "NVIDIA H100"}]
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps(old))
    new = mod.merge_targets(_speed(tmp_path), targets, runs)
    got = {t["target"].split(",")[0] + " " + t["target"][-40:]: (t["measured"], t["met"]) for t in new}
    assert len(new) == 7  # the failed row gives no target
    measured = [(t["measured"], t["met"]) for t in new]
    assert measured == [(0.9, True), (round(17 / 18, 4), True), (1.15, False), (0.46, True), (1.28, False),
                        (0.015, False), (0.003, True)], got
    assert "exact-s1" in new[4]["target"] and new[6]["run_gpus"]["exact_eager_nographs-s0"] == "NVIDIA H200"
    merged = json.loads(targets.read_text())
    assert [t["target"] for t in merged[:2]] == ["layer", "other gpu"] and len(merged) == 9
    assert all("commit abc" in t["command"] for t in new[:4]) and {t["gpu"] for t in new} == {"NVIDIA H200"}


def test_the_plain_head_row_gives_its_ratio_to_nanogpt_beside_the_fused_one(tmp_path):
    mod = _script()
    speed = json.loads(_speed(tmp_path).read_text())
    speed["rows"].append({"row": "ours exact, plain head, compiled + CUDA graph", "ms": 19.0, "mfu": 0.44})
    got = {t["target"]: t for t in mod.targets(speed)}
    plain = next(t for name, t in got.items() if "plain head" in name)
    assert (plain["measured"], plain["met"], plain["limit"]) == (0.95, True, 1.0)  # 19 / 20 ms
    assert len(got) == 5  # three ratios and the MFU of the other rows (all linears failed), and this one


def test_the_forward_grad_rows_give_their_ratios_as_context(tmp_path):
    mod = _script()
    speed = json.loads(_speed(tmp_path).read_text())
    speed["rows"] += [{"row": mod.FGRAD_ROW, "ms": 19.5, "mfu": 0.43}, {"row": mod.FGRAD_BASIS_ROW, "ms": 18.0, "mfu": 0.4}]
    got = {t["target"]: t for t in mod.targets(speed)}
    fg = [t for name, t in got.items() if "forward-grad" in name]
    assert [(t["measured"], t["met"], t["limit"]) for t in fg] == [(0.975, True, 1.0), (round(18 / 19.5, 4), True, 0.95)]
    assert set(fg[0]["ms"]) == {mod.FGRAD_ROW, mod.NANO_ROW} and set(fg[1]["ms"]) == {mod.FGRAD_BASIS_ROW, mod.FGRAD_ROW}


def _runs(tmp_path, losses: dict[str, float]) -> Path:
    runs = tmp_path / "runs"
    for name, loss in losses.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "summary.json").write_text(json.dumps({"final_val_loss": loss, "gpu": "NVIDIA H100"}))
    return runs


def test_compiled_against_eager_is_judged_per_seed_and_over_seeds(tmp_path):
    """Compiled minus eager per seed: 0.035, 0.005, -0.025 (exact_eager_nographs has one seed: no mean).
    Over the seeds: mean 0.005, std 0.03, half-width t(0.975, 2) x 0.03 / sqrt(3) = 4.303 x 0.01732 = 0.0745."""
    mod = _script()
    runs = _runs(tmp_path, {"exact-s0": 2.495, "exact-s1": 2.465, "exact-s2": 2.435, "exact_eager-s0": 2.46,
                            "exact_eager-s1": 2.46, "exact_eager-s2": 2.46, "exact_eager_nographs-s1": 2.45})
    out = mod._run_targets(runs, {}, {"gpu": "NVIDIA H100"}, "cmd")
    assert [t["measured"] for t in out] == [0.035, 0.005, 0.025, 0.005, 0.015]
    assert [t["met"] for t in out] == [False, True, False, False, False]
    mean = out[3]
    assert "seeds 0, 1, 2" in mean["target"] and "not compiled, CUDA graph" in mean["target"]
    assert mean["ci"] == [round(0.005 - 0.0745, 4), round(0.005 + 0.0745, 4)]
    assert "(seed 1)" in out[4]["target"] and "neither" in out[4]["target"]


def test_a_mode_that_changes_no_result_meets_the_target_over_seeds(tmp_path):
    """Differences 0.001, 0.002, 0.003: mean 0.002, CI 0.002 +- 4.303 x 0.001 / sqrt(3), inside +-0.01."""
    mod = _script()
    runs = _runs(tmp_path, {"exact-s0": 2.461, "exact-s1": 2.462, "exact-s2": 2.463,
                            "exact_eager-s0": 2.46, "exact_eager-s1": 2.46, "exact_eager-s2": 2.46})
    mean = mod._run_targets(runs, {}, {"gpu": "NVIDIA H100"}, "cmd")[-1]
    assert mean["met"] and mean["measured"] == 0.002 and mean["ci"] == [round(0.002 - 0.0025, 4), round(0.002 + 0.0025, 4)]
