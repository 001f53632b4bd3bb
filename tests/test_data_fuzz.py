"""Property-based fuzzing of the data path: whatever the bytes, every line is accepted or
rejected with a reason, nothing raises, and the counts add up when counted independently.

The per-line functions get many examples without Ray; `prepare()` on the session cluster
gets a few examples of many shards each (Ray Data costs seconds per prepare)."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support import tiny_config
from support_hostile import REFUSING_TEMPLATE

from ray_app.config import validate_config
from ray_app.data.decompress import StreamBreak, decompressed
from ray_app.data.formats import FORMATS, RecordError, Turn, parse_line, to_preference, to_turns
from ray_app.data.jsonl_datasource import _lines, _try_json
from ray_app.data.pipeline import prepare
from ray_app.data.tokenize import RecordRules, TokenizeRecords, load_tokenizer
from ray_app.quickstart import TOKENIZER_DIR

BOM = b"\xef\xbb\xbf"
BREAK = "compressed stream truncated or corrupt"

# --- what a line may hold ---------------------------------------------------------------

texts = st.text(max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12)
roles = st.sampled_from(["user", "assistant", "system", "tool", "", "[/]"]) | json_values
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": texts | json_values}),
                    max_size=6)
records = st.one_of(
    st.fixed_dictionaries({"text": texts}),
    st.fixed_dictionaries({"instruction": texts, "output": texts},
                          optional={"input": texts, "system": texts}),
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "system"]) | json_values, "value": texts}),
        max_size=4)}),
    st.fixed_dictionaries({"prompt": texts | messages, "chosen": texts | messages,
                           "rejected": texts}, optional={"system": texts}),
)


@st.composite
def damaged(draw, record=records):
    """A record with one field replaced by any JSON value or dropped."""
    value = dict(draw(record))
    if value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        if draw(st.booleans()):
            del value[key]
        else:
            value[key] = draw(json_values)
    return value


def _dump(value, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


hostile = st.one_of(
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(990, 1100).map(lambda n: b"[" * n),
    st.integers(4200, 4400).map(lambda n: b'{"text": "x", "n": ' + b"9" * n + b"}"),
    st.sampled_from([b'{"text": "\\ud800"}', b'{"text": "a\\udfff"}', b'{"text": NaN}',
                     b'{"text": "ok", "x": -Infinity}', b'{"text": "a", "text": "b"}',
                     b"[]", b'"s"', b"0", b"null", b"{}", b"\x00", b'{"text": "\x00"}',
                     b"\xff\xfe", b"\x0c", BOM, b"\r"]),
)


@st.composite
def lines(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind <= 3:
        line = _dump(draw(records), draw(st.booleans()))
    elif kind <= 5:
        line = _dump(draw(damaged()), draw(st.booleans()))
    elif kind == 6:
        line = _dump(draw(json_values), draw(st.booleans()))
    elif kind == 7:
        line = draw(hostile)
    elif kind == 8:
        line = draw(st.binary(max_size=80))
    else:
        line = draw(st.sampled_from([b"", b" ", b"\t \t", b"\r"]))
    return (BOM if draw(st.integers(0, 20)) == 0 else b"") + line


def _compress(data: bytes, codec: str) -> bytes:
    if codec == "gzip":
        return gzip.compress(data)
    if codec == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def _decode_prefix(cut: bytes, codec: str) -> bytes:
    """What a cut stream decodes to, by the codec libraries in one call."""
    if codec == "gzip":
        return zlib.decompressobj(wbits=31).decompress(cut)
    if codec == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(cut)
    return cut


def _is_blank(line: bytes) -> bool:
    """The documented rule: only spaces, tabs and CRs, after an optional byte-order mark."""
    return not line.removeprefix(BOM).strip(b" \t\r")


def expected_lines(data: bytes, codec: str, cut: int) -> tuple[list[bytes], bool]:
    """(lines the reader must hand on, whether it must report a break), from the bytes."""
    stored = _compress(data, codec)[:cut]
    decoded = _decode_prefix(stored, codec)
    broken = bool(codec) and 0 < cut < len(_compress(data, codec))
    if broken:  # the bytes after the last newline are the break, not a line
        decoded = decoded[: decoded.rfind(b"\n") + 1]
    found = decoded.split(b"\n")
    if found and found[-1] == b"":
        found.pop()
    return found, broken


# --- per-line functions, no Ray ---------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(line=lines())
def test_parse_line_gives_an_object_or_a_reason(line):
    text = line.decode("utf-8", errors="replace")
    try:
        record = parse_line(text)
    except RecordError as err:
        assert str(err)
    else:
        assert isinstance(record, dict)
    assert _try_json(line) is None or isinstance(_try_json(line), dict)


@settings(max_examples=400, deadline=None)
@given(record=damaged() | st.dictionaries(texts, json_values, max_size=4),
       fmt=st.sampled_from(FORMATS))
def test_formats_give_turns_or_a_reason(record, fmt):
    for convert in (lambda: to_turns(record, fmt), lambda: to_preference(record)):
        try:
            turns = convert()
        except RecordError as err:
            assert str(err)
            continue
        turns = turns if isinstance(turns, list) else [*turns.prompt, turns.chosen, turns.rejected]
        assert all(isinstance(t, Turn) and isinstance(t.content, str) for t in turns)
        assert all(t.content.encode("utf-8") is not None for t in turns)  # no lone surrogate


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The bundled tokenizer, and a copy whose template refuses system roles and
    non-alternating conversations."""
    refusing = load_tokenizer(str(TOKENIZER_DIR))
    refusing.chat_template = REFUSING_TEMPLATE
    folder = tmp_path_factory.mktemp("refusing_tokenizer")
    refusing.save_pretrained(str(folder))
    rules = RecordRules(max_seq_len=32, max_record_bytes=2000, min_tokens=2)
    return [TokenizeRecords(str(TOKENIZER_DIR), rules), TokenizeRecords(str(folder), rules)]


def _batch(raw_lines: list[bytes], fmt: str, errors: list[str] | None = None) -> dict:
    texts, bad = [], []
    for raw in raw_lines:
        try:
            texts.append(raw.decode("utf-8"))
            bad.append(False)
        except UnicodeDecodeError:
            texts.append(raw.decode("utf-8", errors="replace"))
            bad.append(True)
    n = len(raw_lines)
    return {"source": np.array(["f.jsonl"] * n, dtype=object),
            "source_id": np.zeros(n, dtype=np.int32), "line": np.arange(1, n + 1),
            "text": np.array(texts, dtype=object), "bad_utf8": np.array(bad),
            "num_bytes": np.array([len(r) for r in raw_lines]),
            "file_format": np.array([fmt] * n, dtype=object),
            "role": np.array(["train"] * n, dtype=object),
            "error": np.array(errors or [""] * n, dtype=object)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_lines=st.lists(lines(), min_size=1, max_size=12),
       fmt=st.sampled_from(["", *FORMATS]), which=st.integers(0, 1),
       breaks=st.lists(st.booleans(), min_size=12, max_size=12))
def test_tokenize_records_turns_every_line_into_one_row(tokenizers, raw_lines, fmt, which, breaks):
    tok = tokenizers[which]
    errors = [f"{BREAK}: test" if b else "" for b in breaks[:len(raw_lines)]]
    batch = _batch(raw_lines, fmt, errors)
    rows = tok(batch).to_pylist()
    assert [r["line"] for r in rows] == list(range(1, len(raw_lines) + 1))
    for i, row in enumerate(rows):
        assert row["status"] in ("accepted", "rejected")
        if errors[i]:
            assert row["status"] == "rejected" and row["reason"].startswith(BREAK)
        if row["status"] == "rejected":
            assert row["reason"] and not row["input_ids"]
        else:
            assert len(row["input_ids"]) == len(row["labels"]) == row["num_tokens"] <= 32
            assert row["trained_tokens"] > 0 and row["content_hash"]
        alone = tok.one(batch, i)  # one record on its own comes out the same
        assert (alone["status"], alone["reason"]) == (row["status"], row["reason"])


@st.composite
def chunked(draw, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.binary(max_size=30) | st.sampled_from([b"\n", b"\r\n", b"\n\n"]),
                     max_size=20).map(b"".join),
       max_bytes=st.integers(0, 12), pieces=st.data())
def test_lines_do_not_depend_on_chunk_boundaries(data, max_bytes, pieces):
    chunks = pieces.draw(chunked(data))
    got = [(x.number, x.raw, x.size, x.error) for x in _lines(iter(chunks), max_bytes)]
    want = data.split(b"\n")
    if want[-1] == b"":
        want.pop()
    assert got == [(i + 1, line[:max_bytes + 1], len(line), "") for i, line in enumerate(want)]


class _Raw:
    """A raw stream that returns fewer bytes than asked, at random, as networks do."""

    def __init__(self, data: bytes, sizes: list[int]):
        self.data, self.sizes, self.pos = data, sizes or [1 << 20], 0

    def read(self, n: int) -> bytes:
        size = min(n, self.sizes[self.pos % len(self.sizes)] or 1)
        out = self.data[self.pos:self.pos + size]
        self.pos += len(out)
        return out


@settings(max_examples=300, deadline=None)
@given(body=st.lists(lines(), max_size=30), codec=st.sampled_from(["gzip", "zstd", ""]),
       cut=st.floats(0, 1), sizes=st.lists(st.integers(1, 5000), max_size=4))
def test_a_cut_stream_keeps_its_complete_lines_and_reports_one_break(body, codec, cut, sizes):
    data = b"".join(line + b"\n" for line in body)
    at = int(len(_compress(data, codec)) * cut)
    stored = _compress(data, codec)[:at]
    got = list(_lines(decompressed(_Raw(stored, sizes).read, codec), 100))
    want, broken = expected_lines(data, codec, at)
    assert [x.raw for x in got[:len(want)]] == [w[:101] for w in want]
    assert [x.error for x in got[:len(want)]] == [""] * len(want)
    assert len(got) == len(want) + broken
    if broken:
        assert got[-1].number == len(want) + 1 and got[-1].error.startswith(BREAK)


@settings(max_examples=200, deadline=None)
@given(body=st.lists(lines(), max_size=30), codec=st.sampled_from(["gzip", "zstd"]),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_a_corrupt_stream_never_raises_and_breaks_at_most_once_at_the_end(body, codec, flips):
    stored = bytearray(_compress(b"".join(line + b"\n" for line in body), codec))
    for where, xor in flips:
        stored[min(int(where * len(stored)), len(stored) - 1)] ^= xor
    got = list(_lines(decompressed(io.BytesIO(bytes(stored)).read, codec), 100))
    assert [x.number for x in got] == list(range(1, len(got) + 1))
    assert all(not x.error for x in got[:-1])
    assert not got or not got[-1].error or got[-1].error.startswith(BREAK)


def test_a_read_error_that_is_not_transient_ends_the_file_with_a_break():
    from ray_app.data.jsonl_datasource import _raw_reader

    class Failing:
        def __init__(self):
            self.calls = 0

        def read(self, n):
            self.calls += 1
            if self.calls > 1:
                raise OSError("disk says no")
            return b'{"text": "a"}\n{"text": "b'

    got = list(_lines(decompressed(_raw_reader(Failing()), ""), 100))
    assert [(x.number, x.error) for x in got] == [(1, ""), (2, "file could not be read: disk says no")]

    class Transient:
        def read(self, n):
            raise OSError("AWS Error SLOW_DOWN during GetObject operation")

    with pytest.raises(OSError, match="SLOW_DOWN"):  # Ray Data retries these
        list(_lines(decompressed(_raw_reader(Transient()), ""), 100))


def test_decompressed_raises_only_stream_breaks():
    with pytest.raises(StreamBreak, match="gzip"):
        list(decompressed(io.BytesIO(b"plain text, not gzip").read, "gzip"))


# --- the whole data path on the session Ray cluster ----------------------------------------


@st.composite
def shards(draw):
    return {"lines": draw(st.lists(lines(), max_size=40)),
            "codec": draw(st.sampled_from(["", "gzip", "zstd"])),
            "cut": draw(st.none() | st.floats(0, 1)),
            "crlf": draw(st.booleans()),
            "format": draw(st.sampled_from(["auto", "auto", *FORMATS]))}


ANCHOR = [json.dumps({"text": f"Anchor record {i}: always trainable."}).encode() for i in range(8)]


@pytest.mark.ray
@settings(max_examples=4, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(corpus=st.lists(shards(), min_size=1, max_size=8))
def test_prepare_accounts_for_every_line_of_random_shards(ray_cluster, corpus):
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-"))
    folder = tmp / "data"
    folder.mkdir()
    expected: dict[str, tuple[int, int | None]] = {}  # name -> (records, line of the break)
    sources = [{"path": str(folder / "anchor.jsonl"), "format": "text"}]
    (folder / "anchor.jsonl").write_bytes(b"".join(x + b"\n" for x in ANCHOR))
    expected["anchor.jsonl"] = (len(ANCHOR), None)
    for i, shard in enumerate(corpus):
        name = f"s{i}.jsonl" + {"": "", "gzip": ".gz", "zstd": ".zst"}[shard["codec"]]
        data = b"".join(x + (b"\r\n" if shard["crlf"] else b"\n") for x in shard["lines"])
        full = _compress(data, shard["codec"])
        at = len(full) if shard["cut"] is None else int(len(full) * shard["cut"])
        (folder / name).write_bytes(full[:at])
        found, broken = expected_lines(data, shard["codec"], at)
        expected[name] = (sum(not _is_blank(x) for x in found) + broken,
                          len(found) + 1 if broken else None)
        sources.append({"path": str(folder / name), "format": shard["format"]})
    cfg = validate_config(tiny_config(sources, tmp, data={
        "eval_fraction": 0.2, "max_seq_len": 48, "max_record_bytes": 4000, "tokenize_actors": 1}))

    prepared = prepare(cfg, cfg.storage_uri(), tmp / "rejects")

    report = prepared.report
    read = {Path(f.path).name: f.records_read for f in report.files}
    assert read == {name: n for name, (n, _) in expected.items()}
    records = pq.read_table(prepared.records_path, columns=["source", "line", "status", "reason"])
    rows = Counter((Path(s).name, st_) for s, st_ in zip(records["source"].to_pylist(),
                                                         records["status"].to_pylist()))
    # One JSON object per "\n": str.splitlines would also split at U+2028 inside a string.
    rejects = [json.loads(x) for x in (tmp / "rejects/rejects.jsonl").read_text().split("\n")[:-1]]
    assert len({(r["source"], r["line"]) for r in rejects}) == len(rejects)
    rejected = Counter(Path(r["source"]).name for r in rejects)
    for f in report.files:
        name = Path(f.path).name
        assert rows[name, "accepted"] + rows[name, "rejected"] == expected[name][0]
        assert rows[name, "rejected"] == rejected[name] == f.rejected
        assert rows[name, "accepted"] == f.accepted + f.duplicates
        if expected[name][1]:
            (why,) = [r["reason"] for r in rejects
                      if Path(r["source"]).name == name and r["line"] == expected[name][1]]
            assert why.startswith(BREAK)
    train = prepared.split("train").take_all()
    documents = sum(int((np.asarray(r["position_ids"]) == 0).sum()) for r in train)
    eval_rows = prepared.split("eval").count() if report.eval_records else 0
    assert documents + eval_rows == report.accepted
