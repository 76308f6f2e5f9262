"""Forward-only scoring (`score.score_records`): one pipeline schedule of many micro-batches of
different lengths gives at PP 2 the rows of PP 1 (same records, same order, same number of values)
with values within the fp32 reordering bound; next states packed as branched records (a state's
prefix once, each action after it) score as they do one record each, within the same bound."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.conftest import run_python, run_torchrun
from tests.integration._critic_worker import HF
from tests.integration._scoring_worker import MAX_SEQ_LEN, next_states, solution_records
from tests.tolerance import output_bound, within

HERE = Path(__file__).parent


def scores(out: Path, checkpoint: Path, tp: int, pp: int) -> dict:
    if tp * pp == 1:
        run_python(HERE / "_scoring_worker.py", out, checkpoint, tp, pp)
    else:
        run_torchrun(tp * pp, HERE / "_scoring_worker.py", out, checkpoint, tp, pp)
    return torch.load(out)


def value_bound(values: list[float]) -> float:
    """V = sigmoid(logit): a logit off by the reorder bound of its magnitude moves V by at most 1/4 of it."""
    largest_logit = max(abs(math.log(v / (1 - v))) for v in values)
    return output_bound(largest_logit, HF, MAX_SEQ_LEN) / 4


def largest_difference(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(row) for row in a] == [len(row) for row in b]
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def records():
    generator = torch.Generator().manual_seed(0)  # as the worker draws them
    return solution_records(generator), next_states(generator)


def check_branched(result: dict, what: str) -> None:
    branched, plain = result["next_branched"], [row[0] for row in result["next_plain"]]
    states = records()[1]
    assert [len(row) for row in branched] == [len(state) for state in states]
    assert [len(row) for row in result["next_plain"]] == [1] * sum(map(len, states))
    flat = [value for row in branched for value in row]
    within(f"next-state values branched (packed) vs one record each, {what}", max(abs(a - b) for a, b in zip(flat, plain)),
           value_bound(plain))
    packed_tokens, plain_tokens = result["tokens"]
    assert packed_tokens < plain_tokens, result["tokens"]


@pytest.fixture(scope="module")
def at_pp1(tmp_path_factory) -> tuple[dict, Path]:
    """TP 1 PP 1 scores, and the checkpoint of the critic they came from."""
    out = tmp_path_factory.mktemp("pp1")
    return scores(out / "scores.pt", out / "critic", 1, 1), out / "critic"


def test_branched_next_states_score_as_one_record_each(at_pp1):
    result = at_pp1[0]
    assert [len(row) for row in result["solutions"]] == [len(record["ends"]) for record in records()[0]]
    check_branched(result, "TP 1")


@pytest.mark.slow
def test_scoring_at_pp2_gives_the_rows_of_pp1(at_pp1, tmp_path):
    at_pp1, checkpoint = at_pp1
    at_pp2 = scores(tmp_path / "scores.pt", checkpoint, 1, 2)
    for name in ("solutions", "next_plain", "next_branched"):
        values = [v for row in at_pp1[name] for v in row]
        within(f"{name}: PP 2 vs PP 1 scores", largest_difference(at_pp2[name], at_pp1[name]), value_bound(values))
    check_branched(at_pp2, "PP 2")
