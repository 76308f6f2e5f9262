"""Stages `data` (problems + SFT records) and `tokenizer` (trained on the task corpus, or given)."""
from __future__ import annotations

from stepwise.data.jsonl import read_jsonl, write_jsonl
from stepwise.pipeline.context import StageContext
from stepwise.pipeline.registry import stage
from stepwise.pipeline.step import in_step

PROBLEM_FIELDS = {"id": str, "problem": str, "answer": str}


def arith_config(ctx: StageContext):
    from stepwise.tasks.arith import ArithConfig

    task = ctx.config.task.arith
    return ArithConfig(n_steps=task.n_steps, operators=task.operators, corrupt_fraction=task.corrupt_fraction,
                       corrupt_rate=task.corrupt_rate, seed=ctx.config.run.seed)


def read_task_problems(task, path: str, ids: str | None) -> list[dict]:
    """The problems of a real task from the user's file: MATH / GSM8K / generic records, or for
    task.name=code problems with unit tests in a code benchmark layout (task.format, default taco)."""
    from stepwise.data.datasets import load_code_problems, load_problems

    if task.name == "code":
        return load_code_problems(path, task.format, id_list=ids)
    return load_problems(path, task.format or task.name, id_list=ids)


def _real_task(ctx: StageContext) -> dict:
    """Problems from the user's files (see read_task_problems), prompts rendered with the chat template."""
    from stepwise.tasks.prompts import render_prompt
    from stepwise.tasks.tokenizer import load_tokenizer

    task = ctx.config.task
    tokenizer = load_tokenizer(tokenizer_dir(ctx))
    out = ctx.dir("data")
    counts = {}
    splits = [("train", task.train_path, task.n_train, None), ("test", task.test_path, task.n_test, task.test_ids)]
    if task.validation_path:
        splits.append(("validation", task.validation_path, task.n_validation, None))
    for split, path, limit, ids in splits:
        records = read_task_problems(task, path, ids)[: limit or None]
        for record in records:
            record["question"] = record["problem"]
            record["problem"] = render_prompt(record["question"], task.name, tokenizer, task.prompt_template)
        counts[split] = write_jsonl(out / f"{split}.jsonl", records)
    return counts


@stage("data", config_keys=("task", "run.seed"))
def build_data(ctx: StageContext) -> dict:
    return in_step(ctx, write_problems)


def write_problems(ctx: StageContext) -> dict:
    """(In a launched step.) The task's train / test problems (and SFT records for the embedded task)."""
    task = ctx.config.task
    if task.name != "arith":
        return _real_task(ctx)
    from stepwise.tasks.arith import make_problems, make_sft_records

    config = arith_config(ctx)
    train = make_problems(config, task.n_train, "train")
    # validation: the held-out problems drawn after the test ones (the test list does not change with it)
    try:
        held_out = make_problems(config, task.n_test + task.n_validation, "test")
    except ValueError as error:
        raise ValueError(f"task.n_test={task.n_test} + task.n_validation={task.n_validation}: {error}") from None
    test = held_out[: task.n_test]
    validation = [{**r, "id": f"arith-validation-{k}"} for k, r in enumerate(held_out[task.n_test:])]
    out = ctx.dir("data")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    write_jsonl(out / "validation.jsonl", validation)
    write_jsonl(out / "sft.jsonl", make_sft_records(config, train))
    return {"train": len(train), "test": len(test), "validation": len(validation), "sft": len(train)}


def problems(ctx: StageContext, split: str) -> list[dict]:
    path = ctx.path("data") / f"{split}.jsonl"
    if split == "validation" and not path.exists():
        raise FileNotFoundError(f"{path}: no validation split; eval.split=validation needs task.n_validation "
                                f"(embedded task) or task.validation_path")
    return read_jsonl(path, PROBLEM_FIELDS)


def tokenizer_dir(ctx: StageContext) -> str:
    """The configured tokenizer, else the starting model's, else the one trained on the task corpus."""
    return ctx.config.tokenizer.path or ctx.config.model.path or str(ctx.path("tokenizer"))


@stage("tokenizer", depends=("data",), config_keys=("tokenizer", "task", "model.path"))
def build_tokenizer(ctx: StageContext) -> dict:
    return in_step(ctx, prepare_tokenizer)


def prepare_tokenizer(ctx: StageContext) -> dict:
    """(In a launched step.) The tokenizer the recipe names, else one trained on the task's corpus."""
    from stepwise.tasks.tokenizer import load_tokenizer, train_task_tokenizer

    if ctx.config.tokenizer.path or ctx.config.model.path:
        path = tokenizer_dir(ctx)
        return {"path": path, "vocab_size": len(load_tokenizer(path))}
    from stepwise.tasks.arith import corpus

    texts = corpus(arith_config(ctx)) + [r["prompt"] + r["response"] for r in read_jsonl(ctx.path("data") / "sft.jsonl")]
    path = train_task_tokenizer(texts, ctx.dir("tokenizer"), vocab_size=ctx.config.tokenizer.vocab_size)
    return {"path": str(path), "vocab_size": len(load_tokenizer(path))}
