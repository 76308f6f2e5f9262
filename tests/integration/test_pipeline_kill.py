"""Stage idempotence (issue 7, item 7): the smoke pipeline killed with SIGKILL at a random point of a
random stage, again and again, then run to the end, ends with the same final outputs, byte for byte, as an
uninterrupted run.

One run directory is killed in three different stages in turn (one seeded draw, in pipeline order), each
after a random delay inside the stage: every restart resumes what the previous kill left. Each kill takes
the whole process group (the pipeline and torchrun; the workers, in sessions of their own, follow through
their parent-death signal, and the test checks that none survives), as a node failure would. A killed
stage has no manifest, so the next run redoes it, resuming from what it left (sampling shards, training
checkpoints) and skipping finished stages."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_pipeline import REPO, stepwise

RECIPE = "recipes/tiny/smoke.yaml"
KILLABLE = ("sft", "sample", "complete", "critic", "advantage", "policy", "dapo_eval")
STAGES = sorted(random.Random(2026).sample(KILLABLE, 3), key=KILLABLE.index)  # sft, complete, advantage
OUTPUTS = ("data/sft.jsonl", "grade/graded.jsonl", "select/selected.jsonl", "segment/states.jsonl",
           "complete/mc.jsonl", "advantage/actions.jsonl", "export/policy/model.safetensors",
           "dapo_eval/iteration_1/model.safetensors", "dapo_eval/iteration_1.graded.jsonl")


def fingerprint(run_dir: Path) -> dict[str, str]:
    """sha256 of each final output, and the report's accuracies and RS summary (the smoke run's RS
    ablation has too few correct samples to train: it reports that)."""
    out = {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest() for name in OUTPUTS}
    stages = json.loads((run_dir / "report.json").read_text())["stages"]
    out["accuracies"] = json.dumps([stages["eval"]["base"], stages["dapo_eval"]["iteration_1"], stages["rs"]],
                                   sort_keys=True)
    return out


def kill_during(run_dir: Path, stage: str, delay: float) -> str:
    """Start the pipeline, SIGKILL its process group `delay` s after `stage` starts; returns the log."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    log = run_dir.with_suffix(".log")
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "stepwise.cli", "run", RECIPE, f"run.dir={run_dir}"],
                                cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while f"[stepwise] {stage}: running" not in log.read_text():
                assert proc.poll() is None, f"ended before stage {stage}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"stage {stage} never started"
                time.sleep(0.05)
            time.sleep(delay)
            assert proc.poll() is None, f"finished before the kill:\n{log.read_text()[-3000:]}"
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return log.read_text()


def survivors(run_dir: Path, wait: float = 30.0) -> list[str]:
    """Command lines of processes still working on `run_dir` after `wait` seconds (torchrun's workers
    live in sessions of their own: only their parent-death signal takes them down with the pipeline)."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(run_dir) in text:
                found.append(text)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict[str, str], dict[str, float]]:
    """The uninterrupted run's fingerprint and each stage's duration (from its manifest)."""
    run_dir = tmp_path_factory.mktemp("straight") / "smoke"
    stepwise("run", RECIPE, f"run.dir={run_dir}")
    seconds = {stage: json.loads((run_dir / stage / "manifest.json").read_text())["seconds"] for stage in KILLABLE}
    return fingerprint(run_dir), seconds


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the uninterrupted run (its fixture), three killed runs and a last one
def test_killed_in_three_stages_in_turn_and_rerun_gives_the_same_outputs(uninterrupted, tmp_path):
    expected, seconds = uninterrupted
    run_dir = tmp_path / "smoke"
    for case, stage in enumerate(STAGES):
        delay = random.Random(case).uniform(0.0, 0.3) * seconds[stage]  # inside the stage (it took `seconds` last time)
        log = kill_during(run_dir, stage, delay)
        progress = [line for line in log.splitlines() if line.startswith("[stepwise] ")]
        assert progress[-1] == f"[stepwise] {stage}: running", f"not killed inside {stage}: {progress[-3:]}"
        if case > 0:  # a restart: finished stages skipped, the stage killed last time done again
            assert "[stepwise] data: up to date, skipped" in log, log[-2000:]
            assert f"[stepwise] {STAGES[case - 1]}: running" in log, log[-2000:]
        leftover = survivors(run_dir)
        assert not leftover, f"workers outlived the pipeline killed in {stage}: {leftover}"
    rerun = stepwise("run", RECIPE, f"run.dir={run_dir}")
    assert f"[stepwise] {STAGES[-2]}: up to date, skipped" in rerun.stdout, rerun.stdout[-2000:]
    assert fingerprint(run_dir) == expected, f"killed in {STAGES}:\n{rerun.stdout[-2000:]}"
