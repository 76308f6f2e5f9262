"""benchmarks/gpu_check.py --dry-run: the GPU check's code end to end on CPU, one JSON line out."""
from __future__ import annotations

import json
import math

from tests.conftest import REPO, run_python

SKIPPED = "skipped: no CUDA"
RUN_KEYS = {"checkpoint_load", "dtype", "fp8", "loss_step0", "tokens_per_s", "tflops_per_s", "mfu", "plan_memory_gib",
            "peak_memory_gib", "memory_over_plan"}


def numbers(value):
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_dry_run_builds_trains_exports_and_generates(tmp_path):
    result = run_python(REPO / "benchmarks/gpu_check.py", "--dry-run", "--work", tmp_path, timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"gpu_check", "device", "dtype", "shape", "rows", "seq", "timed_steps", "runs", "export",
                           "transformers_sdpa", "engine_over_transformers", "loss_gaps", "generation", "seconds"}
    assert (report["gpu_check"], report["dtype"]) == ("dry-run", "float32")
    local = report["runs"]["local"]
    assert set(local) == RUN_KEYS and local["checkpoint_load"] == "ok"
    assert report["runs"]["te_bf16"] == report["runs"]["te_fp8"] == report["generation"]["vllm"] == SKIPPED
    assert set(report["loss_gaps"].values()) == {SKIPPED}
    assert local["peak_memory_gib"] == SKIPPED and local["mfu"].startswith("skipped")
    # a random model's loss starts near log(vocab) (uniform predictions)
    assert abs(local["loss_step0"] - math.log(report["shape"]["vocab_size"])) < 1.0
    for figure in ("tokens_per_s", "tflops_per_s", "plan_memory_gib"):
        assert local[figure] > 0
    assert report["transformers_sdpa"]["tokens_per_s"] > 0 and report["engine_over_transformers"]["local"] > 0
    assert report["export"]["from"] == "local"
    hf = report["generation"]["hf"]
    assert 1 <= len(hf["token_ids"]) <= 16 and hf["finish_reason"] in ("length", "eos")
    assert all(math.isfinite(n) for n in numbers(report))
