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
