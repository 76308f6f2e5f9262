"""Drive `stepwise eval`: benchmarks -> prompts -> greedy samples on data-parallel sampler replicas ->
graded samples -> scores and tables, all under one output directory:

    OUT/recipe.resolved.yaml              the settings the launched step reads (sampling.*, parallel.*)
    OUT/benchmarks/NAME.jsonl             the loaded records (id, benchmark, task, problem, answer)
    OUT/MODEL/NAME/shards/                resumable sample shards (stepwise.sampling.shards)
    OUT/MODEL/NAME/graded/                the shards graded (+ "correct"), one file per shard
    OUT/MODEL/NAME/samples.jsonl          per sample: id, prompt, response, answer, extracted, correct, ...
    OUT/MODEL/results.json, results.md    that model's scores and table
    OUT/results.json, comparison.md       every model's scores; the table with one row per model

The heavy part runs as one launched step (stepwise.pipeline.step) on `replicas` workers, reusing the
pipeline's replicas and graders: each worker samples and grades the shards with index % world_size ==
rank; rank 0 then writes the per-sample files and scores. Every file is written atomically, and
finished shards are kept, so running the same command again continues where a killed run stopped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from stepwise.config.schema import BenchmarkEvalConfig, ParallelConfig, RecipeConfig
from stepwise.data.jsonl import atomic_write_json, atomic_write_text, read_jsonl, write_jsonl
from stepwise.evaluate.stats import Score
from stepwise.evaluate.tables import results_table
from stepwise.pipeline.context import RESOLVED_RECIPE, StageContext

BENCHMARKS_DIR = "benchmarks"
SAMPLE_OUTPUT_FIELDS = ("id", "prompt", "response", "answer", "extracted", "correct", "finish_reason", "num_tokens")


@dataclass(frozen=True)
class BenchmarkFile:
    """One `--benchmark NAME=PATH`, with its field overrides (role -> the file's key)."""

    name: str
    path: Path
    fields: dict[str, str] = field(default_factory=dict)


def model_labels(model_dirs: Sequence[str | Path]) -> list[str]:
    """A distinct label per model directory: its name, then `name-2`, `name-3` for repeated names."""
    labels: list[str] = []
    for model_dir in model_dirs:
        base = Path(model_dir).resolve().name or "model"
        label, count = base, 1
        while label in labels:
            count += 1
            label = f"{base}-{count}"
        labels.append(label)
    return labels


def extracted_answer(task: str, response: str) -> str | None:
    """What the grader of `task` reads from `response`: the last \\boxed{}, the number after ####, the program."""
    from stepwise.tasks.answers import gsm8k_answer, last_boxed
    from stepwise.tasks.arith import extract_answer
    from stepwise.tasks.code import extract_program

    return {"math": last_boxed, "gsm8k": gsm8k_answer, "code": extract_program, "arith": extract_answer}[task](response)


def eval_context(out: Path, settings: BenchmarkEvalConfig) -> StageContext:
    """The context the launched step rebuilds from OUT/recipe.resolved.yaml: the sampler and the layout."""
    from stepwise.config.loader import to_yaml

    config = RecipeConfig()
    config.sampling = replace(config.sampling, backend=settings.backend, batch_size=settings.batch_size,
                              shard_size=settings.shard_size, tensor_parallel_size=settings.tensor_parallel_size)
    group = settings.tensor_parallel_size if settings.backend == "vllm" else 1
    config.parallel = ParallelConfig(nproc_per_node=settings.replicas * group, launcher=settings.launcher)
    atomic_write_text(out / RESOLVED_RECIPE, to_yaml(config))
    return StageContext(config=config, run_dir=out)


def evaluate_models(model_dirs: Sequence[str | Path], benchmarks: Sequence[BenchmarkFile], out: str | Path,
                    settings: BenchmarkEvalConfig, limit: int | None = None) -> dict[str, dict[str, Score]]:
    """Score every model on every benchmark (the first `limit` problems of each when given); writes the
    files listed in the module docstring and returns model label -> benchmark -> Score."""
    from stepwise.data.benchmarks import load_benchmark
    from stepwise.pipeline.step import in_step, replicas

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [benchmark.name for benchmark in benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"a benchmark is given twice: {names}")
    missing = [str(path) for path in model_dirs if not (Path(path) / "config.json").is_file()]
    if missing:
        raise ValueError(f"not an exported HF model directory (no config.json): {', '.join(missing)}")
    for benchmark in benchmarks:
        records = load_benchmark(benchmark.name, benchmark.path, benchmark.fields, limit)
        write_jsonl(out / BENCHMARKS_DIR / f"{benchmark.name}.jsonl", records)
    ctx = eval_context(out, settings)
    models = {label: str(Path(path).resolve()) for label, path in zip(model_labels(model_dirs), model_dirs)}
    tasks = {benchmark.name: load_task(out, benchmark.name) for benchmark in benchmarks}
    in_step(ctx, sample_and_grade, replicas(ctx), models=models, tasks=tasks, max_tokens=settings.max_tokens)
    return write_reports(out, list(models), names)


def load_task(out: Path, name: str) -> str:
    with (out / BENCHMARKS_DIR / f"{name}.jsonl").open(encoding="utf-8") as handle:
        return json.loads(handle.readline())["task"]


def sample_and_grade(ctx: StageContext, models: dict[str, str], tasks: dict[str, str], max_tokens: int) -> dict | None:
    """(In the launched step, on every replica.) Sample this worker's shards of every benchmark for every
    model, greedily, then grade them; rank 0 writes the per-sample files and the scores."""
    from stepwise.pipeline.stages.sampling import grade_shard, grading_pool, make_replica
    from stepwise.sampling import SamplingParams, sample_to_shards
    from stepwise.sampling.hf import load_tokenizer
    from stepwise.tasks.prompts import render_prompt

    config, out = ctx.config.sampling, ctx.run_dir
    params = SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, seed=0)
    for label, model_dir in models.items():
        tokenizer, sampler = load_tokenizer(model_dir), make_replica(ctx, model_dir, config.batch_size)
        for name, task in tasks.items():
            records = [{**record, "prompt": render_prompt(record["problem"], task, tokenizer)}
                       for record in read_jsonl(out / BENCHMARKS_DIR / f"{name}.jsonl")]
            sample_to_shards(sampler, records, "prompt", params, out / label / name / "shards",
                             shard_size=config.shard_size, desc=f"{label} {name}", rank=ctx.rank,
                             world_size=ctx.world_size)
        sampler.close()
    with grading_pool(ctx) as pool:
        for label in models:
            for name, task in tasks.items():
                shards = sorted((out / label / name / "shards").glob("shard_*.jsonl"))
                for source in shards[ctx.rank::ctx.world_size]:
                    graded = out / label / name / "graded" / source.name
                    if not graded.exists():  # a rerun grades only what is missing
                        graded.parent.mkdir(parents=True, exist_ok=True)
                        grade_shard(task, source, graded, pool)
    ctx.barrier()
    if ctx.rank == 0:
        for label in models:
            for name, task in tasks.items():
                write_samples(out / label / name, task)
    return None


def write_samples(directory: Path, task: str) -> Score:
    """`samples.jsonl` (the graded shards, lean, with the extracted answer) and `score.json` of one
    model on one benchmark."""
    graded = [record for path in sorted((directory / "graded").glob("shard_*.jsonl")) for record in read_jsonl(path)]
    rows = ({**record, "extracted": extracted_answer(task, record["response"])} for record in graded)
    write_jsonl(directory / "samples.jsonl", ({key: row[key] for key in SAMPLE_OUTPUT_FIELDS} for row in rows))
    score = Score.of(sum(record["correct"] for record in graded), len(graded))
    atomic_write_json(directory / "score.json", score.to_dict())
    return score


def write_reports(out: Path, labels: list[str], names: list[str]) -> dict[str, dict[str, Score]]:
    """Each model's results.json / results.md, and OUT/results.json and OUT/comparison.md for all of them."""
    rows = {label: {name: Score(**json.loads((out / label / name / "score.json").read_text())) for name in names}
            for label in labels}
    for label, scores in rows.items():
        atomic_write_json(out / label / "results.json", {name: score.to_dict() for name, score in scores.items()})
        atomic_write_text(out / label / "results.md", results_table({label: scores}, names))
    atomic_write_json(out / "results.json", {label: {name: score.to_dict() for name, score in scores.items()}
                                             for label, scores in rows.items()})
    atomic_write_text(out / "comparison.md", results_table(rows, names))
    return rows
