"""The report's tokens/s per stage: sampling stages from the tokens they generated (`sample`'s counted by
`grade`, per iteration), training stages from their last logged rate, nothing for the others."""
from __future__ import annotations

import pytest

from stepwise.pipeline.stages.report import tokens_per_second

STAGES = {"sample": {"problems": 8}, "grade": {"sampled_tokens": 1200}, "complete": {"generated_tokens": 900},
          "iteration_2/sample": {}, "iteration_2/grade": {"sampled_tokens": 300},
          "policy": {"final": {"tokens_per_s": 4321.0}}, "select": {"selected": 4}}


@pytest.mark.parametrize("name, seconds, rate", [("sample", 4.0, 300.0), ("complete", 3.0, 300.0),
                                                 ("iteration_2/sample", 2.0, 150.0), ("policy", 9.0, 4321.0),
                                                 ("select", 1.0, None), ("grade", 2.0, None)])
def test_each_stage_gets_the_rate_it_can_report(name, seconds, rate):
    assert tokens_per_second(name, STAGES, seconds) == rate
