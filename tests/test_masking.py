"""Prompt masking: only answer tokens carry labels, for every format and template kind."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ray_app.data.formats import to_turns
from ray_app.data.tokenize import (
    IGNORE,
    RecordRules,
    TokenizeRecords,
    load_tokenizer,
    segments,
    tokenize_segments,
)
from ray_app.quickstart import TOKENIZER_DIR


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TOKENIZER_DIR))


def _trained_text(tokenizer, record, fmt):
    ids, labels = tokenize_segments(segments(to_turns(record, fmt), tokenizer), tokenizer)
    assert len(ids) == len(labels)
    return tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]), tokenizer.decode(ids)


def test_chat_trains_on_every_assistant_turn_and_nothing_else(tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1 + 2?"},
        {"role": "assistant", "content": "1 + 2 = 3."}, {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."}]}
    trained, full = _trained_text(tokenizer, record, "messages")
    assert trained == "1 + 2 = 3.<|im_end|>\n2 + 2 = 4.<|im_end|>\n"
    assert full == tokenizer.apply_chat_template(record["messages"], tokenize=False)


def test_alpaca_through_the_chat_template_masks_the_instruction(tokenizer):
    trained, full = _trained_text(
        tokenizer, {"instruction": "Add the two numbers.", "input": "3 + 4", "output": "7"}, "alpaca")
    assert trained == "7<|im_end|>\n"
    assert "<|im_start|>user\nAdd the two numbers.\n\n3 + 4<|im_end|>" in full


def test_alpaca_without_a_chat_template_uses_the_plain_prompt(tokenizer):
    plain = load_tokenizer(str(TOKENIZER_DIR))
    plain.chat_template = None
    trained, full = _trained_text(plain, {"instruction": "Add.", "output": "7"}, "alpaca")
    assert trained == "7<|im_end|>"
    assert full.startswith("### Instruction:\nAdd.\n\n### Response:\n")


def test_text_trains_on_all_tokens_and_ends_with_eos(tokenizer):
    trained, full = _trained_text(tokenizer, {"text": "Paris is big."}, "text")
    assert trained == full == "Paris is big.<|im_end|>"


def _batch(lines, fmt="alpaca", bad_utf8=None):
    n = len(lines)
    return {"source": np.array(["f.jsonl"] * n), "source_id": np.zeros(n, dtype=np.int32),
            "line": np.arange(1, n + 1), "text": np.array(lines, dtype=object),
            "bad_utf8": np.array(bad_utf8 or [False] * n),
            "num_bytes": np.array([len(x.encode()) for x in lines]),
            "file_format": np.array([fmt] * n), "role": np.array(["train"] * n),
            "error": np.array([""] * n)}


def test_truncation_that_leaves_no_answer_rejects_the_record():
    tok = TokenizeRecords(str(TOKENIZER_DIR), RecordRules(max_seq_len=8))
    long_prompt = {"instruction": "word " * 50, "output": "done"}
    table = tok(_batch([json.dumps(long_prompt)])).to_pylist()
    assert table[0]["status"] == "rejected"
    assert "no trainable tokens within max_seq_len=8" in table[0]["reason"]


def test_records_are_truncated_to_max_seq_len():
    tok = TokenizeRecords(str(TOKENIZER_DIR), RecordRules(max_seq_len=16))
    row = tok(_batch([json.dumps({"text": "The capital of France is Paris. " * 20})],
                     fmt="text")).to_pylist()[0]
    assert row["status"] == "accepted" and row["num_tokens"] == len(row["input_ids"]) == 16


def test_invalid_utf8_and_bad_json_are_rejected_not_dropped():
    tok = TokenizeRecords(str(TOKENIZER_DIR), RecordRules(max_seq_len=64))
    rows = tok(_batch(['{"text": "ok"}', '{"text": "\ufffd"}', "{oops"], fmt="text",
                      bad_utf8=[False, True, False])).to_pylist()
    assert [r["status"] for r in rows] == ["accepted", "rejected", "rejected"]
    assert rows[1]["reason"] == "line is not valid UTF-8"
    assert rows[2]["reason"].startswith("invalid JSON") and rows[2]["raw"] == "{oops"
