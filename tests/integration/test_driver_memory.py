"""The driver only coordinates: its peak RSS stays flat when the sampled problems grow 4x, while a process
that holds the samples (what the driver did before sampling, grading, selection and segmentation became
launched steps) grows with them."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.integration.test_pipeline import REPO, stepwise

HOLD_SAMPLES = """
import sys
import psutil
import stepwise.pipeline.stages
from stepwise.data.jsonl import read_jsonl
from stepwise.sampling import read_shards
before = psutil.Process().memory_info().rss
held = read_shards(sys.argv[1] + "/sample/shards"), read_jsonl(sys.argv[1] + "/grade/graded.jsonl")
print((psutil.Process().memory_info().rss - before) / 2**20)
"""


def driver_peak(run_dir, problems: int) -> float:
    result = stepwise("run", "recipes/tiny/smoke.yaml", f"run.dir={run_dir}",
                      "run.stages=[data,tokenizer,init,sample,grade,select,segment]",
                      f"sampling.n_problems={problems}", "sampling.params.n=8")
    return float(re.search(r"driver peak RSS: ([\d.]+) MiB", result.stdout).group(1))


def holding_cost(run_dir) -> float:
    """MiB a process spends to hold a run's samples and graded samples (what the driver once read)."""
    result = subprocess.run([sys.executable, "-c", HOLD_SAMPLES, str(run_dir)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, check=True)
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_drivers_peak_memory_is_flat_when_the_samples_grow_4x(tmp_path):
    small, large = tmp_path / "p32", tmp_path / "p128"
    driver_growth = driver_peak(large, 128) - driver_peak(small, 32)
    holder_growth = holding_cost(large) - holding_cost(small)
    print(f"peak RSS growth for 4x the samples: driver {driver_growth:.2f} MiB, a process holding them "
          f"{holder_growth:.2f} MiB")
    assert holder_growth > 2.0, holder_growth  # the control sees the data: the comparison means something
    assert driver_growth < 0.25 * holder_growth, (driver_growth, holder_growth)
