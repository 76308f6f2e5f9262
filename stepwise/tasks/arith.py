"""The embedded task: multi-step arithmetic mod 10, evaluated left to right, one step per line.

    prompt:    Q: 3+4*2-5
    solution:  3+4=7
               7*2=4
               4-5=9
               A: 9

Designed so a tiny policy trained by SFT is *systematically* wrong on some facts yet still samples
the right result sometimes, which Monte-Carlo labels and a step-level critic can find:
`corrupt_fraction` of the (a, op, b) table entries are "traps" with a fixed wrong result, written
into SFT solutions with probability `corrupt_rate` (the chain then continues from the written
value). References and held-out problems are always correct. `n_steps` is the difficulty knob.
Everything is deterministic by seed.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from functools import cached_property

OPERATIONS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}
SPLITS = ("train", "test")
TEST_SHARE = 5  # one problem in TEST_SHARE belongs to the test split (by hash)


@dataclass(frozen=True)
class ArithConfig:
    n_steps: int = 3
    operators: str = "+-*"
    corrupt_fraction: float = 0.3
    corrupt_rate: float = 0.6
    seed: int = 0

    def __post_init__(self):
        if self.n_steps < 1:
            raise ValueError(f"ArithConfig.n_steps must be >= 1, got {self.n_steps}")
        unknown = set(self.operators) - set(OPERATIONS)
        if not self.operators or unknown:
            raise ValueError(f"ArithConfig.operators must use {sorted(OPERATIONS)}, got {self.operators!r}")
        for name in ("corrupt_fraction", "corrupt_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ArithConfig.{name} must be in [0, 1]")

    @cached_property
    def traps(self) -> dict[tuple[int, str, int], int]:
        """(a, op, b) -> the fixed wrong result written for that entry in SFT data."""
        entries = [(a, op, b) for a in range(10) for op in self.operators for b in range(10)]
        rng = random.Random(f"traps-{self.seed}")
        chosen = rng.sample(entries, round(self.corrupt_fraction * len(entries)))
        traps = {}
        for a, op, b in sorted(chosen):
            right = OPERATIONS[op](a, b)
            traps[(a, op, b)] = rng.choice([v for v in range(10) if v != right])
        return traps


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def split_of(problem: str) -> str:
    """'test' for one problem in TEST_SHARE (by a stable hash of its text), else 'train'."""
    return "test" if _stable_hash(problem) % TEST_SHARE == 0 else "train"


_PROBLEM = re.compile(r"Q: ?(\d(?:[-+*]\d)*)")


def _parse(problem: str) -> tuple[int, list[tuple[str, int]]]:
    """`Q: 3+4*2-5` -> (3, [("+", 4), ("*", 2), ("-", 5)]); ValueError naming the text otherwise."""
    match = _PROBLEM.fullmatch(problem.strip()) if isinstance(problem, str) else None
    if match is None:
        raise ValueError(f"not an arith problem (want 'Q: <digit>(<op><digit>)*' with ops +-*): {problem!r:.80}")
    expression = match.group(1)
    steps = [(expression[i], int(expression[i + 1])) for i in range(1, len(expression), 2)]
    return int(expression[0]), steps


def _write_solution(start: int, steps: list[tuple[str, int]], result_of) -> tuple[str, str]:
    value, lines = start, []
    for op, operand in steps:
        written = result_of(value, op, operand)
        lines.append(f"{value}{op}{operand}={written}")
        value = written
    return "\n".join(lines + [f"A: {value}"]), str(value)


def solve(problem: str) -> tuple[list[str], str]:
    """The correct step lines and final answer of a problem text."""
    start, steps = _parse(problem)
    text, answer = _write_solution(start, steps, lambda a, op, b: OPERATIONS[op](a, b))
    return text.split("\n")[:-1], answer


def make_problems(config: ArithConfig, n: int, split: str) -> list[dict]:
    """`n` distinct problems of `split` ("train" or "test"; disjoint by construction)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"make_problems: n must be a non-negative integer, got {n!r}")
    rng = random.Random(f"problems-{config.seed}-{split}")
    capacity = 10 ** (config.n_steps + 1) * len(config.operators) ** config.n_steps
    allowed = capacity // (TEST_SHARE * 2)
    if n > allowed:
        raise ValueError(f"asked for {n} {split} problems; n_steps={config.n_steps} allows about {allowed}")
    seen: set[str] = set()
    records = []
    while len(records) < n:
        parts = [str(rng.randrange(10))]
        for _ in range(config.n_steps):
            parts += [rng.choice(config.operators), str(rng.randrange(10))]
        problem = f"Q: {''.join(parts)}\n"
        if problem in seen or split_of(problem) != split:
            continue
        seen.add(problem)
        steps, answer = solve(problem)
        records.append({"id": f"arith-{split}-{len(records)}", "problem": problem, "answer": answer,
                        "solution": "\n".join(steps + [f"A: {answer}"])})
    return records


def make_sft_records(config: ArithConfig, problems: list[dict]) -> list[dict]:
    """`{"id", "prompt", "response"}` where trap entries are written wrong with prob. corrupt_rate."""
    traps = config.traps
    records = []
    for index, problem in enumerate(problems):
        for key in ("id", "problem"):
            if not isinstance(problem, dict) or not isinstance(problem.get(key), str):
                raise ValueError(f"make_sft_records: problems[{index}] needs a string '{key}'")
        rng = random.Random(f"sft-{config.seed}-{problem['problem']}")

        def written(a: int, op: str, b: int) -> int:
            if (a, op, b) in traps and rng.random() < config.corrupt_rate:
                return traps[(a, op, b)]
            return OPERATIONS[op](a, b)

        try:
            start, steps = _parse(problem["problem"])
        except ValueError as error:
            raise ValueError(f"make_sft_records: problems[{index}] (id {problem['id']!r}): {error}") from None
        response, _ = _write_solution(start, steps, written)
        records.append({"id": problem["id"], "prompt": problem["problem"], "response": response})
    return records


def extract_answer(response: str) -> str | None:
    """The answer on the last line starting with `A:`, or None."""
    if not isinstance(response, str):
        return None
    for line in reversed(response.strip().split("\n")):
        if line.startswith("A:"):
            return line[2:].strip()
    return None


def grade_arith(response: str, reference: str) -> bool:
    """True when the response's final `A:` answer is exactly the reference."""
    answer = extract_answer(response)
    return answer is not None and isinstance(reference, str) and answer == reference.strip()


def corpus(config: ArithConfig) -> list[str]:
    """Texts covering every character the task can produce (for tokenizer training)."""
    digits = "0123456789"
    return [f"Q: {digits}{config.operators}\n", f"{digits}={digits}\nA: {digits}"]
