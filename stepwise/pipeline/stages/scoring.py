"""Forward-only scoring of a records file by launched workers (`stepwise.train.score`), for the
stages that score with a trained model: the critic's report, the advantage stage's next-state values
and reference log-probs, DQO's reference log-probs. The driver only names files; the steps that
write the records and read the scores back run in `stepwise.pipeline.step`."""
from __future__ import annotations

import shutil
from pathlib import Path

from stepwise.pipeline.context import StageContext
from stepwise.pipeline.launch import launch
from stepwise.pipeline.stages.model import section_tokenizer


def score_files(ctx: StageContext, checkpoint: str | Path, kind: str, files: list[Path]) -> None:
    """Score the records of each of `files` (JSONL) with `checkpoint`, loaded once in one launch, at the
    layout, tokenizer and scoring micro-batch of the model's train section (critic or policy); each
    file's scores go to its `scores_dir`."""
    outs = [scores_dir(data) for data in files]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)
    section = "critic" if kind == "critic" else "policy"
    train = getattr(ctx.config, section)
    launch(ctx.config.layout_for(section), "stepwise.train.score",
           ["--recipe", str(ctx.resolved_recipe), "--ckpt", str(checkpoint), "--kind", kind,
            "--data", *map(str, files), "--out", *map(str, outs), "--tokenizer", section_tokenizer(ctx, section),
            "--section", section, "--micro-batch-size", str(train.score_micro_batch_size or train.micro_batch_size)],
           ctx.run_dir)


def scores_dir(data: Path) -> Path:
    """Where `score_files` writes the scores of the records in `data` (DATA_scores/)."""
    return data.with_name(data.stem + "_scores")


def scores_of(data: Path):
    """(In a step.) The scores `score_files` wrote for `data`, streamed in record order; none when the
    records were not scored."""
    from stepwise.train.score import iter_scores

    return iter_scores(scores_dir(data)) if scores_dir(data).is_dir() else iter(())
