"""`stepwise spread`: per-policy mean / std across runs, gains over base within a run, and verdicts."""
from __future__ import annotations

import json

import pytest

from stepwise.pipeline.spread import read_runs, spread_rows, spread_table, verdicts


def write_run(path, base, dapo):
    path.mkdir()
    stages = {"eval": {"base": {"problems": 600, "accuracy": base}},
              "dapo_eval": {"policy": "x", "iteration_1": {"problems": 600, "accuracy": dapo}}}
    (path / "report.json").write_text(json.dumps({"stages": stages}))
    return path


def three_runs(tmp_path, pairs=((0.4, 0.5), (0.42, 0.48), (0.38, 0.49)), group="runs"):
    (tmp_path / group).mkdir()
    return read_runs([write_run(tmp_path / group / f"s{i}", b, d) for i, (b, d) in enumerate(pairs)])


def test_spread_reports_mean_std_and_gain(tmp_path):
    table = spread_table(three_runs(tmp_path))
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in table.splitlines()[2:]}
    assert float(rows["base"][0]) == pytest.approx(0.4)
    assert float(rows["base"][1]) == pytest.approx(0.02, abs=1e-3)
    assert float(rows["iteration_1 - base"][0]) == pytest.approx((0.1 + 0.06 + 0.11) / 3, abs=1e-3)


def test_verdict_compares_the_gain_with_the_spread(tmp_path):
    clear = verdicts(spread_rows(three_runs(tmp_path, group="clear")))
    assert len(clear) == 1 and clear[0].endswith(": larger than the spread")
    noisy = verdicts(spread_rows(three_runs(tmp_path, pairs=((0.3, 0.31), (0.5, 0.49), (0.4, 0.45)), group="noisy")))
    assert noisy[0].endswith("not larger than the spread")


def test_missing_report_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="report.json"):
        read_runs([tmp_path])


def test_gains_over_rejection_sampling_are_taken_within_each_run(tmp_path):
    """DQO's table: each method's gain over pi0 and over RS (rs_baseline), judged against the spread."""
    runs = {}
    for name, (base, rs, dqo) in {"s1": (0.40, 0.80, 0.84), "s2": (0.45, 0.82, 0.81), "s3": (0.42, 0.78, 0.80)}.items():
        runs[name] = {"base": base, "rs_baseline": rs, "dqo": dqo}
    rows = spread_rows(runs)
    assert rows["dqo - rs_baseline"]["runs"] == pytest.approx({"s1": 0.04, "s2": -0.01, "s3": 0.02})
    assert rows["dqo - base"]["mean"] == pytest.approx((0.44 + 0.36 + 0.38) / 3)
    assert "rs_baseline - rs_baseline" not in rows and "base - base" not in rows
    lines = {line.split(":")[0][2:]: line for line in verdicts(rows)}
    assert set(lines) == {"dqo - base", "rs_baseline - base", "dqo - rs_baseline"}
    assert lines["dqo - rs_baseline"].endswith("(max of rs_baseline 0.020 and of the gain 0.025): not larger than the spread")
    assert lines["dqo - base"].endswith(": larger than the spread")


def test_skywork_dapo_is_also_judged_against_its_critic_free_ablation_each_pair_once():
    runs = {name: {"base": 0.4, "iteration_1": 0.5 + d, "rs_same_steps": 0.55, "mc_same_steps": 0.52 - d}
            for name, d in (("s1", 0.0), ("s2", 0.02), ("s3", -0.01))}
    rows = spread_rows(runs)
    assert rows["iteration_1 - mc_same_steps"]["runs"] == pytest.approx({"s1": -0.02, "s2": 0.02, "s3": -0.04})
    assert "mc_same_steps - rs_same_steps" in rows and "rs_same_steps - mc_same_steps" not in rows
    assert [name for name in rows if " - " in name] == [
        "iteration_1 - base", "mc_same_steps - base", "rs_same_steps - base", "iteration_1 - rs_same_steps",
        "mc_same_steps - rs_same_steps", "iteration_1 - mc_same_steps"]
