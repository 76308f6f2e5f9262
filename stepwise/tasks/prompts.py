"""Prompt templates: the tokenizer's chat template around a task instruction (the papers' CoT
instructions for MATH and GSM8K, and one for code); the embedded arithmetic task uses its raw problem text."""
from __future__ import annotations

INSTRUCTIONS = {
    "math": "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
    "gsm8k": "{problem}\nPlease reason step by step, and produce a final answer following 4 '#', like '#### 0'.",
    "code": "{problem}\nPlease reason step by step, then give your complete solution in one ```python code block.",
}


def render_prompt(problem: str, task: str, tokenizer=None, template: str | None = None) -> str:
    """The text a policy is prompted with for `problem` (chat template applied when the tokenizer has one)."""
    if task == "arith":
        return problem
    instruction = (template or INSTRUCTIONS[task]).format(problem=problem)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return instruction + "\n"
