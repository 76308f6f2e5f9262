"""Fault injection on CPU, each a real multi-process run of the tiny model (docs/reliability.md):
SIGUSR1 on one rank, a NaN loss on one rank (skip and stop), the wall-clock deadline, resuming a DP 2
checkpoint at DP 1, and an input error raised on one rank reaching every rank."""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from stepwise.checkpoint import layout
from stepwise.parallel.inject import NAN_ENV
from stepwise.train.batches import DataOrder
from stepwise.train.guard import REQUEUE_EXIT_CODE
from tests.integration._fault_worker import GLOBAL_BATCH, SAMPLES, SEED
from tests.integration._ranks import finish, run_ranks, start_ranks, wait_for

HERE = Path(__file__).parent
WORKER = HERE / "_fault_worker.py"
AGREE = HERE / "_agree_worker.py"
pytestmark = pytest.mark.slow


def rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def expected_batches(count: int) -> list[list[int]]:
    order = DataOrder(SAMPLES, GLOBAL_BATCH, SEED)
    return [order.next_global_batch() for _ in range(count)]


def latest_step(root: Path) -> int:
    return layout.read_meta(layout.latest_iteration(root))["step"]


def explain(results) -> str:
    return "\n".join(f"--- rank {r.rank} rc={r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-2500:]}" for r in results)


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """DP 2: rank 1's loss is NaN at step 2 (nan_policy=skip); after step 3, SIGUSR1 to rank 1 alone."""
    root = tmp_path_factory.mktemp("preempted")
    procs = start_ranks(2, WORKER, root, 1000, "dp2", env={NAN_ENV: "1:2"})
    wait_for(lambda: len(rows(root / "dp2_rank0.jsonl")) >= 3, procs, what="three steps")
    procs[1].send_signal(signal.SIGUSR1)
    return root, finish(procs, timeout=240)


def test_sigusr1_on_one_rank_saves_the_same_step_on_every_rank_and_exits_for_requeue(preempted):
    root, results = preempted
    assert [r.returncode for r in results] == [REQUEUE_EXIT_CODE] * 2, explain(results)
    stops = [rows(root / f"dp2_rank{rank}.jsonl")[-1]["step"] for rank in (0, 1)]
    assert stops[0] == stops[1] == latest_step(root), stops
    assert 3 <= stops[0] < 1000
    for rank in (0, 1):
        exit_info = json.loads((root / f"dp2_exit_rank{rank}.json").read_text())
        assert exit_info["kind"] == "Requeue" and "SIGUSR1" in exit_info["message"]
        assert f"stopping at step {stops[0]} of 1000" in exit_info["message"]
    assert not list(root.glob("*.tmp"))


def test_nan_on_one_rank_is_skipped_by_every_rank_in_the_same_step(preempted):
    root, _ = preempted
    traces = [rows(root / f"dp2_rank{rank}.jsonl") for rank in (0, 1)]
    for trace in traces:
        assert [row["nonfinite"] for row in trace[:3]] == [0.0, 1.0, 0.0]
        assert [row["skipped"] for row in trace[:3]] == [0.0, 1.0, 0.0]
        assert trace[1]["digest"] == trace[0]["digest"], "a skipped step must not change the weights"
        assert trace[2]["digest"] != trace[1]["digest"]
    assert [row["digest"] for row in traces[0]] == [row["digest"] for row in traces[1]]
    metrics = rows(root / "metrics.jsonl")
    assert metrics[1]["nonfinite"] == 1.0 and metrics[-1]["nonfinite_total"] == 1


def test_resume_at_dp1_from_a_dp2_checkpoint_continues_the_data_order_and_the_deadline_requeues(preempted, tmp_path):
    source, _ = preempted
    root = tmp_path / "dp1"
    shutil.copytree(source, root)
    stopped = latest_step(root)
    # 0.001 minutes: the deadline has passed at the first step boundary, so the run saves there
    [result] = run_ranks(1, WORKER, root, 1000, "dp1", "--max-wall", "0.001")
    assert result.returncode == REQUEUE_EXIT_CODE, explain([result])
    before = [row["indices"] for row in rows(root / "dp2_rank0.jsonl")]
    after = [row["indices"] for row in rows(root / "dp1_rank0.jsonl")]
    assert [row["dp"] for row in rows(root / "dp1_rank0.jsonl")] == [1]
    assert before + after == expected_batches(stopped + 1)
    assert latest_step(root) == stopped + 1
    assert "RNG state not restored" in result.stdout
    assert "max_wall_minutes" in json.loads((root / "dp1_exit_rank0.json").read_text())["message"]


def test_nan_with_policy_stop_saves_and_stops_every_rank_with_a_clear_error(tmp_path):
    results = run_ranks(2, WORKER, tmp_path, 6, "stop", "--nan-policy", "stop", env={NAN_ENV: "0:3"})
    assert all(r.returncode not in (0, REQUEUE_EXIT_CODE) for r in results), explain(results)
    for r in results:
        assert "NonFiniteError: step 3: non-finite loss or gradient norm" in r.stderr, explain([r])
        trace = rows(tmp_path / f"stop_rank{r.rank}.jsonl")
        assert [row["step"] for row in trace] == [1, 2, 3] and trace[-1]["nonfinite"] == 1.0
        assert trace[2]["digest"] == trace[1]["digest"]
    assert latest_step(tmp_path) == 2, "the state before the bad step is saved"
    assert "iter_0000002" in json.loads((tmp_path / "stop_exit_rank1.json").read_text())["message"]


def test_an_error_on_one_rank_is_raised_on_every_rank():
    results = run_ranks(2, AGREE, timeout=120)
    assert [r.returncode for r in results] == [0, 0], explain(results)
    reports = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    assert reports[1]["caught"] == {"type": "DataError", "message": "train.jsonl:7: key 'prompt' is empty"}
    assert reports[0]["caught"] == {"type": "DataError",
                                    "message": "train.jsonl:7: key 'prompt' is empty (raised on rank 1)"}
    assert [r["any"] for r in reports] == [True, True] and [r["max"] for r in reports] == [13, 13]
