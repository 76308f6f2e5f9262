"""Skywork DAPO data logic: balanced selection, step segmentation, advantages (terminal rewards,
unique actions, gap filter), held-out split and the critic report."""
from __future__ import annotations

import random

import pytest

from stepwise.pipeline.stages.dapo_data import balanced_pick
from stepwise.pipeline.stages.dapo_train import critic_report, held_out, state_advantages


def test_balanced_pick_takes_half_and_half_and_fills_from_the_larger_side():
    rng = random.Random(0)
    picked = balanced_pick(list(range(10)), [-1, -2, -3, -4, -5], 6, rng)
    assert sum(p >= 0 for p in picked) == 3 and len(picked) == 6
    picked = balanced_pick(list(range(10)), [-1], 6, rng)
    assert sum(p < 0 for p in picked) == 1 and len(picked) == 6
    assert balanced_pick([1, 2], [], 6, rng) == [1, 2] or sorted(balanced_pick([1, 2], [], 6, rng)) == [1, 2]


def test_advantages_use_the_mean_over_all_samples_and_keep_unique_actions():
    actions = [{"action_ids": [1], "value": 1.0}, {"action_ids": [1], "value": 1.0}, {"action_ids": [2], "value": 0.0},
               {"action_ids": [2, 3], "value": 0.25}]
    kept, gap = state_advantages(actions, 0.1)
    assert gap == 1.0 and [a["action_ids"] for a in kept] == [[1], [2], [2, 3]]
    baseline = (1 + 1 + 0 + 0.25) / 4
    assert [a["advantage"] for a in kept] == pytest.approx([1 - baseline, -baseline, 0.25 - baseline])


def test_states_with_a_small_gap_are_dropped():
    kept, gap = state_advantages([{"action_ids": [1], "value": 0.5}, {"action_ids": [2], "value": 0.55}], 0.1)
    assert kept == [] and gap == pytest.approx(0.05)


def test_held_out_split_is_stable_and_roughly_sized():
    ids = [f"p{i}" for i in range(2000)]
    share = sum(held_out(i, 0.1) for i in ids) / len(ids)
    assert 0.07 < share < 0.13 and held_out("p1", 0.1) == held_out("p1", 0.1)


def test_critic_report_correlation_and_constant_baseline():
    report = critic_report([0.1, 0.2, 0.8, 0.9], [0.0, 0.25, 0.75, 1.0])
    assert report["corr"] > 0.95 and report["bce"] < report["bce_constant"]
    assert sum(b["states"] for b in report["calibration"]) == 4


def test_terminal_actions_take_the_reward_and_others_the_critic():
    from stepwise.pipeline.stages.dapo_train import assign_values

    actions = [{"ends": False}, {"ends": True, "step": "A: 3"}, {"ends": False}]
    assign_values(actions, iter([0.4, 0.7]), lambda a: 1.0 if a["step"] == "A: 3" else 0.0)
    assert [a["value"] for a in actions] == [0.4, 1.0, 0.7]


def test_mc_values_are_the_mean_outcome_of_the_completions_sharing_the_first_step():
    from stepwise.pipeline.stages.dapo_train import mc_values

    actions = [{"action_ids": [1, 2], "correct": True}, {"action_ids": [1, 2], "correct": False},
               {"action_ids": [3], "correct": False}, {"action_ids": [1, 2], "correct": True},
               {"action_ids": [1], "correct": True}]  # [1] is another action than [1, 2]
    mc_values(actions)
    assert [a["value"] for a in actions] == pytest.approx([2 / 3, 2 / 3, 0.0, 2 / 3, 1.0])
    kept, gap = state_advantages(actions, 0.1)
    baseline = (2 / 3 * 3 + 0 + 1) / 5
    advantages = {tuple(a["action_ids"]): a["advantage"] for a in kept}
    assert gap == 1.0 and len(kept) == 3
    assert advantages == pytest.approx({(1, 2): 2 / 3 - baseline, (3,): -baseline, (1,): 1 - baseline})
