"""Training records: the fields each data kind needs, and the strict / lenient policy for bad ones.

Every problem is reported as `path:line: what is wrong` (bad JSON, a missing key, a wrong type, an
empty string, a sample longer than `model.max_seq_len`). `train.data_errors=strict` (the default)
raises on the first one, before training starts; `lenient` skips bad records, counts them, prints a
summary, and still aborts when more than `train.max_bad_fraction` of the records are bad.
"""
from __future__ import annotations

import os

from stepwise.data.jsonl import DataError, _check_field, numbered_lines, parse_record

# Top-level keys (and types) a record of each batch builder's data kind must have.
FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "sft": {"prompt": str},
    "values": {"mc": list},
    "action": {"state_id": (str, int), "advantage": float, "ref_logp": float},
}

# The two forms a record may take: the token form the pipeline writes (the exact ids the policy
# sampled) and the text form for hand-written data (tokenized by the builder).
FORMS: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    "sft": ({"response_ids": list}, {"response": str}),
    "values": ({"ids": list, "ends": list}, {"prompt": str, "steps": list}),
    "action": ({"prompt_ids": list, "action_ids": list}, {"prompt": str, "action": str}),
}


def token_form(where: str, record: dict, kind: str) -> bool:
    """Whether `record` of data kind `kind` is in token form (all its keys present), else checks the text
    form's keys; DataError naming `where` and the key when neither form is complete."""
    tokens, text = FORMS[kind]
    if all(key in record for key in tokens):
        for key, expected in tokens.items():
            _check_field(where, record, key, expected)
        return True
    for key, expected in text.items():
        if key not in record:
            raise DataError(f"{where}: missing key '{key}' (or the token form's {' and '.join(map(repr, tokens))})")
        _check_field(where, record, key, expected)
    return False


def token_ids(where: str, record: dict, key: str) -> list[int]:
    """`record[key]` as a non-empty list of token ids; DataError naming `where` and the key otherwise."""
    value = record.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                            for t in value):
        raise DataError(f"{where}: key '{key}' must be a non-empty list of token ids (integers >= 0), got {value!r:.60}")
    return value


class RecordScreen:
    """Collects bad records under one policy; `reject` raises (strict) or counts (lenient)."""

    def __init__(self, mode: str, max_bad_fraction: float | None = None):
        """`mode` and `max_bad_fraction` come from `train.data_errors` / `train.max_bad_fraction`."""
        if mode not in ("strict", "lenient"):
            raise ValueError(f"data_errors={mode!r} is not one of ['strict', 'lenient']")
        if mode == "lenient" and max_bad_fraction is None:
            raise ValueError("data_errors='lenient' needs max_bad_fraction")
        self.mode = mode
        self.max_bad_fraction = max_bad_fraction
        self.rejected: list[str] = []

    @property
    def strict(self) -> bool:
        return self.mode == "strict"

    def reject(self, where: str, what: str) -> None:
        message = f"{where}: {what}"
        if self.strict:
            raise DataError(message)
        self.rejected.append(message)

    def reject_error(self, error: DataError) -> None:
        if self.strict:
            raise error
        self.rejected.append(str(error))

    def finish(self, total: int, source: str) -> int:
        """After reading and tokenizing `total` records: raise if too many were bad; returns the count."""
        bad = len(self.rejected)
        if not bad:
            return 0
        examples = "\n  ".join(self.rejected[:5])
        summary = (f"{source}: {bad} of {total} records are bad ({bad / max(total, 1):.1%}; "
                   f"train.max_bad_fraction={self.max_bad_fraction})")
        if bad > self.max_bad_fraction * total:
            raise DataError(f"{summary}; too many, stopping. First ones:\n  {examples}")
        print(f"[stepwise] {summary}; skipped. First ones:\n  {examples}", flush=True)
        return bad


def read_records(path: str | os.PathLike, kind: str, screen: RecordScreen | None = None
                 ) -> tuple[list[dict], list[str], int]:
    """(good records, their `path:line`, number of non-blank lines) of a JSONL file of `kind` records.

    Kinds without an entry in FIELDS get the JSON-object check only."""
    screen = screen or RecordScreen("strict")
    required = FIELDS.get(kind, {})
    records, where, total = [], [], 0
    for location, line in numbered_lines(path):
        total += 1
        try:
            record = parse_record(location, line, required)
            if kind in FORMS:
                token_form(location, record, kind)
            records.append(record)
        except DataError as error:
            screen.reject_error(error)
            continue
        where.append(location)
    return records, where, total
