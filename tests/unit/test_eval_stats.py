"""Wilson intervals checked against hand arithmetic, and the paper-layout table rendered exactly."""
from __future__ import annotations

import pytest

from stepwise.evaluate.stats import Score, wilson_interval
from stepwise.evaluate.tables import results_table


def test_wilson_interval_matches_hand_arithmetic():
    # 8 of 10, z = 1.96: z^2 = 3.8415, denominator 1 + 0.38415 = 1.38415; centre (0.8 + 0.19207) / 1.38415
    # = 0.71674; half-width 1.96 * sqrt(0.016 + 0.0096037) / 1.38415 = 0.22658 -> (0.49016, 0.94332)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94332, abs=1e-4)
    # 0 of 10: the lower end is 0 and the upper z^2 / (n + z^2) = 3.8415 / 13.8415 = 0.27753
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-4)


def test_score_is_correct_over_total_and_refuses_impossible_counts():
    score = Score.of(3, 4)
    assert (score.correct, score.total, score.accuracy) == (3, 4, 0.75)
    with pytest.raises(ValueError, match="need 0 <= correct <= total"):
        wilson_interval(5, 4)


def test_table_has_a_row_per_model_and_a_column_per_benchmark():
    rows = {"pi0": {"math500": Score.of(8, 10), "humaneval": Score.of(0, 10)},
            "dapo": {"math500": Score.of(10, 10)}}
    assert results_table(rows, ["math500", "humaneval"]) == (
        "| Model | MATH500 | HumanEval |\n"
        "|---|:---:|:---:|\n"
        "| pi0 | 80.0 (49.0–94.3) | 0.0 (0.0–27.8) |\n"
        "| dapo | 100.0 (72.2–100.0) | – |\n"
        "\n"
        "Greedy zero-shot, % with 95% Wilson interval in parentheses; MATH500 accuracy, n=10; "
        "HumanEval pass@1, n=10.\n")
