"""DQO data logic (DQO paper §4.4, appendix A): segments and the process-score rule on hand examples,
the prefix search, process rewards on tokens, DPO pair building, the RS / gold / KTO adapters, and
that the scorer's per-token log-probs line up with the `trajectory`, `pair` and `labelled` builders."""
from __future__ import annotations

import random
import re

import pytest
import torch

from stepwise.data.jsonl import DataError
from stepwise.pipeline.stages.dqo_data import dpo_pairs, gold_records, pair_indices
from stepwise.pipeline.stages.dqo_process import PrefixSearch, merge_steps, segment_token_rewards, step_rewards
from stepwise.pipeline.stages.sampling import correct_as_sft
from stepwise.tasks.steps import step_ends
from stepwise.train.pair_data import PairBatches, tokenize_pairs
from stepwise.train.score import as_trajectories, response_token_values
from stepwise.train.trajectory_data import TrajectoryBatches, tokenize_trajectories
from tests.helpers import make_tiny_char_tokenizer

RESPONSE = "3+4=7\n7*2=4\n4-5=9\nA: 9"


@pytest.fixture(scope="module")
def task_tokenizer(tmp_path_factory):
    """The embedded task's character-level tokenizer (it knows the newline), trained on the response."""
    from stepwise.tasks.tokenizer import load_tokenizer, train_task_tokenizer

    return load_tokenizer(train_task_tokenizer([RESPONSE, "Q: 1+2\n1+2=3\nA: 3"], tmp_path_factory.mktemp("tok"),
                                               vocab_size=40))


def test_segments_are_token_slices_that_decode_back_and_merge_into_near_equal_groups(task_tokenizer):
    tokenizer = task_tokenizer
    ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    ends = step_ends(ids, tokenizer, "\n")
    assert [tokenizer.decode(ids[a:b]) for a, b in zip([0] + ends[:-1], ends)] == ["3+4=7\n", "7*2=4\n", "4-5=9\n", "A: 9"]
    assert merge_steps(ends) == ends and merge_steps(ends, 4) == ends
    assert merge_steps([1, 2, 3, 4, 5], 2) == [2, 5]  # steps 1-2 | 3-5 (round(5/2) = 2)
    assert merge_steps([1, 2, 3, 4, 5], 3) == [2, 3, 5]
    assert merge_steps([], 3) == []


def test_process_rule_correct_all_steps_failed_up_to_the_longest_good_prefix():
    assert step_rewards(4, correct=True, good_prefix=0) == [0.25] * 4
    assert step_rewards(4, correct=False, good_prefix=2) == [0.25, 0.25, 0.0, 0.0]
    assert step_rewards(4, correct=False, good_prefix=0) == [0.0] * 4
    with pytest.raises(ValueError):
        step_rewards(3, correct=False, good_prefix=4)


def sequential_search(n: int, ok) -> int:
    """The paper's loop for one response: i = n-1, n-2, ..., 1; the first i with a correct completion."""
    for i in range(n - 1, 0, -1):
        if ok(i):
            return i
    return 0


def test_prefix_search_tests_prefixes_longest_first_and_stops_at_the_first_success():
    good = {"a": {2}, "b": set(), "c": {1, 2, 3}, "d": {1}, "e": set()}  # prefix lengths with a correct completion
    counts = {"a": 4, "b": 3, "c": 5, "d": 2, "e": 1}
    search = PrefixSearch(counts)
    asked = []
    while search.pending():
        pending = search.pending()
        asked.append(pending)
        search.update({key: i in good[key] for key, i in pending.items()})
    assert asked[0] == {"a": 3, "b": 2, "c": 4, "d": 1}  # n = 1 has no proper prefix to test
    assert asked[1] == {"a": 2, "b": 1, "c": 3}
    assert asked[2:] == []
    assert search.result == {"a": 2, "b": 0, "c": 3, "d": 1, "e": 0}
    assert search.result == {k: sequential_search(n, lambda i, k=k: i in good[k]) for k, n in counts.items()}


def test_process_rewards_sit_on_each_segment_last_token_and_eos_gets_none(task_tokenizer):
    tokenizer = task_tokenizer  # one token per character
    ids = tokenizer(RESPONSE, add_special_tokens=False)["input_ids"]
    ends = step_ends(ids, tokenizer, "\n")
    rewards = segment_token_rewards(len(ids) + 1, ends, step_rewards(4, False, 2))
    assert len(rewards) == len(RESPONSE) + 1  # the response's tokens and eos, like trajectory_data
    newlines = [RESPONSE.index("\n"), RESPONSE.index("\n", 6)]
    assert {k: v for k, v in enumerate(rewards) if v} == {newlines[0]: 0.25, newlines[1]: 0.25}
    correct = segment_token_rewards(len(ids) + 1, ends, step_rewards(4, True, 0))
    assert correct[-2] == 0.25 and correct[-1] == 0.0 and sum(correct) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        segment_token_rewards(len(ids) + 1, ends[:-1], [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        segment_token_rewards(3, ends, [1.0] * 4)


def test_pairs_come_from_one_group_are_distinct_and_sized_by_the_count():
    groups = [([0, 1], [2, 3, 4]), ([5], []), ([], [6]), ([7, 8, 9], [10])]  # pools of 6, 0, 0, 3 pairs
    pairs = pair_indices(groups, 4, random.Random(0))
    assert len(pairs) == len(set(pairs)) == 4
    members = [set(pos) | set(neg) for pos, neg in groups]
    for p, n in pairs:
        assert any(p in m and n in m for m in members)
        assert any(p in pos and n in neg for pos, neg in groups)
    assert len(pair_indices(groups, 100, random.Random(0))) == 9  # the whole pool when it is smaller
    assert pair_indices(groups, 4, random.Random(1)) == pair_indices(groups, 4, random.Random(1))
    counts = [0, 0]
    for seed in range(300):  # uniform over the pool: the first group holds 2/3 of it
        for p, _ in pair_indices(groups, 1, random.Random(seed)):
            counts[p >= 7] += 1
    assert 0.55 < counts[0] / 300 < 0.78


def graded(problem_id: str, response: str, correct: bool) -> dict:
    return {"id": problem_id, "problem": f"Q{problem_id}\n", "response": response, "correct": correct,
            "token_ids": [ord(c) for c in response], "finish_reason": "length"}


def test_dpo_pairs_chosen_correct_rejected_wrong_same_prompt_and_baseline_adapters():
    records = [graded("a", "r1", True), graded("a", "w1", False), graded("a", "w2", False),
               graded("b", "r2", True), graded("c", "w3", False)]
    pairs = dpo_pairs(records, 5, seed=0)
    assert sorted((c["response"], w["response"]) for c, w in pairs) == [("r1", "w1"), ("r1", "w2")]
    assert len(dpo_pairs(records, 1, seed=0)) == 1
    assert list(correct_as_sft(records, 1)) == [{"prompt": "Qa\n", "response": "r1", "response_ids": [114, 49, 1]},
                                                {"prompt": "Qb\n", "response": "r2", "response_ids": [114, 50, 1]}]
    train = [{"id": "a", "problem": "Qa\n", "solution": "gold a"}, {"id": "z", "problem": "Qz\n", "solution": "z"}]
    assert gold_records(train, {"a"}, "train.jsonl") == [{"prompt": "Qa\n", "response": "gold a"}]
    with pytest.raises(DataError, match=r"train.jsonl:1: problem 'a' has no 'solution'"):
        gold_records([{"id": "a", "problem": "Qa\n"}], {"a"}, "train.jsonl")


def test_scored_token_logprobs_line_up_with_the_trajectory_and_pair_builders():
    tokenizer = make_tiny_char_tokenizer(97)
    records = [{"prompt": "Q: 1+2\n", "response": "1+2=3\nA: 3"}, {"prompt": "Q: 9\n", "response": "A: 9"},
               {"prompt": "Q: 5\n", "response": "A: 5", "response_ids": [36, 29, 3, 24, 1]}]
    placeholders = as_trajectories(records, tokenizer)
    batches = TrajectoryBatches(tokenize_trajectories(placeholders, tokenizer, 64), 0, 64, micro_batch_size=8)
    (micro,) = batches.micro_batches([0, 1, 2], 0, 1)
    fake_logp = micro["labels"].float() * -0.01  # "log-prob" of each label: identifies the token it scores
    scored = response_token_values(fake_logp, micro["loss_mask"])
    eos = tokenizer.eos_token_id
    assert scored[0] == pytest.approx([-0.01 * t for t in tokenizer("1+2=3\nA: 3")["input_ids"] + [eos]])
    assert scored[2] == pytest.approx([-0.01 * t for t in [36, 29, 3, 24, 1]])  # the sampler's own tokens
    # as ref_logp of a trajectory, each number lands at the position whose label is its token
    trajectories = [{**t, "ref_logp": s, "behaviour_logp": s, "reward": 1.0} for t, s in zip(placeholders, scored)]
    (again,) = TrajectoryBatches(tokenize_trajectories(trajectories, tokenizer, 64), 0, 64, 8).micro_batches([0, 1, 2], 0, 1)
    assert torch.allclose(again["ref_logp"], fake_logp * again["loss_mask"])
    # and the sum is the pair builder's sequence log-prob of the same response
    pair = {"prompt": records[0]["prompt"], "chosen": records[0]["response"], "rejected": records[1]["response"],
            "ref_chosen_logp": 0.0, "ref_rejected_logp": 0.0}
    (pairs,) = PairBatches(tokenize_pairs([pair], tokenizer, 64), 0, 64, 1).micro_batches([0], 0, 1)
    chosen = (pairs["labels"][0].float() * -0.01 * pairs["loss_mask"][0]).sum()
    assert float(chosen) == pytest.approx(sum(scored[0]))


def test_schema_defaults_are_the_papers_settings():
    from stepwise.config.schema import RecipeConfig

    config = RecipeConfig()
    params = config.dqo_data.params
    assert (params.n, params.temperature, params.top_p, params.top_k) == (20, 1.0, 0.9, 16)
    for section, loss, beta, lr, batch in (("dqo", "dqo", 0.03, 5e-7, 256), ("dro", "dro", 0.03, 5e-7, 256),
                                           ("dpo", "dpo", 0.1, 5e-8, 64), ("kto", "kto", 0.1, 5e-8, 64)):
        train = getattr(config, section)
        assert (train.loss, train.loss_args["beta"], train.optim.lr, train.global_batch_size) == (loss, beta, lr, batch)
    assert (config.dqo.epochs, config.dro.epochs, config.dpo.epochs) == (2.0, 1.0, 1.0)
    for section in ("sft_baseline", "rs_baseline"):
        train = getattr(config, section)
        assert (train.loss, train.optim.lr, train.global_batch_size, train.epochs) == ("sft", 2e-5, 64, 3.0)


@pytest.mark.parametrize("overrides, fragment", [
    (["kto.micro_batch_size=4"], "kto.micro_batch_size=4 and the per-DP-rank batch 64 must be multiples of "
                                 "kto.loss_args.kl_group_size=8"),
    (["dqo_data.process_scores=true", "run.stages=[data,dqo_sample,dqo_datasets]"], "needs the stage 'dqo_process'"),
    (["dqo_data.separator=''"], "dqo_data.separator must be a non-empty string"),
    (["dqo_data.dpo_pair_ratio=0"], "dqo_data.dpo_pair_ratio=0.0 must be > 0"),
    (["dqo.global_batch_size=30"], "dqo.global_batch_size=30 is not divisible"),
])
def test_dqo_config_errors_name_the_key(overrides, fragment):
    from pathlib import Path

    from stepwise.config import ConfigError, load_recipe

    recipe = Path(__file__).resolve().parents[2] / "recipes/tiny/dqo_arith.yaml"
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_recipe(recipe, overrides)


def test_report_table_has_a_row_per_method_with_greedy_and_sampled_accuracy():
    from stepwise.pipeline.stages.dqo_train import mean_std, table_lines

    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, 0.1414213))
    greedy = {"problems": 10, "correct": 4, "accuracy": 0.4}
    sampled = {"mean": 0.35, "std": 0.02, "per_seed": [0.33, 0.37], "n_problems": 10}
    stages = {"eval": {"base": greedy}, "dqo_base_eval": {"sampled": sampled},
              "dqo": {"records": 64, "final": {"step": 5}, "dqo": greedy, "sampled": sampled, "value_model": "head"},
              "dpo": {"records": 2, "skipped": "2 records < one global batch of 4"}}
    text = "\n".join(table_lines(stages))
    assert "| pi0 (base) | 0.400 (4/10) | 0.350 ± 0.020 (2 seeds) |" in text
    assert "| dqo (value head) | 0.400 (4/10) | 0.350 ± 0.020 (2 seeds) | 64 | 5 |" in text
    assert "| dpo | skipped: 2 records" in text and "rs_baseline" not in text
    assert table_lines({"eval": {"base": greedy}}) == []
