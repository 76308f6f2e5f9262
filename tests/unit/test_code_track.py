"""The code track of Skywork DAPO: TACO-style problems into pipeline records, task.name=code in recipes,
and the pipeline's grading (the `grade` step's shards, a state's completions) running the programs."""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import pytest

from stepwise.config import ConfigError, load_recipe
from stepwise.data.jsonl import DataError, read_jsonl, write_jsonl
from stepwise.pipeline.stages.data import read_task_problems
from stepwise.pipeline.stages.sampling import grade_shard, solution_text
from stepwise.tasks.code import parse_test_spec
from stepwise.tasks.prompts import render_prompt

REPO = Path(__file__).resolve().parents[2]
CODE = REPO / "tests/fixtures/data/code"
SUM_PAIR = "a, b = map(int, input().split())\nprint(a + b)\n"


def code_task(**overrides) -> SimpleNamespace:
    return SimpleNamespace(**{"name": "code", "format": None, **overrides})


def test_taco_problems_become_pipeline_records_with_their_tests_as_answer():
    records = read_task_problems(code_task(), str(CODE / "taco_train.jsonl"), None)
    assert [r["id"] for r in records] == ["fixture-reverse", "fixture-sum-pair", "fixture-count-vowels"]
    assert all(set(r) == {"id", "problem", "answer"} and isinstance(r["answer"], str) for r in records)
    spec = parse_test_spec(records[1]["answer"])
    assert spec["io"] == [{"input": "1 2\n", "output": "3\n"}, {"input": "-5 5\n", "output": "0\n"},
                          {"input": "100 23\n", "output": "123\n"}]
    assert records[1]["problem"].startswith("Read two integers on one line and print their sum.")
    prompt = render_prompt(records[1]["problem"], "code")
    assert prompt.endswith("give your complete solution in one ```python code block.\n")


def test_code_problems_in_another_layout_and_an_id_subset(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("fixture-count-vowels\nfixture-reverse\n")
    records = read_task_problems(code_task(), str(CODE / "taco_train.jsonl"), str(ids))
    assert [r["id"] for r in records] == ["fixture-count-vowels", "fixture-reverse"]
    lcb = read_task_problems(code_task(format="livecodebench"), str(CODE / "livecodebench_sample.jsonl"), None)
    assert [r["id"] for r in lcb] == ["fixture_spread"]
    assert parse_test_spec(lcb[0]["answer"])["io"][0] == {"input": "3\n1 5 2\n", "output": "4\n"}
    with pytest.raises(ValueError, match="layout 'math' is not one of"):
        read_task_problems(code_task(format="math"), str(CODE / "taco_train.jsonl"), None)


def test_call_based_taco_problem_is_an_error_naming_file_and_line(tmp_path):
    row = json.loads((CODE / "taco_train.jsonl").read_text().splitlines()[0])
    row["input_output"] = json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [1]})
    path = tmp_path / "taco.jsonl"
    write_jsonl(path, [row])
    with pytest.raises(DataError, match=rf"{path}:1: .*fn_name"):
        read_task_problems(code_task(), str(path), None)


def recipe_overrides(tmp_path: Path, *extra: str) -> list[str]:
    configs = REPO / "tests/fixtures/configs"
    return [f"model.path={configs / 'Llama-3.1-8B-Instruct.json'}",
            f"skywork_dapo.critic_init={configs / 'Qwen2.5-Coder-7B-Instruct.json'}", f"run.dir={tmp_path}", *extra]


def test_code_recipe_loads_with_the_coder_critic(tmp_path):
    recipe = REPO / "recipes/skywork_dapo/llama-3.1-8b-instruct_code_1n8g_tp4.yaml"
    config = load_recipe(recipe, recipe_overrides(tmp_path))
    assert (config.task.name, config.task.format, config.sampling.n_problems) == ("code", "taco", 4000)
    assert config.skywork_dapo.critic_init.endswith("Qwen2.5-Coder-7B-Instruct.json")
    assert (config.critic.optim.lr, config.critic.global_batch_size) == (5e-6, 512)
    assert (config.policy.optim.lr, config.policy.global_batch_size, config.policy.loss_args) == (5e-7, 2048, {"beta": 0.01})
    assert "grade" in config.run.stages and "complete" in config.run.stages
    with pytest.raises(ConfigError, match=r"task.format \(task.name=code\)='gsm8k' is not one of"):
        load_recipe(recipe, recipe_overrides(tmp_path, "task.format=gsm8k"))
    with pytest.raises(ConfigError, match="task.format='taco' is not one of"):
        load_recipe(recipe, recipe_overrides(tmp_path, "task.name=math"))


@pytest.fixture(scope="module")
def fork_pool():
    with multiprocessing.get_context("fork").Pool(2) as pool:
        yield pool


def test_grade_shard_runs_correct_and_wrong_programs(tmp_path, fork_pool):
    answer = read_task_problems(code_task(), str(CODE / "taco_train.jsonl"), None)[1]["answer"]
    samples = [{"id": "fixture-sum-pair", "answer": answer, "response": f"Add them.\n```python\n{SUM_PAIR}```"},
               {"id": "fixture-sum-pair", "answer": answer,
                "response": "```python\na, b = map(int, input().split())\nprint(a - b)\n```"},
               {"id": "fixture-sum-pair", "answer": answer, "response": "I cannot solve this."}]
    samples = [{**sample, "num_tokens": 10 + k} for k, sample in enumerate(samples)]  # as the sampler writes them
    write_jsonl(tmp_path / "shard_00000.jsonl", samples)
    grade_shard("code", tmp_path / "shard_00000.jsonl", tmp_path / "graded.jsonl", fork_pool)
    assert [r["correct"] for r in read_jsonl(tmp_path / "graded.jsonl")] == [True, False, False]
    counts = json.loads((tmp_path / "graded.jsonl.counts.json").read_text())
    assert counts == {"samples": 3, "correct": 1, "problems": 1, "solved": 1, "all_wrong": 0, "tokens": 33}


def test_a_completion_is_graded_on_the_solution_before_its_state_and_the_completion(tmp_path, fork_pool):
    """A state cut inside the program: the completion alone is half a program; prefix + completion passes."""
    answer = read_task_problems(code_task(), str(CODE / "taco_train.jsonl"), None)[1]["answer"]
    prefix = "Read both numbers, then print the sum.\n```python\na, b = map(int, input().split())\n"
    completions = [{"id": "fixture-sum-pair", "state_id": "s1", "answer": answer, "prefix": prefix,
                    "response": "print(a + b)\n```", "num_tokens": 12},
                   {"id": "fixture-sum-pair", "state_id": "s1", "answer": answer, "prefix": prefix,
                    "response": "print(a * b)\n```", "num_tokens": 12}]
    assert solution_text(completions[0]) == prefix + "print(a + b)\n```"
    write_jsonl(tmp_path / "shard_00000.jsonl", completions + [{**completions[0], "prefix": ""}])
    grade_shard("code", tmp_path / "shard_00000.jsonl", tmp_path / "graded.jsonl", fork_pool)
    assert [r["correct"] for r in read_jsonl(tmp_path / "graded.jsonl")] == [True, False, False]


def test_arith_grading_of_a_completion_keeps_its_verdict_with_the_prefix(tmp_path, fork_pool):
    """The embedded task's completions: a prefix of steps holds no `A:` line, so prefix + completion grades
    as the completion did alone."""
    rows = [{"id": "p", "answer": "14", "prefix": "3+4=7\n", "response": "7*2=14\nA: 14"},
            {"id": "p", "answer": "14", "prefix": "3+4=7\n", "response": "7*2=15\nA: 15"},
            {"id": "p", "answer": "14", "prefix": "3+4=7\n7*2=14\n", "response": "no answer"}]
    write_jsonl(tmp_path / "shard_00000.jsonl", [{**row, "num_tokens": len(row["response"])} for row in rows])
    grade_shard("arith", tmp_path / "shard_00000.jsonl", tmp_path / "graded.jsonl", fork_pool)
    assert [r["correct"] for r in read_jsonl(tmp_path / "graded.jsonl")] == [True, False, False]


def test_states_retokenized_for_a_critic_of_another_tokenizer_keep_their_text_and_boundaries():
    """Policy: one id per character; critic: one id per whitespace-separated chunk (its own vocabulary)."""
    import re

    from stepwise.tasks.steps import retokenize_pieces

    def decode(ids):
        return "".join(map(chr, ids))

    vocab: dict[str, int] = {}

    def encode(text):
        return [vocab.setdefault(chunk, len(vocab)) for chunk in re.findall(r"\S+|\s+", text)]

    def critic_text(ids):
        words = {i: w for w, i in vocab.items()}
        return "".join(words[i] for i in ids)

    prompt, steps = "Sum 1 2\n", ["a = 1\n", "b = 2\n", "print(a + b)"]
    ids = [ord(c) for c in prompt + "".join(steps)]
    ends = [len(prompt), len(prompt) + len(steps[0]), len(prompt) + len(steps[0]) + len(steps[1])]
    new_ids, new_ends = retokenize_pieces(ids, ends, decode, encode)
    assert critic_text(new_ids) == prompt + "".join(steps)
    assert [critic_text(new_ids[:end]) for end in new_ends] == [prompt, prompt + steps[0], prompt + steps[0] + steps[1]]
    assert new_ends == [6, 12, 18]  # "Sum", " ", "1", " ", "2", "\n"; then six chunks per step
    next_state = ids[:ends[2]]
    assert retokenize_pieces(next_state, [len(next_state)], decode, encode) == (new_ids[:new_ends[2]], [new_ends[2]])
