"""A round of the smoke pipeline with a byte-level BPE whose merges cross step boundaries (trained here
on the task's text without the regex split, so "7\\n" or "\\nA" can be one token): every state is a
prefix and every action a slice of the exact ids the policy sampled, they decode back to the sampled
text byte for byte, and the critic gives a state the same value whether it is scored as a state of its
solution or as the next state of the step before it."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stepwise.data.jsonl import read_jsonl, write_jsonl
from tests.integration.test_pipeline import REPO, stepwise
from tests.tolerance import output_bound, within

STAGES = "[data,tokenizer,init,sft,export,sample,grade,select,segment,complete,critic,advantage,policy]"


def train_bpe(texts: list[str], out: Path) -> Path:
    """A byte-level BPE (vocab 160) over `texts`, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=160, special_tokens=["<pad>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(out)
    return out


def decode(tokenizer, ids: list[int], skip_special_tokens: bool = False) -> str:
    """The text of `ids`; with skip_special_tokens, as the sampler writes a response's text."""
    return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


@pytest.mark.slow
def test_states_and_actions_are_slices_of_the_sampled_ids_with_a_bpe_tokenizer(tmp_path):
    from stepwise.config.loader import load_resolved
    from stepwise.pipeline.launch import launch
    from stepwise.tasks.tokenizer import load_tokenizer
    from stepwise.train.score import read_scores

    run_dir = tmp_path / "run"
    stepwise("run", "recipes/tiny/smoke.yaml", f"run.dir={run_dir}", "run.stages=[data]")
    texts = [r["prompt"] + r["response"] for r in read_jsonl(run_dir / "data" / "sft.jsonl")]
    bpe_dir = train_bpe(texts, tmp_path / "bpe")
    stepwise("run", "recipes/tiny/smoke.yaml", f"run.dir={run_dir}", f"run.stages={STAGES}", f"tokenizer.path={bpe_dir}",
             "sampling.n_problems=16", "skywork_dapo.completions=4", "critic.parallel.tp=1",
             "critic.parallel.nproc_per_node=1")
    tokenizer = load_tokenizer(bpe_dir)

    # Solutions: the prompt's ids then the sampled ids; the states are their prefixes at the step ends.
    selected = {(r["id"], r["sample_index"]): r for r in read_jsonl(run_dir / "select" / "selected.jsonl")}
    solutions = read_jsonl(run_dir / "segment" / "solutions.jsonl")
    states = {s["state_id"]: s for s in read_jsonl(run_dir / "segment" / "states.jsonl")}
    assert solutions and len(selected) == len(solutions)
    retokenized_differs = 0
    for solution, sample in zip(solutions, selected.values()):
        assert solution["response_ids"] == sample["token_ids"][: len(solution["response_ids"])]
        assert decode(tokenizer, solution["prompt_ids"] + solution["response_ids"], True) == sample["problem"] + sample["response"]
        starts = [0] + solution["step_ends"][:-1]
        for start, state_id in zip(starts, solution["state_ids"]):
            ids = solution["prompt_ids"] + solution["response_ids"][:start]
            assert states[state_id]["prompt_ids"] == ids and decode(tokenizer, ids) == states[state_id]["prompt"]
            retokenized_differs += tokenizer(states[state_id]["prompt"], add_special_tokens=False)["input_ids"] != ids
    assert retokenized_differs > 0, "no state whose re-tokenised text differs: the test would not catch re-tokenising"

    # Actions: the first step's slice of a completion that continued the state's own ids.
    completions = {}
    for record in read_jsonl(run_dir / "complete" / "completions.jsonl"):
        completions.setdefault(record["state_id"], []).append(record)
    actions = read_jsonl(run_dir / "advantage" / "actions.jsonl")
    assert actions, "no action survived the gap filter"
    for action in actions:
        assert action["prompt_ids"] == states[action["state_id"]]["prompt_ids"]
        sources = [c for c in completions[action["state_id"]] if c["token_ids"][: len(action["action_ids"])] == action["action_ids"]]
        assert sources, "an action that is no prefix of its state's sampled completions"
        text_ids = action["action_ids"][:-1] if action["action_ids"][-1] == tokenizer.eos_token_id else action["action_ids"]
        assert sources[0]["response"].startswith(decode(tokenizer, text_ids, True))
        assert decode(tokenizer, action["prompt_ids"] + text_ids) == states[action["state_id"]]["prompt"] + action["action"]

    # The critic: state t+1 of a solution scored inside the solution and alone, as the next state of step t.
    train = read_jsonl(run_dir / "critic" / "train.jsonl")
    alone = [{"ids": r["ids"][:end], "ends": [end], "mc": [0.0]} for r in train for end in r["ends"][1:]]
    check = tmp_path / "next_states.jsonl"
    write_jsonl(check, train + alone)
    recipe = run_dir / "recipe.resolved.yaml"
    launch(load_resolved(recipe.read_text()).layout_for("critic"), "stepwise.train.score",
           ["--recipe", str(recipe), "--ckpt", str(run_dir / "critic" / "checkpoints"), "--kind", "critic",
            "--data", str(check), "--tokenizer", str(bpe_dir), "--out", str(tmp_path / "scores"),
            "--section", "critic", "--micro-batch-size", "3"], tmp_path)
    values = [row["values"] for row in read_scores(tmp_path / "scores")]
    in_solution = [v for vs in values[: len(train)] for v in vs[1:]]
    as_next = [vs[0] for vs in values[len(train):]]
    assert len(in_solution) == len(as_next) > 0
    # V = sigmoid(logit): an fp32 logit off by the reorder bound of its magnitude moves V by at most 1/4 of it.
    largest_logit = max(abs(math.log(v / (1 - v))) for v in in_solution)
    hf_config = json.loads((run_dir / "export" / "policy" / "config.json").read_text())
    bound = output_bound(largest_logit, hf_config, max(len(r["ids"]) for r in train)) / 4
    within("critic value of a state in its solution vs as a next state",
           max(abs(a - b) for a, b in zip(in_solution, as_next)), bound)
