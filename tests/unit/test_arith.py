"""The embedded arithmetic task: determinism, disjoint splits, traps, solving and grading."""
from __future__ import annotations

import pytest

from stepwise.tasks.arith import (ArithConfig, corpus, extract_answer, grade_arith, make_problems,
                                  make_sft_records, solve)


def test_solve_is_left_to_right_mod_10():
    steps, answer = solve("Q: 3+4*2-5\n")
    assert steps == ["3+4=7", "7*2=4", "4-5=9"] and answer == "9"


def test_generation_is_deterministic_and_splits_are_disjoint():
    config = ArithConfig(seed=3)
    train = make_problems(config, 500, "train")
    assert train == make_problems(ArithConfig(seed=3), 500, "train")
    assert train != make_problems(ArithConfig(seed=4), 500, "train")
    test = make_problems(config, 200, "test")
    assert not {p["problem"] for p in train} & {p["problem"] for p in test}
    assert len({p["problem"] for p in train}) == 500
    for record in train[:50]:
        assert grade_arith(record["solution"], record["answer"])


def test_difficulty_knob_sets_the_number_of_steps():
    record = make_problems(ArithConfig(n_steps=5), 1, "train")[0]
    assert len(record["solution"].split("\n")) == 6


def test_traps_are_written_wrong_at_about_the_configured_rate():
    config = ArithConfig(corrupt_fraction=0.3, corrupt_rate=0.6, seed=1)
    assert len(config.traps) == 90
    problems = make_problems(config, 3000, "train")
    seen = wrong = 0
    for record in make_sft_records(config, problems):
        for line in record["response"].split("\n")[:-1]:
            a, op, b, written = int(line[0]), line[1], int(line[2]), int(line[4])
            right = int(solve(f"Q: {a}{op}{b}\n")[1])
            if (a, op, b) in config.traps:
                seen += 1
                wrong += written == config.traps[(a, op, b)]
                assert written in (right, config.traps[(a, op, b)])
            else:
                assert written == right
    assert 0.5 < wrong / seen < 0.7


def test_sft_responses_are_self_consistent_chains():
    config = ArithConfig(seed=2)
    for record in make_sft_records(config, make_problems(config, 200, "train")):
        lines = record["response"].split("\n")
        for previous, line in zip(lines, lines[1:-1]):
            assert line[0] == previous[-1]
        assert extract_answer(record["response"]) == lines[-2][-1]


def test_grader_is_exact():
    assert grade_arith("1+1=2\nA: 2", "2")
    assert not grade_arith("1+1=2\nA: 3", "2")
    assert not grade_arith("1+1=2", "2")
    assert extract_answer("A: 1\nA: 7") == "7"


@pytest.mark.parametrize("bad", [dict(n_steps=0), dict(operators="/"), dict(corrupt_rate=1.5)])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError, match="ArithConfig"):
        ArithConfig(**bad)


def test_split_is_a_property_of_the_problem_text_so_no_seed_or_size_leaks_test_into_train():
    test = {p["problem"] for seed in (0, 1) for p in make_problems(ArithConfig(seed=seed), 300, "test")}
    train = {p["problem"] for seed in (0, 1, 2) for p in make_problems(ArithConfig(seed=seed), 1000, "train")}
    assert len(test) > 300 and not test & train
    record = make_problems(ArithConfig(), 1, "test")[0]
    assert record["id"] == "arith-test-0" and set(record) == {"id", "problem", "answer", "solution"}


def test_references_are_always_correct_while_sft_shows_both_results_of_traps():
    config = ArithConfig(seed=7)
    problems = make_problems(config, 2000, "train")
    written: dict[tuple, set[int]] = {}
    for problem, record in zip(problems, make_sft_records(config, problems)):
        assert record["prompt"] == problem["problem"] and record["id"] == problem["id"]
        assert problem["solution"] == "\n".join(solve(problem["problem"])[0] + [f"A: {problem['answer']}"])
        for line in record["response"].split("\n")[:-1]:
            written.setdefault((int(line[0]), line[1], int(line[2])), set()).add(int(line[4]))
    for entry, wrong in config.traps.items():  # the right result is still sampled sometimes
        if entry in written:
            assert written[entry] == {wrong, int(solve(f"Q: {entry[0]}{entry[1]}{entry[2]}\n")[1])}
    assert make_sft_records(config, problems[:50]) == make_sft_records(ArithConfig(seed=7), problems[:50])


def test_corpus_covers_every_character_the_task_produces():
    config = ArithConfig(operators="+*", seed=1)
    problems = make_problems(config, 100, "train")
    produced = {c for p in problems for c in p["problem"] + p["solution"]}
    produced |= {c for r in make_sft_records(config, problems) for c in r["prompt"] + r["response"]}
    assert produced <= set("".join(corpus(config)))
    assert "-" not in "".join(corpus(config))


@pytest.mark.parametrize("bad", ["Q: 3+", "Q: 3/4", "Q: 12+3", "3+4", "Q: 3+4\nA: 7", None])
def test_malformed_problems_are_rejected_with_the_text(bad):
    with pytest.raises(ValueError, match="not an arith problem"):
        solve(bad)


def test_bad_generation_arguments_are_named():
    with pytest.raises(ValueError, match="split must be one of"):
        make_problems(ArithConfig(), 3, "valid")
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        make_problems(ArithConfig(), -1, "train")
    with pytest.raises(ValueError, match="n_steps=1 allows about 30"):
        make_problems(ArithConfig(n_steps=1), 31, "train")
    with pytest.raises(ValueError, match=r"problems\[1\] needs a string 'problem'"):
        make_sft_records(ArithConfig(), [{"id": "a", "problem": "Q: 1+2\n"}, {"id": "b"}])
    with pytest.raises(ValueError, match=r"problems\[0\] \(id 'a'\): not an arith problem"):
        make_sft_records(ArithConfig(), [{"id": "a", "problem": "Q: 1/2\n"}])
    assert not grade_arith(None, "3") and extract_answer(None) is None


def test_the_validation_split_is_drawn_after_the_test_problems_and_leaves_them_unchanged():
    """The data stage's validation problems are the held-out ones drawn after the first n_test: adding
    them changes no test problem, and no validation problem is a test or training problem."""
    from stepwise.tasks.arith import ArithConfig, make_problems

    config = ArithConfig(seed=5)
    test, longer = make_problems(config, 50, "test"), make_problems(config, 80, "test")
    assert longer[:50] == test
    validation, train = {r["problem"] for r in longer[50:]}, {r["problem"] for r in make_problems(config, 400, "train")}
    assert len(validation) == 30 and not validation & {r["problem"] for r in test} and not validation & train
