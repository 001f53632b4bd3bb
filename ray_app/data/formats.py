"""Record formats: detection, validation and normalisation into a conversation.

Every format becomes a list of `Turn`s (role, content, trained?), so masking and
tokenization have one code path. A record that does not fit raises `RecordError` whose
message is the reject reason the user reads in `<output>/rejects/`.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from ray_app.config import RecordFormat

FORMATS = get_args(RecordFormat)  # text, alpaca, messages, preference, unpaired
ROLES = ("system", "user", "assistant")
DEFAULT_TRAINED_ROLES = ("assistant",)


class RecordError(ValueError):
    """The record cannot be trained on; the message is the reject reason."""


@dataclass(frozen=True)
class Turn:
    role: str  # "text" for raw text, else a chat role
    content: str
    trained: bool


@dataclass(frozen=True)
class Preference:
    """A prompt (chat turns) with a preferred and a dispreferred answer."""

    prompt: list[Turn]
    chosen: Turn
    rejected: Turn


@dataclass(frozen=True)
class Completion:
    """A prompt (chat turns) with one answer labelled desirable or not (KTO's data)."""

    prompt: list[Turn]
    completion: Turn
    desirable: bool


def parse_line(text: str) -> dict[str, Any]:
    """The line as a JSON object, or RecordError with the reason; raises nothing else.

    NaN and Infinity are read as numbers, as Python's own json writes them; a duplicated
    key keeps its last value."""
    stripped = text.lstrip("\ufeff").strip()  # a byte-order mark is not an error
    if not stripped:
        raise RecordError("empty line")
    try:
        record = json.loads(stripped)
    except json.JSONDecodeError as err:
        raise RecordError(f"invalid JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:  # the C parser guards its stack with the recursion limit
        raise RecordError("invalid JSON: nested too deeply (more levels of [ or { than "
                          "Python's recursion limit)") from None
    except ValueError as err:  # an integer over Python's 4,300-digit limit
        raise RecordError(f"invalid JSON: {str(err).split(';')[0]}") from None
    if not isinstance(record, dict):
        raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    return record


def detect_format(record: dict[str, Any], fields: Mapping[str, str] | None = None) -> str | None:
    """The format whose fields the record has, or None."""
    name = _namer(fields)
    if name("chosen") in record and name("rejected") in record:
        return "preference"
    if name("completion") in record and name("label") in record:
        return "unpaired"
    if name("messages") in record or "conversations" in record:
        return "messages"
    if name("instruction") in record and name("output") in record:
        return "alpaca"
    if name("text") in record:
        return "text"
    return None


def to_turns(record: dict[str, Any], fmt: str, fields: Mapping[str, str] | None = None,
             trained_roles: tuple[str, ...] = DEFAULT_TRAINED_ROLES) -> list[Turn]:
    """The record as chat turns; `fields` maps standard names to the record's own keys.

    >>> to_turns({"q": "2+2?", "a": "4"}, "alpaca", {"instruction": "q", "output": "a"})[-1]
    Turn(role='assistant', content='4', trained=True)
    """
    name = _namer(fields)
    if fmt == "text":
        return [Turn("text", _string(record, name("text")), True)]
    if fmt == "alpaca":
        return _alpaca(record, name)
    if fmt == "messages":
        return _messages(record, name, trained_roles)
    if fmt == "preference":  # supervised view of a pair: train on the chosen answer
        pair = to_preference(record, fields)
        return pair.prompt + [pair.chosen]
    if fmt == "unpaired":  # supervised view: only a desirable completion is trained on
        one = to_completion(record, fields)
        if not one.desirable:
            raise RecordError("an undesirable completion (label: false) is never trained on as "
                              "a target; train.method=kto uses it")
        return one.prompt + [one.completion]
    raise RecordError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def to_preference(record: dict[str, Any], fields: Mapping[str, str] | None = None) -> Preference:
    """A `preference` record: `prompt` (string or message list, optional `system`),
    `chosen` and `rejected` (strings, or lists ending in the assistant answer)."""
    name = _namer(fields)
    prompt = _prompt(record, name)
    chosen = _answer(record, name("chosen"), name)
    rejected = _answer(record, name("rejected"), name)
    if " ".join(chosen.split()) == " ".join(rejected.split()):
        raise RecordError("'chosen' and 'rejected' are the same answer")
    return Preference(prompt, Turn("assistant", chosen, True), Turn("assistant", rejected, True))


def to_completion(record: dict[str, Any], fields: Mapping[str, str] | None = None) -> Completion:
    """An `unpaired` record (TRL's unpaired preference format, as KTO uses it): `prompt`
    as in a preference record, `completion` (string or list ending in the assistant answer)
    and `label`, true for a desirable completion and false for an undesirable one."""
    name = _namer(fields)
    prompt = _prompt(record, name)
    completion = _answer(record, name("completion"), name)
    label_key = name("label")
    if label_key not in record:
        raise RecordError(f"missing field {label_key!r}")
    label = record[label_key]
    if not isinstance(label, bool):
        raise RecordError(f"field {label_key!r} must be true or false, got {_show(label)}")
    return Completion(prompt, Turn("assistant", completion, True), label)


def _prompt(record: dict[str, Any], name) -> list[Turn]:
    """The untrained prompt turns of a preference or unpaired record."""
    prompt_key = name("prompt")
    raw_prompt = record.get(prompt_key)
    if isinstance(raw_prompt, list):
        return _messages({prompt_key: raw_prompt},
                         lambda k: prompt_key if k == "messages" else name(k),
                         (), require_trained=False, where=prompt_key)
    prompt = [Turn("user", _string(record, prompt_key), False)]
    system = _string(record, name("system"), required=False)
    if system.strip():
        prompt.insert(0, Turn("system", system, False))
    return prompt


def _answer(record: dict[str, Any], key: str, name) -> str:
    value = record.get(key)
    if isinstance(value, list):  # [{"role": "assistant", "content": "..."}] (TRL style)
        if not value or not isinstance(value[-1], dict):
            raise RecordError(f"field {key!r} must be a string or a non-empty list of messages")
        last = value[-1]
        if last.get(name("role")) != "assistant":
            raise RecordError(f"the last message of {key!r} must have role 'assistant'")
        return _string(last, name("content"), where=f"{key}[-1].")
    return _string(record, key)


def _namer(fields: Mapping[str, str] | None):
    fields = fields or {}
    return lambda standard: fields.get(standard, standard)


def _string(record: dict[str, Any], key: str, *, required: bool = True, where: str = "") -> str:
    if key not in record or record[key] is None:
        if required:
            raise RecordError(f"missing field {where}{key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"field {where}{key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RecordError(f"field {where}{key!r} is empty")
    return _unicode(value, f"field {where}{key!r}")


def _unicode(value: str, what: str) -> str:
    """`value`, or RecordError when it holds a lone surrogate: valid JSON ("\\ud800"), but
    no tokenizer can encode it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RecordError(f"{what} is not valid Unicode: lone surrogate "
                          f"\\u{ord(value[err.start]):04x} at character {err.start}") from None
    return value


def _show(value: Any) -> str:
    """A short repr for reject reasons: the value may be megabytes or deeply nested."""
    short = reprlib.Repr()  # keyword arguments only from Python 3.12
    short.maxlevel, short.maxstring, short.maxother, short.maxlist, short.maxdict = 2, 40, 40, 4, 4
    return short.repr(value)


def _alpaca(record: dict[str, Any], name) -> list[Turn]:
    instruction = _string(record, name("instruction"))
    given = _string(record, name("input"), required=False)
    output = _string(record, name("output"))
    prompt = f"{instruction}\n\n{given}" if given.strip() else instruction
    turns = []
    system = _string(record, name("system"), required=False)
    if system.strip():
        turns.append(Turn("system", system, False))
    return turns + [Turn("user", prompt, False), Turn("assistant", output, True)]


_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _messages(record: dict[str, Any], name, trained_roles: tuple[str, ...], *,
              require_trained: bool = True, where: str = "messages") -> list[Turn]:
    key = name("messages") if name("messages") in record or "conversations" not in record \
        else "conversations"
    raw = record.get(key)
    if raw is None:
        raise RecordError(f"missing field {key!r}")
    if not isinstance(raw, list):
        raise RecordError(f"field {key!r} must be a list, got {type(raw).__name__}")
    if not raw:
        raise RecordError(f"field {key!r} is empty")
    role_key, content_key_ = name("role"), name("content")
    turns = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise RecordError(f"{where}[{i}] must be an object, got {type(message).__name__}")
        sender = message.get("from")
        role = message.get(role_key, _SHAREGPT_ROLES.get(sender) if isinstance(sender, str) else None)
        content = message.get(content_key_, message.get("value"))
        if not isinstance(role, str) or role not in ROLES:
            raise RecordError(f"{where}[{i}] has unknown role {_show(role)}; expected one of "
                              f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"{where}[{i}].content must be a string, got "
                              f"{type(content).__name__}")
        _unicode(content, f"{where}[{i}].content")
        if role == "system" and i != 0:
            raise RecordError(f"{where}[{i}]: a system message may only come first")
        if role != "system" and not content.strip():
            raise RecordError(f"{where}[{i}] ({role}) has empty content")
        turns.append(Turn(role, content, role in trained_roles))
    if require_trained and not any(t.trained and t.content.strip() for t in turns):
        raise RecordError(f"no non-empty {'/'.join(trained_roles)} message to train on")
    return turns


def content_key(turns: list[Turn]) -> str:
    """Canonical text of a record: the basis of its hash (dedup, train/eval split).

    Whitespace runs count as one space, so re-wrapped copies of a record are duplicates."""
    return json.dumps([[t.role, " ".join(t.content.split())] for t in turns], ensure_ascii=False)
