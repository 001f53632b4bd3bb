"""Record formats: detection, validation and normalisation into a conversation.

Every format becomes a list of `Turn`s (role, content, trained?), so masking and
tokenization have one code path. A record that does not fit raises `RecordError` whose
message is the reject reason the user reads in `<output>/rejects/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

FORMATS = ("text", "alpaca", "messages")
ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """The record cannot be trained on; the message is the reject reason."""


@dataclass(frozen=True)
class Turn:
    role: str  # "text" for raw text, else a chat role
    content: str
    trained: bool


def parse_line(text: str) -> dict[str, Any]:
    stripped = text.lstrip("\ufeff").strip()  # a byte-order mark is not an error
    if not stripped:
        raise RecordError("empty line")
    try:
        record = json.loads(stripped)
    except json.JSONDecodeError as err:
        raise RecordError(f"invalid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    return record


def detect_format(record: dict[str, Any]) -> str | None:
    """The format whose fields the record has, or None."""
    if "messages" in record or "conversations" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def to_turns(record: dict[str, Any], fmt: str) -> list[Turn]:
    if fmt == "text":
        return [Turn("text", _string(record, "text"), True)]
    if fmt == "alpaca":
        return _alpaca(record)
    if fmt == "messages":
        return _messages(record)
    raise RecordError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _string(record: dict[str, Any], key: str, *, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise RecordError(f"missing field {key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RecordError(f"field {key!r} is empty")
    return value


def _alpaca(record: dict[str, Any]) -> list[Turn]:
    instruction = _string(record, "instruction")
    given = _string(record, "input", required=False)
    output = _string(record, "output")
    prompt = f"{instruction}\n\n{given}" if given.strip() else instruction
    turns = []
    system = _string(record, "system", required=False)
    if system.strip():
        turns.append(Turn("system", system, False))
    return turns + [Turn("user", prompt, False), Turn("assistant", output, True)]


_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _messages(record: dict[str, Any]) -> list[Turn]:
    raw = record.get("messages", record.get("conversations"))
    if not isinstance(raw, list):
        raise RecordError(f"field 'messages' must be a list, got {type(raw).__name__}")
    if not raw:
        raise RecordError("field 'messages' is empty")
    turns = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise RecordError(f"messages[{i}] must be an object, got {type(message).__name__}")
        role = message.get("role", _SHAREGPT_ROLES.get(message.get("from", "")))
        content = message.get("content", message.get("value"))
        if role not in ROLES:
            raise RecordError(f"messages[{i}] has unknown role {role!r}; expected one of "
                              f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"messages[{i}].content must be a string, got "
                              f"{type(content).__name__}")
        if role == "system" and i != 0:
            raise RecordError(f"messages[{i}]: a system message may only come first")
        turns.append(Turn(role, content, role == "assistant"))
    if not any(t.trained and t.content.strip() for t in turns):
        raise RecordError("no non-empty assistant message to train on")
    return turns


def content_key(turns: list[Turn]) -> str:
    """Canonical text of a record: the basis of its hash (dedup, train/eval split)."""
    return json.dumps([[t.role, " ".join(t.content.split())] for t in turns], ensure_ascii=False)
