"""Hostile inputs: every line of a corpus built to break readers is accepted or rejected
with its file, line and a reason that names the problem, and nothing aborts the run."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from support import tiny_config, write_lines
from support_hostile import hostile_corpus, hostile_data_config, run_cli

from ray_app.config import validate_config
from ray_app.data.pipeline import prepare
from ray_app.data.report import render_report
from ray_app.data.sources import expand_sources
from ray_app.data.tokenize import PLAIN_PROMPT, RecordRules, TokenizeRecords, load_tokenizer
from ray_app.errors import UserError
from ray_app.quickstart import TOKENIZER_DIR


def _published(storage: Path) -> tuple[Path, dict]:
    (marker,) = storage.glob("datasets/*/report.json")
    published = json.loads(marker.read_text())
    return marker.parent / published["build"], published["report"]


def test_ray_app_data_accounts_for_every_line_of_a_hostile_corpus(tmp_path):
    corpus = hostile_corpus(tmp_path)
    cfg = tiny_config(corpus.folder, tmp_path, data=hostile_data_config())
    cfg["model"]["tokenizer"] = str(corpus.tokenizer)
    config = tmp_path / "hostile.yaml"
    config.write_text(yaml.safe_dump(cfg))
    done = run_cli("data", str(config), "--num-cpus", "2")
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in out, out[-5000:]

    build, report = _published(tmp_path / "storage")
    files = {Path(f["path"]).name: f for f in report["files"]}
    assert set(files) == set(corpus.expected)  # empty shards are listed too
    for name, want in corpus.expected.items():
        got = files[name]
        assert (got["records_read"], got["accepted"], got["rejected"], got["duplicates"]) == (
            want.read, want.accepted, want.rejected, want.duplicates), name

    # Counted again from the files themselves: one reject line per rejected record, and
    # one records/ row per record.
    lines = (tmp_path / "out/rejects/rejects.jsonl").read_text().split("\n")[:-1]
    rejects = [json.loads(x) for x in lines]
    found = {(Path(r["source"]).name, r["line"]): r["reason"] for r in rejects}
    assert len(found) == len(rejects)
    assert found.keys() == {(name, line) for name, want in corpus.expected.items()
                            for line in want.rejects}
    for (name, line), reason in found.items():
        assert corpus.expected[name].rejects[line] in reason, (name, line, reason)
    rows = Counter(Path(s).name for s in pq.read_table(build / "records", columns=["source"])
                   ["source"].to_pylist())
    assert rows == Counter({n: w.read for n, w in corpus.expected.items() if w.read})
    total = sum(w.rejected for w in corpus.expected.values())
    assert f"Rejected {total} records:" in " ".join(done.stdout.split())


def test_an_empty_train_set_is_a_user_error_naming_every_shard(ray_cluster, tmp_path):
    folder = tmp_path / "data"
    write_lines(folder / "empty.jsonl", [])
    write_lines(folder / "broken.jsonl", ['{"text": 1}', "{oops"])
    (folder / "cut.jsonl.gz").write_bytes(b"\x1f\x8b\x08")
    cfg = validate_config(tiny_config(folder, tmp_path))
    with pytest.raises(UserError) as err:
        prepare(cfg, cfg.storage_uri(), tmp_path / "rejects")
    message = str(err.value)
    assert message.startswith("There is nothing to train on")
    assert "empty.jsonl: no records (empty, or only blank lines)" in message
    assert "broken.jsonl: 2 records, 2 rejected" in message and "invalid JSON" in message
    assert "cut.jsonl.gz: 1 records, 1 rejected (1 x compressed stream truncated or corrupt)" in message
    assert len((tmp_path / "rejects/rejects.jsonl").read_text().splitlines()) == 3

    for shard in ("broken.jsonl", "cut.jsonl.gz"):  # nothing at all: no record, no reject
        (folder / shard).write_bytes(b"" if shard.endswith(".gz") else b"\n \n")
    with pytest.raises(UserError, match="Point data.train at shards that hold records") as err:
        prepare(cfg, cfg.storage_uri(), tmp_path / "rejects")
    assert str(err.value).count("no records (empty, or only blank lines)") == 3


def test_a_folder_without_shards_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="matches no JSONL shard"):
        expand_sources([str(tmp_path / "empty")])


def test_a_tokenizer_without_chat_template_trains_on_the_plain_prompt_and_says_so(
        ray_cluster, tmp_path):
    plain = load_tokenizer(str(TOKENIZER_DIR))
    plain.chat_template = None
    plain.save_pretrained(str(tmp_path / "plain_tokenizer"))
    assert not (tmp_path / "plain_tokenizer/chat_template.jinja").exists()
    write_lines(tmp_path / "data/chat.jsonl", [json.dumps({"messages": [
        {"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]})
        for i in range(5)])
    cfg = tiny_config(tmp_path / "data", tmp_path)
    cfg["model"]["tokenizer"] = str(tmp_path / "plain_tokenizer")
    cfg = validate_config(cfg)
    report = prepare(cfg, cfg.storage_uri(), tmp_path / "rejects").report
    (warning,) = report.warnings
    assert "has no chat template" in warning and repr(PLAIN_PROMPT) in warning
    assert "model.tokenizer" in warning and "chat_template.jinja" in warning
    from rich.console import Console

    console = Console(record=True, width=400)
    render_report(report, console)
    assert console.export_text().count("has no chat template") == 1


def _batch(lines: list[str], fmt: str) -> dict:
    n = len(lines)
    return {"source": np.array(["f.jsonl"] * n), "source_id": np.zeros(n, dtype=np.int32),
            "line": np.arange(1, n + 1), "text": np.array(lines, dtype=object),
            "bad_utf8": np.zeros(n, dtype=bool),
            "num_bytes": np.array([len(x.encode()) for x in lines]),
            "file_format": np.array([fmt] * n), "role": np.array(["train"] * n),
            "error": np.array([""] * n)}


def test_a_text_the_tokenizer_refuses_or_an_unforeseen_error_rejects_only_its_record(monkeypatch):
    tok = TokenizeRecords(str(TOKENIZER_DIR), RecordRules(max_seq_len=64))
    real = tok.tokenizer

    class Refusing:  # the real tokenizer, except that it refuses any text holding BOOM
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, texts, **kwargs):
            if any("BOOM" in t for t in texts):
                raise TypeError("TextEncodeInput must be Union[...]")
            return real(texts, **kwargs)

    tok.tokenizer = Refusing()
    lines = [json.dumps({"text": t}) for t in ("fine", "BOOM", "also fine", "KABOOM")]
    rows = tok(_batch(lines, "text")).to_pylist()
    assert [r["status"] for r in rows] == ["accepted", "rejected", "accepted", "rejected"]
    assert rows[1]["reason"] == "cannot tokenize: TypeError: TextEncodeInput must be Union[...] (text format)"

    from ray_app.data import tokenize

    def broken(*args, **kwargs):
        raise KeyError("no such thing")

    monkeypatch.setattr(tokenize, "to_turns", broken)
    (row,) = tok(_batch([json.dumps({"text": "x"})], "text")).to_pylist()
    assert row["reason"] == "unexpected error: KeyError: 'no such thing' (text format)"


def test_a_template_that_fails_in_python_rejects_with_the_error_type():
    tok = TokenizeRecords(str(TOKENIZER_DIR), RecordRules(max_seq_len=64))
    tok.tokenizer.chat_template = "{{ messages[0]['content'] + 1 }}"
    (row,) = tok(_batch([json.dumps({"instruction": "q", "output": "a"})], "alpaca")).to_pylist()
    assert row["reason"].startswith("chat template error: TypeError: ")


def test_a_very_long_conversation_is_rendered_only_as_far_as_the_token_limit():
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"}
             for i in range(3000)]
    line = json.dumps({"messages": turns})
    tok = TokenizeRecords(str(TOKENIZER_DIR), RecordRules(max_seq_len=64))
    started = time.perf_counter()
    (row,) = tok(_batch([line], "messages")).to_pylist()
    assert time.perf_counter() - started < 5  # all 1,500 trained turns: about a minute
    full = tok.tokenizer.apply_chat_template(turns[:40], tokenize=False)
    assert row["input_ids"] == tok.tokenizer(full, add_special_tokens=False)["input_ids"][:64]
    strict = TokenizeRecords(str(TOKENIZER_DIR), RecordRules(max_seq_len=64, truncation="reject"))
    (row,) = strict(_batch([line], "messages")).to_pylist()
    assert row["reason"].startswith("too long: more than ") and "data.max_seq_len=64" in row["reason"]
