"""The Ray Data path end to end: every input line is trained on or reported as rejected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zstandard
from support import tiny_config, write_lines

from ray_app.config import validate_config
from ray_app.data.pipeline import prepare
from ray_app.errors import UserError

pytestmark = pytest.mark.ray


def _rows(rows: list[dict]) -> list[dict]:
    return [{k: np.asarray(v) for k, v in r.items()} for r in rows]


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("messy")
    good_alpaca = json.dumps({"instruction": "Add.", "input": "1 + 1", "output": "2"})
    write_lines(folder / "alpaca.jsonl", [
        good_alpaca,
        '{"instruction": "Add.", "input": "1 + 2"',            # 2: truncated JSON
        "",                                                     # blank: layout, not a record
        json.dumps({"instruction": "Add.", "input": "2 + 2"}),  # 4: no output
        "\ufeff" + json.dumps({"instruction": "Sub.", "input": "3 - 1", "output": "2"}),  # BOM ok
        json.dumps({"instruction": "Add.", "input": "5 + 5", "output": "10"}),
    ])
    write_lines(folder / "chat.jsonl.gz", [
        json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}]}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),  # 2: unknown role
        b'{"messages": [{"role": "user", "content": "caf\xe9"}]}',      # 3: not UTF-8
        json.dumps({"messages": [{"role": "user", "content": "Q"},
                                 {"role": "assistant", "content": "A."}]}),
    ], compress=True)
    crlf = "\r\n".join([json.dumps({"text": "One fact."}), json.dumps({"text": 7}),
                        json.dumps({"text": "Two facts."})]) + "\r\n"
    (folder / "facts.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(crlf.encode()))
    return folder


def _prepare(cfg_dict, tmp_path):
    cfg = validate_config(cfg_dict)
    return prepare(cfg, cfg.storage_uri(), tmp_path / "rejects")


@pytest.fixture(scope="module")
def messy_run(ray_cluster, messy, tmp_path_factory):
    """The messy shards prepared once (fresh cache) for the tests of this module."""
    tmp = tmp_path_factory.mktemp("messy_run")
    return _prepare(tiny_config(messy, tmp), tmp), tmp


def test_every_line_is_accepted_or_rejected_with_file_line_and_reason(messy_run):
    prepared, tmp_path = messy_run
    report = prepared.report
    assert report.balanced()
    assert (report.records_read, report.accepted, report.rejected) == (12, 7, 5)
    assert report.train_records + report.eval_records == report.accepted
    per_file = {Path(f.path).name: (f.records_read, f.accepted, f.rejected) for f in report.files}
    assert per_file == {"alpaca.jsonl": (5, 3, 2), "chat.jsonl.gz": (4, 2, 2),
                        "facts.jsonl.zst": (3, 2, 1)}
    rejects = [json.loads(x) for x in (tmp_path / "rejects/rejects.jsonl").read_text().splitlines()]
    found = {(Path(r["source"]).name, r["line"]): r["reason"] for r in rejects}
    assert found.keys() == {("alpaca.jsonl", 2), ("alpaca.jsonl", 4), ("chat.jsonl.gz", 2),
                            ("chat.jsonl.gz", 3), ("facts.jsonl.zst", 2)}
    assert found[("alpaca.jsonl", 4)] == "missing field 'output' (alpaca format)"
    assert found[("chat.jsonl.gz", 3)] == "line is not valid UTF-8"
    assert "unknown role 'wizard'" in found[("chat.jsonl.gz", 2)]
    assert all(r["raw"] for r in rejects)


def test_tokenized_data_is_cached_and_reused(messy, messy_run, tmp_path):
    first, first_tmp = messy_run
    again = _prepare(tiny_config(messy, first_tmp), tmp_path)  # same storage, new output
    assert not first.cached and again.cached and again.report.balanced()
    assert again.report == first.report and again.path == first.path
    assert (tmp_path / "rejects/rejects.jsonl").read_text() == (
        first_tmp / "rejects/rejects.jsonl").read_text()
    changed = _prepare(tiny_config(messy, first_tmp, data={"max_seq_len": 32}), tmp_path)
    assert not changed.cached and changed.path != first.path and changed.report.balanced()


def test_train_split_streams_packed_sequences(ray_cluster, small_data, tmp_path):
    prepared = _prepare(tiny_config(small_data, tmp_path), tmp_path)
    report = prepared.report
    assert report.balanced() and report.rejected == 0
    rows = _rows(prepared.split("train").take_all())
    assert len(rows) == report.train_sequences < report.train_records  # several per row
    assert {"input_ids", "labels", "position_ids"} == set(rows[0])
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= 64
               for r in rows)
    docs = sum(int((r["position_ids"] == 0).sum()) for r in rows)
    assert docs == report.train_records  # every train record in exactly one sequence
    assert sum(len(r["input_ids"]) for r in rows) == report.sequence_tokens == report.train_tokens
    assert report.packing_efficiency == pytest.approx(report.sequence_tokens / (64 * len(rows)))
    assert report.packing_efficiency > 0.8
    assert prepared.split("eval").count() == report.eval_records > 0


def test_explicit_eval_shards_are_the_eval_split(ray_cluster, small_data, tmp_path):
    cfg = tiny_config([str(small_data / "a.jsonl")], tmp_path,
                      data={"eval": [str(small_data / "t.jsonl")]})
    report = _prepare(cfg, tmp_path).report
    assert report.balanced()  # the generated alpaca shard repeats some records
    assert (report.train_records + report.duplicates, report.eval_records) == (160, 60)
    assert report.duplicates == report.files[0].duplicates > 0


def test_missing_data_path_is_a_clear_error(ray_cluster, tmp_path):
    with pytest.raises(UserError, match="matches no JSONL shard"):
        _prepare(tiny_config([str(tmp_path / "nowhere/*.jsonl")], tmp_path), tmp_path)

