"""Tokenization with prompt masking, run in a Ray Data actor pool.

A conversation is rendered through the tokenizer's chat template one assistant turn at a
time: the text the template adds for a turn after the prompt of that turn is the part
trained on (label = token id); everything else gets label -100. This works with any
template, including those without `{% generation %}` markers.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from ray_app.data.formats import RecordError, Turn, content_key, detect_format, parse_line, to_turns

IGNORE = -100
PLAIN_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def segments(turns: list[Turn], tokenizer) -> list[tuple[str, bool]]:
    """(text, trained) pieces whose concatenation is the full rendered record."""
    if turns[0].role == "text":
        bos = tokenizer.bos_token or ""
        return [(bos, False), (turns[0].content + (tokenizer.eos_token or ""), True)]
    if not getattr(tokenizer, "chat_template", None):
        return _plain_segments(turns, tokenizer)
    messages = [{"role": t.role, "content": t.content} for t in turns]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise RecordError("the tokenizer's chat template does not render conversations "
                              "prefix by prefix, so prompt tokens cannot be masked")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [p for p in pieces if p[0]]


def _plain_segments(turns: list[Turn], tokenizer) -> list[tuple[str, bool]]:
    """Alpaca-style prompt for tokenizers without a chat template (base models)."""
    pieces: list[tuple[str, bool]] = [(tokenizer.bos_token or "", False)]
    pending: list[str] = []
    for turn in turns:
        if turn.role == "assistant":
            prompt = PLAIN_PROMPT.format(prompt="\n\n".join(pending))
            pieces += [(prompt, False), (turn.content + (tokenizer.eos_token or ""), True)]
            pending = []
        else:
            pending.append(turn.content)
    return [p for p in pieces if p[0]]


def tokenize_segments(pieces: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
    for (_, trained), piece_ids in zip(pieces, encoded):
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE] * len(piece_ids)
    return ids, labels


def split_of(key: str, eval_fraction: float) -> tuple[str, str]:
    """(content hash, split): the split is a pure function of the content."""
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    bucket = int(digest[:8], 16) / 0x1_0000_0000
    return digest, ("eval" if bucket < eval_fraction else "train")


OUTPUT_SCHEMA = pa.schema([
    ("source", pa.string()), ("line", pa.int64()), ("status", pa.string()),
    ("reason", pa.string()), ("raw", pa.string()), ("format", pa.string()),
    ("split", pa.string()), ("content_hash", pa.string()), ("num_tokens", pa.int32()),
    ("trained_tokens", pa.int32()), ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
])
RAW_KEEP = 2000  # characters of a rejected line kept in the reject report


class TokenizeRecords:
    """Ray Data callable class: one tokenizer per actor, loaded once."""

    def __init__(self, tokenizer_path: str, max_seq_len: int, fmt: str, eval_fraction: float,
                 trust_remote_code: bool = False):
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
        self.max_seq_len = max_seq_len
        self.fmt = fmt
        self.eval_fraction = eval_fraction

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = [self.one(batch, i) for i in range(len(batch["line"]))]
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)

    def one(self, batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        row: dict[str, Any] = {
            "source": str(batch["source"][i]), "line": int(batch["line"][i]),
            "status": "accepted", "reason": "", "raw": "", "format": "", "split": "",
            "content_hash": "", "num_tokens": 0, "trained_tokens": 0,
            "input_ids": [], "labels": [],
        }
        text = str(batch["text"][i])
        fmt = ""
        try:
            if bool(batch["bad_utf8"][i]):
                raise RecordError("line is not valid UTF-8")
            record = parse_line(text)
            fmt = self.fmt if self.fmt != "auto" else str(batch["file_format"][i])
            if not fmt:
                fmt = detect_format(record) or ""
            if not fmt:
                raise RecordError("no known format: expected a 'text', 'messages', or "
                                  "'instruction' + 'output' field")
            turns = to_turns(record, fmt)
            ids, labels = tokenize_segments(segments(turns, self.tokenizer), self.tokenizer)
            ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
            trained = sum(1 for label in labels[1:] if label != IGNORE)
            if trained == 0:
                raise RecordError(f"no trainable tokens within max_seq_len={self.max_seq_len}")
            digest, split = split_of(content_key(turns), self.eval_fraction)
            if str(batch["role"][i]) == "eval":
                split = "eval"
            row.update(format=fmt, split=split, content_hash=digest, num_tokens=len(ids),
                       trained_tokens=trained, input_ids=ids, labels=labels)
        except RecordError as err:
            reason = f"{err} ({fmt} format)" if fmt else str(err)
            row.update(status="rejected", reason=reason, raw=text[:RAW_KEEP])
        return row


def file_format_of(first_records: list[dict[str, Any]]) -> str:
    """The format of a file, from its first parseable records ('' when none match)."""
    for record in first_records:
        fmt = detect_format(record)
        if fmt:
            return fmt
    return ""
