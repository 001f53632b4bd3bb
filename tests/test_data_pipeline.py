"""The Ray Data path end to end: every input line is trained on or reported as rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import zstandard
from conftest import tiny_config, write_lines

from ray_app.config import validate_config
from ray_app.data.pipeline import prepare
from ray_app.errors import UserError

pytestmark = pytest.mark.ray


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


def test_every_line_is_accepted_or_rejected_with_file_line_and_reason(ray_cluster, messy, tmp_path):
    prepared = _prepare(tiny_config(messy, tmp_path), tmp_path)
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


def test_tokenized_data_is_cached_and_reused(ray_cluster, messy, tmp_path):
    first = _prepare(tiny_config(messy, tmp_path), tmp_path)
    again = _prepare(tiny_config(messy, tmp_path), tmp_path)
    assert not first.cached and again.cached
    assert again.report == first.report and again.path == first.path
    changed = _prepare(tiny_config(messy, tmp_path, data={"max_seq_len": 32}), tmp_path)
    assert not changed.cached and changed.path != first.path


def test_train_split_streams_padded_token_rows(ray_cluster, small_data, tmp_path):
    prepared = _prepare(tiny_config(small_data, tmp_path), tmp_path)
    assert prepared.report.balanced() and prepared.report.rejected == 0
    rows = prepared.split("train").take_all()
    assert len(rows) == prepared.report.train_records
    assert {"input_ids", "labels"} == set(rows[0])
    assert all(len(r["input_ids"]) == len(r["labels"]) <= 64 for r in rows)
    assert prepared.split("eval").count() == prepared.report.eval_records > 0


def test_explicit_eval_shards_are_the_eval_split(ray_cluster, small_data, tmp_path):
    cfg = tiny_config([str(small_data / "a.jsonl")], tmp_path,
                      data={"eval": [str(small_data / "t.jsonl")]})
    report = _prepare(cfg, tmp_path).report
    assert (report.train_records, report.eval_records) == (160, 60)


def test_missing_data_path_is_a_clear_error(ray_cluster, tmp_path):
    with pytest.raises(UserError, match="matches no JSONL shard"):
        _prepare(tiny_config([str(tmp_path / "nowhere/*.jsonl")], tmp_path), tmp_path)
