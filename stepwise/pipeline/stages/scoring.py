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


def score_file(ctx: StageContext, checkpoint: str | Path, kind: str, data: Path) -> Path:
    """Score the records of `data` (JSONL) with `checkpoint` at the layout, tokenizer and scoring micro-batch
    of the model's train section (critic or policy); returns the directory of the scores (DATA_scores/)."""
    out = scores_dir(data)
    shutil.rmtree(out, ignore_errors=True)
    section = "critic" if kind == "critic" else "policy"
    train = getattr(ctx.config, section)
    launch(ctx.config.layout_for(section), "stepwise.train.score",
           ["--recipe", str(ctx.resolved_recipe), "--ckpt", str(checkpoint), "--kind", kind, "--data", str(data),
            "--tokenizer", section_tokenizer(ctx, section), "--out", str(out), "--section", section,
            "--micro-batch-size", str(train.score_micro_batch_size or train.micro_batch_size)], ctx.run_dir)
    return out


def scores_dir(data: Path) -> Path:
    """Where `score_file` writes the scores of the records in `data` (DATA_scores/)."""
    return data.with_name(data.stem + "_scores")


def scores_of(data: Path):
    """(In a step.) The scores `score_file` wrote for `data`, streamed in record order; none when the
    records were not scored."""
    from stepwise.train.score import iter_scores

    return iter_scores(scores_dir(data)) if scores_dir(data).is_dir() else iter(())
