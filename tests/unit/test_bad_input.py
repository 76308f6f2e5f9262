"""Bad training input: each kind of broken line is reported as `path:line: what`; strict mode stops at
the first one, lenient mode skips and counts them and still aborts past `max_bad_fraction`."""
from __future__ import annotations

import json

import pytest

from stepwise.data.jsonl import DataError
from stepwise.data.records import RecordScreen, read_records
from stepwise.train.sft_data import tokenize_sft

MAX_SEQ_LEN = 16
GOOD = {"prompt": "1+1=", "response": "2"}
BROKEN = {  # kind -> (line text, what the message must say)
    "bad json": ('{"prompt": "1+2=", "response": ', "bad JSON"),
    "missing field": (json.dumps({"prompt": "1+3="}), "missing key 'response'"),
    "wrong type": (json.dumps({"prompt": "1+4=", "response": 5}), "key 'response' must be string, got int"),
    "empty prompt": (json.dumps({"prompt": "  ", "response": "6"}), "key 'prompt' is empty"),
    "over-length": (json.dumps({"prompt": "9" * 40, "response": "1"}), f"exceed model.max_seq_len={MAX_SEQ_LEN}"),
}


class CharTokenizer:
    """One id per character; enough for lengths."""

    eos_token_id = 1

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[3 + (ord(c) % 50) for c in text] for text in texts]}


def load(path, screen: RecordScreen) -> list[dict]:
    """What the train worker does: read, tokenize (over-length is found here), then the verdict."""
    records, where, total = read_records(path, "sft", screen)
    sequences = tokenize_sft(records, CharTokenizer(), MAX_SEQ_LEN, str(path), where=where, screen=screen)
    screen.finish(total, str(path))
    return sequences


def write(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("kind", list(BROKEN))
def test_strict_names_the_file_and_line_of_each_kind_of_broken_record(tmp_path, kind):
    line, what = BROKEN[kind]
    path = write(tmp_path / "train.jsonl", [json.dumps(GOOD), "", json.dumps(GOOD), line, json.dumps(GOOD)])
    with pytest.raises(DataError) as caught:
        load(path, RecordScreen("strict"))
    message = str(caught.value)
    assert message.startswith(f"{path}:4: "), message  # the blank line still counts as a line
    assert what in message


def test_lenient_skips_and_counts_bad_records_within_the_allowed_fraction(tmp_path, capsys):
    lines = [json.dumps(GOOD)] * 20 + [line for line, _ in BROKEN.values()]
    path = write(tmp_path / "train.jsonl", lines)
    screen = RecordScreen("lenient", max_bad_fraction=0.25)
    sequences = load(path, screen)
    assert len(sequences) == 20 and len(screen.rejected) == 5
    assert [m.split(": ")[0] for m in screen.rejected] == [f"{path}:{n}" for n in range(21, 26)]
    assert "5 of 25 records are bad" in capsys.readouterr().out


def test_lenient_aborts_when_too_many_records_are_bad(tmp_path):
    lines = [json.dumps(GOOD)] * 20 + [line for line, _ in BROKEN.values()]
    path = write(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError, match=r"5 of 25 records are bad .*too many"):
        load(path, RecordScreen("lenient", max_bad_fraction=0.1))


def test_unknown_mode_and_missing_file_are_errors(tmp_path):
    with pytest.raises(ValueError, match="data_errors"):
        RecordScreen("sloppy")
    with pytest.raises(ValueError, match="needs max_bad_fraction"):
        RecordScreen("lenient")
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "absent.jsonl", "sft")


def test_scoring_refuses_data_files_without_one_output_each(capsys):
    """`stepwise.train.score` scores several files in one launch, each into its own directory: a count
    that does not match is refused before any model is built."""
    from stepwise.train import score

    with pytest.raises(SystemExit) as stopped:
        score.main(["--recipe", "r.yaml", "--ckpt", "c", "--tokenizer", "t", "--kind", "critic",
                    "--micro-batch-size", "2", "--data", "a.jsonl", "b.jsonl", "--out", "a_scores"])
    assert stopped.value.code == 2
    assert "2 --data files but 1 --out directories" in capsys.readouterr().err
