"""Each report names the machine facts that make runs differ across machines (BLAS build, CPU, threads)."""
from __future__ import annotations

import json

import torch

from stepwise.pipeline.launch import worker_threads
from stepwise.pipeline.machine import machine_facts
from stepwise.pipeline.stages.report import write_report
from tests.unit.test_plots import _synthetic_run


def test_worker_threads_follow_omp_num_threads_else_share_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_threads(2) == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert (worker_threads(2), worker_threads(8), worker_threads(32)) == (8, 2, 1)


def test_facts_come_from_this_torch_build_and_cpu(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    facts = machine_facts(nproc_per_node=2)
    assert facts["torch"] == torch.__version__ and facts["worker_threads"] == 5
    assert facts["blas"] and facts["blas"] in torch.__config__.show()
    assert facts["cpu_capability"] and facts["cpu_capability"] in torch.__config__.show()
    assert facts["cpu_model"] and facts["cpu_cores"] >= 1


def test_the_report_writes_them_into_json_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    write_report(_synthetic_run(tmp_path))
    facts = json.loads((tmp_path / "report.json").read_text())["machine"]
    assert facts["worker_threads"] == 7 and facts["torch"] == torch.__version__
    markdown = (tmp_path / "report.md").read_text()
    assert "## Machine" in markdown and f"- blas: {facts['blas']}" in markdown and "- worker_threads: 7" in markdown
