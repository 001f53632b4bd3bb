"""A hostile corpus: one shard per kind of trouble, with what must become of every line.

`hostile_corpus(root)` writes the shards and a tokenizer copy whose chat template refuses
some conversations (as Gemma's and Mistral's do), and returns where they are and the
expected outcome of each shard, written down from what was written, never from the code
under test. The expectations hold for `hostile_data_config()`'s data settings with
`model.tokenizer` set to the returned tokenizer; train runs may use the same corpus.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

# Gemma refuses a system role; Mistral insists on alternating user/assistant roles.
REFUSING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MAX_RECORD_BYTES = 1_000_000


def hostile_data_config() -> dict:
    """The `data` settings the expectations assume (merge the train path in)."""
    return {"max_record_bytes": MAX_RECORD_BYTES, "max_seq_len": 64, "eval_fraction": 0.1,
            "tokenize_actors": 1}


@dataclass
class Expected:
    """What must become of one shard's lines."""

    read: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejects: dict[int, str] = field(default_factory=dict)  # line -> a part of its reason

    @property
    def rejected(self) -> int:
        return len(self.rejects)


@dataclass
class HostileCorpus:
    folder: Path  # the shards (data.train)
    tokenizer: Path  # model.tokenizer: the bundled one with REFUSING_TEMPLATE
    expected: dict[str, Expected]  # by shard file name


class _Shard:
    """Lines of one shard and their expected outcome, written together."""

    def __init__(self):
        self.lines: list[bytes] = []
        self.expected = Expected()

    def good(self, line: str | bytes) -> None:
        self._add(line)
        self.expected.accepted += 1

    def dup(self, line: str | bytes) -> None:
        self._add(line)
        self.expected.duplicates += 1

    def bad(self, line: str | bytes, reason: str) -> None:
        self._add(line)
        self.expected.rejects[len(self.lines)] = reason  # line numbers count blank lines too

    def blank(self, line: str | bytes) -> None:
        self.lines.append(line if isinstance(line, bytes) else line.encode())  # not a record

    def _add(self, line: str | bytes) -> None:
        self.lines.append(line if isinstance(line, bytes) else line.encode())
        self.expected.read = len([x for x in self.lines if x.strip(b" \t\r")])

    def data(self, end: bytes = b"\n") -> bytes:
        return b"".join(x + end for x in self.lines)


def _text(i: int, what: str = "fact") -> str:
    return json.dumps({"text": f"Hostile corpus {what} number {i}: the sky is blue."})


def _chat(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


def hostile_corpus(root: Path) -> HostileCorpus:
    """Writes the shards under `root/corpus` and the tokenizer under `root/tokenizer`."""
    from ray_app.data.tokenize import load_tokenizer
    from ray_app.quickstart import TOKENIZER_DIR

    folder, tokenizer_dir = root / "corpus", root / "tokenizer"
    folder.mkdir(parents=True)
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    tokenizer.chat_template = REFUSING_TEMPLATE
    tokenizer.save_pretrained(str(tokenizer_dir))
    files: dict[str, bytes] = {}
    expected: dict[str, Expected] = {}

    def put(name: str, shard: _Shard, data: bytes | None = None) -> None:
        files[name] = shard.data() if data is None else data
        expected[name] = shard.expected

    good = _Shard()  # enough clean records for a short training run
    for i in range(40):
        good.good(_chat(("user", f"What is {i} plus one?"), ("assistant", f"It is {i + 1}.")))
    put("good_chat.jsonl", good)

    s = _Shard()
    s.good(_text(1))
    s.bad("[" * 200_000, "invalid JSON: nested too deeply")
    s.bad(json.dumps({"text": "huge int"})[:-1] + ', "n": ' + "7" * 5000 + "}",
          "invalid JSON: Exceeds the limit (4300 digits)")
    s.bad('{"text": "lone \\ud800 surrogate"}', "field 'text' is not valid Unicode: lone surrogate")
    s.bad("[1, 2]", "a record must be a JSON object, got list")
    s.bad('"just a string"', "a record must be a JSON object, got str")
    s.bad("42", "a record must be a JSON object, got int")
    s.bad("null", "a record must be a JSON object, got NoneType")
    s.good('{"text": "duplicate keys: the first", "text": "duplicate keys: the last wins"}')
    s.good('{"text": "NaN is read as a number in other fields", "score": NaN}')
    s.bad('{"text": Infinity}', "field 'text' must be a string, got float")
    s.good('{"text": "an escaped NUL \\u0000 is a character"}')
    s.bad(b'{"text": "a raw NUL \x00 byte"}', "invalid JSON: Invalid control character")
    s.blank(b"   \t  ")
    s.blank(b"")
    s.bad(b"\x0c", "empty line")
    s.bad('{"text": ""}', "field 'text' is empty")
    s.bad('{"text": null}', "missing field 'text'")
    s.bad("{}", "missing field 'text'")
    s.bad('{"text": ["a list"]}', "field 'text' must be a string, got list")
    s.bad('{"text": "unterminated', "invalid JSON: Unterminated string")
    s.good(_text(2))
    put("json_edges.jsonl", s)

    s = _Shard()  # a byte-order mark and CRLF line ends are not errors
    s.good("\ufeff" + _text(3, "CRLF"))
    s.good(_text(4, "CRLF"))
    s.bad('{"text": "broken",', "invalid JSON")
    s.good(_text(5, "CRLF"))
    put("crlf_bom.jsonl", s, s.data(b"\r\n"))

    s = _Shard()
    s.good(_text(6))
    s.bad(b'{"text": "caf\xe9 latin-1"}', "line is not valid UTF-8")
    s.bad(b"\xff\xfe\x00garbage", "line is not valid UTF-8")
    s.good(_text(7))
    put("bad_utf8.jsonl", s)

    s = _Shard()
    s.good(_text(8))
    s.bad(json.dumps({"text": "x" * (MAX_RECORD_BYTES + 1000)}), "record too large")
    s.bad(b" " * (MAX_RECORD_BYTES + 10) + _text(9).encode(), "record too large")  # blank start
    s.good(_text(10))
    put("oversized.jsonl", s)

    s = _Shard()
    for i in range(300):
        s.good(json.dumps({"text": f"Truncated shard line {i}: " + " ".join(
            f"{(i * 7919 + j * 104729) % 1000003:x}" for j in range(30))}))
    whole = gzip.compress(s.data())
    cut = whole[: len(whole) // 2]
    # What survives the cut, by plain zlib on the whole prefix at once.
    decoded = zlib.decompressobj(wbits=31).decompress(cut)
    complete = decoded[: decoded.rfind(b"\n") + 1].count(b"\n")
    truncated = Expected(read=complete + 1, accepted=complete,
                         rejects={complete + 1: "compressed stream truncated or corrupt"})
    files["truncated.jsonl.gz"], expected["truncated.jsonl.gz"] = cut, truncated

    s = _Shard()
    for i in range(5):
        s.good(_text(20 + i, "zstd"))
    frame = zstandard.ZstdCompressor().compress(_text(99, "lost").encode() + b"\n")
    corrupt = zstandard.ZstdCompressor().compress(s.data()) + frame[:4] + b"\xff" * 8 + frame[12:]
    s.expected.read += 1
    s.expected.rejects[6] = "compressed stream truncated or corrupt: zstd"
    put("corrupt.jsonl.zst", s, corrupt)

    s = _Shard()
    s.bad(_text(30), "compressed stream truncated or corrupt: gzip")  # not gzip at all
    put("not_gzip.jsonl.gz", s, s.data())

    put("empty.jsonl", _Shard(), b"")
    put("blank_lines.jsonl", _Shard(), b"\n  \n\t\n\r\n")
    put("empty.jsonl.gz", _Shard(), gzip.compress(b""))
    put("zero_bytes.jsonl.zst", _Shard(), b"")

    s = _Shard()  # through REFUSING_TEMPLATE
    s.good(_chat(("user", "Hi"), ("assistant", "Hello.")))
    s.bad(_chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")),
          "chat template error: System role not supported")
    s.bad(_chat(("user", "Hi"), ("user", "Hi again"), ("assistant", "Hello")),
          "chat template error: Conversation roles must alternate user/assistant/user/assistant/...")
    s.good(json.dumps({"messages": [{"role": "user" if i % 2 == 0 else "assistant",
                                     "content": f"turn {i}"} for i in range(10_000)]}))
    s.bad('{"messages": []}', "field 'messages' is empty")
    s.bad(_chat(("[/]", "markup is not a role"), ("assistant", "x")), "has unknown role '[/]'")
    s.bad(_chat(("user", ""), ("assistant", "")), "messages[0] (user) has empty content")
    s.bad(json.dumps({"conversations": [{"from": ["human"], "value": "x"}]}),
          "messages[0] has unknown role None")
    s.bad(_chat(("user", "q"), ("assistant", "\ud800")), "messages[1].content is not valid Unicode")
    s.dup(_chat(("user", "Hi"), ("assistant", "Hello.")))
    s.good(_chat(("user", "Bye"), ("assistant", "Goodbye.")))
    put("chat_refused.jsonl", s)

    s = _Shard()
    for i in range(5):
        s.good(json.dumps({"instruction": f"Add {i} and 2.", "output": f"{i + 2}"}))
    s.bad(json.dumps({"instruction": "", "input": "", "output": ""}), "field 'instruction' is empty")
    s.bad(json.dumps({"instruction": "q", "output": "a", "system": "Be nice."}),
          "chat template error: System role not supported")
    put("alpaca.jsonl", s)

    for name, data in files.items():
        (folder / name).write_bytes(data)
    return HostileCorpus(folder, tokenizer_dir, expected)


def run_cli(*args: str, timeout: float = 500, **kwargs) -> subprocess.CompletedProcess:
    """`python -m ray_app ARGS` in a subprocess. Started once more when its local Ray node
    did not come up within Ray's fixed 30 s (on 2 busy cores, it sometimes does not)."""
    for attempt in range(2):
        done = subprocess.run([sys.executable, "-m", "ray_app", *args], capture_output=True,
                              text=True, timeout=timeout, check=False, **kwargs)
        if attempt or "timed out during startup" not in done.stderr:
            return done
    raise AssertionError("unreachable")
