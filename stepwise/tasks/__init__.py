"""Tasks: the embedded arithmetic task, tokenizers, prompts, answer extraction and grading."""
