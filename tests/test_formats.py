"""Record formats: detection, normalisation, and a precise reason for every bad record."""

from __future__ import annotations

import pytest

from ray_app.data.formats import RecordError, detect_format, parse_line, to_turns


@pytest.mark.parametrize("record,fmt", [
    ({"text": "hi"}, "text"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"messages": []}, "messages"),
    ({"conversations": []}, "messages"),
    ({"prompt": "x"}, None),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_parse_line_accepts_a_byte_order_mark():
    assert parse_line('\ufeff{"text": "a"}') == {"text": "a"}


@pytest.mark.parametrize("line,reason", [
    ('{"text": "a"', "invalid JSON"),
    ("[1, 2]", "must be a JSON object, got list"),
    ("   ", "empty line"),
])
def test_parse_line_rejects_with_reason(line, reason):
    with pytest.raises(RecordError, match=reason):
        parse_line(line)


def test_text_is_one_trained_turn():
    (turn,) = to_turns({"text": "Paris."}, "text")
    assert turn.trained and turn.content == "Paris."


def test_alpaca_prompt_joins_instruction_and_input_and_trains_only_the_output():
    turns = to_turns({"instruction": "Add.", "input": "1 + 2", "output": "3"}, "alpaca")
    assert [(t.role, t.trained) for t in turns] == [("user", False), ("assistant", True)]
    assert turns[0].content == "Add.\n\n1 + 2" and turns[1].content == "3"


def test_alpaca_without_input_uses_the_instruction_alone():
    turns = to_turns({"instruction": "Say hi.", "output": "hi"}, "alpaca")
    assert turns[0].content == "Say hi."


def test_messages_train_on_assistant_turns_only():
    turns = to_turns({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"}]}, "messages")
    assert [t.trained for t in turns] == [False, False, True, False, True]


def test_sharegpt_conversations_are_read_as_messages():
    turns = to_turns({"conversations": [{"from": "human", "value": "hi"},
                                        {"from": "gpt", "value": "hello"}]}, "messages")
    assert [(t.role, t.content) for t in turns] == [("user", "hi"), ("assistant", "hello")]


@pytest.mark.parametrize("record,fmt,reason", [
    ({"text": 42}, "text", "field 'text' must be a string, got int"),
    ({"text": "  "}, "text", "field 'text' is empty"),
    ({"body": "x"}, "text", "missing field 'text'"),
    ({"instruction": "a"}, "alpaca", "missing field 'output'"),
    ({"instruction": "a", "output": ["b"]}, "alpaca", "'output' must be a string"),
    ({"messages": []}, "messages", "'messages' is empty"),
    ({"messages": "hi"}, "messages", "must be a list, got str"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": 1}]}, "messages", "content must be a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "messages", "may only come first"),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no non-empty assistant"),
    ({"messages": ["hi"]}, "messages", r"messages\[0\] must be an object"),
])
def test_bad_records_are_rejected_with_a_reason(record, fmt, reason):
    with pytest.raises(RecordError, match=reason):
        to_turns(record, fmt)
