"""`stepwise spread`: per-policy mean / std across runs and gains over base within a run."""
from __future__ import annotations

import json

import pytest

from stepwise.pipeline.spread import spread_table


def write_run(path, base, dapo):
    path.mkdir()
    stages = {"eval": {"base": {"accuracy": base}}, "dapo_eval": {"policy": "x", "iteration_1": {"accuracy": dapo}}}
    (path / "report.json").write_text(json.dumps({"stages": stages}))
    return path


def test_spread_reports_mean_std_and_gain(tmp_path):
    runs = [write_run(tmp_path / f"s{i}", b, d) for i, (b, d) in enumerate([(0.4, 0.5), (0.42, 0.48), (0.38, 0.49)])]
    table = spread_table(runs)
    rows = {line.split("|")[1].strip(): line.split("|")[2:4] for line in table.splitlines()[2:]}
    assert float(rows["base"][0]) == pytest.approx(0.4)
    assert float(rows["base"][1]) == pytest.approx(0.02, abs=1e-3)
    assert float(rows["iteration_1 - base"][0]) == pytest.approx((0.1 + 0.06 + 0.11) / 3, abs=1e-3)


def test_missing_report_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="report.json"):
        spread_table([tmp_path])
