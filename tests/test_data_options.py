"""Data options on one mixed corpus: dedup, per-source format/fields/weight, preference
pairs, trained roles, length and size limits, strict mode, and the per-source report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import tiny_config, write_lines

from ray_app.config import validate_config
from ray_app.data.pipeline import prepare
from ray_app.data.report import render_report
from ray_app.data.tokenize import IGNORE, load_tokenizer
from ray_app.errors import UserError
from ray_app.quickstart import TOKENIZER_DIR

pytestmark = pytest.mark.ray


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _rows(rows: list[dict]) -> list[dict]:
    return [{k: np.asarray(v) for k, v in r.items()} for r in rows]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mixed")
    write_lines(folder / "chat_a.jsonl", [json.dumps(_chat(f"What is {i} + 1?", f"It is {i + 1}."))
                                          for i in range(30)])
    write_lines(folder / "chat_b.jsonl", [
        json.dumps(_chat("What is 3 + 1?", "It is 4.")),               # 1: duplicate of chat_a:4
        json.dumps(_chat("What is  5 +\n1?", "It is   6.")),          # 2: same after whitespace
        json.dumps(_chat("What is 3 + 1?", "It is 4.")),               # 3: duplicate again
        json.dumps(_chat("Hi", "word " * 300)),                       # 4: > max_tokens
        json.dumps(_chat("Tell me a color.", "Blue.")),                # 5: fine
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant",
                                                                     "content": ""}]}),  # 6
    ])
    write_lines(folder / "qa.jsonl", [json.dumps({"question": f"Name #{i}?", "answer": f"No {i}."})
                                      for i in range(10)]
                + [json.dumps({"question": "Unique weighted question?", "answer": "Zebra."})])
    write_lines(folder / "prefs.jsonl", [
        json.dumps({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}),
        json.dumps({"prompt": [{"role": "user", "content": "2 + 2?"}],
                    "chosen": [{"role": "assistant", "content": "4."}], "rejected": "5."}),
        json.dumps({"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."}),  # 3: identical
        json.dumps({"prompt": "No rejected?", "chosen": "Right."}),           # 4: missing field
    ])
    write_lines(folder / "big.jsonl", [json.dumps({"text": "A short fact."}),
                                       json.dumps({"text": "y" * 3000})])  # 2: too many bytes
    return folder


def _config(mixed: Path, tmp: Path, **data) -> dict:
    sources = [str(mixed / "chat_*.jsonl"), str(mixed / "big.jsonl"),
               {"path": str(mixed / "qa.jsonl"), "format": "alpaca", "weight": 3,
                "fields": {"instruction": "question", "output": "answer"}},
               {"path": str(mixed / "prefs.jsonl")}]
    return tiny_config([], tmp, data={"train": sources, "eval_fraction": 0.0, "max_seq_len": 64,
                                      "max_tokens": 200, "max_record_bytes": 2000,
                                      "packing": True, **data})


@pytest.fixture(scope="module")
def prepared(ray_cluster, mixed, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed_run")
    cfg = validate_config(_config(mixed, tmp))
    return prepare(cfg, cfg.storage_uri(), tmp / "rejects"), tmp


def _per_file(report) -> dict:
    return {Path(f.path).name: f for f in report.files}


def test_every_record_is_accounted_for_per_source(prepared):
    report = prepared[0].report
    assert report.balanced()
    files = _per_file(report)
    assert {n: (f.records_read, f.accepted, f.rejected, f.duplicates) for n, f in files.items()} == {
        "chat_a.jsonl": (30, 30, 0, 0), "chat_b.jsonl": (6, 1, 2, 3),
        "qa.jsonl": (11, 11, 0, 0), "prefs.jsonl": (4, 2, 2, 0), "big.jsonl": (2, 1, 1, 0)}
    assert {n: f.format for n, f in files.items()} == {
        "chat_a.jsonl": "messages", "chat_b.jsonl": "messages", "qa.jsonl": "alpaca",
        "prefs.jsonl": "preference", "big.jsonl": "text"}
    assert files["qa.jsonl"].weight == 3


def test_exact_duplicates_across_shards_are_counted_not_trained(prepared):
    data, _ = prepared
    assert data.report.duplicates == 3
    assert data.report.train_records == 45
    rows = _rows(data.split("train").take_all())
    docs = sum(int((r["position_ids"] == 0).sum()) for r in rows)
    assert docs == 45 - 11 + 3 * 11  # qa.jsonl weighted 3x; duplicates gone


def test_duplicates_found_in_the_driver_and_by_a_ray_shuffle_agree(prepared, monkeypatch):
    """Small datasets find duplicates in the driver, large ones through a Ray Data groupby."""
    from ray_app.data import pipeline

    data, _ = prepared
    in_driver = pipeline.find_duplicates(data.records_path)
    monkeypatch.setattr(pipeline, "DRIVER_DEDUP_MAX_RECORDS", 0)
    shuffled = pipeline.find_duplicates(data.records_path)
    assert len(in_driver) == data.report.duplicates == 3
    assert np.array_equal(in_driver, shuffled)


def test_rejects_name_source_line_and_reason(prepared):
    data, tmp = prepared
    rejects = [json.loads(x) for x in (tmp / "rejects/rejects.jsonl").read_text().splitlines()]
    found = {(Path(r["source"]).name, r["line"]): r["reason"] for r in rejects}
    assert found[("chat_b.jsonl", 4)].startswith("too long: ")
    assert "data.max_tokens=200" in found[("chat_b.jsonl", 4)]
    assert "messages[1] (assistant) has empty content" in found[("chat_b.jsonl", 6)]
    assert found[("prefs.jsonl", 3)].startswith("'chosen' and 'rejected' are the same answer")
    assert found[("prefs.jsonl", 4)] == "missing field 'rejected' (preference format)"
    assert found[("big.jsonl", 2)] == "record too large: 3012 bytes > data.max_record_bytes=2000"
    per_source = _per_file(data.report)["chat_b.jsonl"].reject_reasons
    assert per_source == {"too long": 1, "messages[1] (assistant) has empty content (messages format)": 1}
    assert sum(data.report.reject_reasons.values()) == data.report.rejected == 5


def test_field_mapping_and_weight_repeat_a_source(prepared):
    data, _ = prepared
    tok = load_tokenizer(str(TOKENIZER_DIR))
    text = "".join(tok.decode(r["input_ids"]) for r in _rows(data.split("train").take_all()))
    assert text.count("Unique weighted question?") == 3 and text.count("Zebra.") == 3


def test_preference_pairs_train_on_chosen_and_keep_rejected_tokens(prepared):
    import ray

    data, _ = prepared
    rows = (ray.data.read_parquet(data.records_path)
            .filter(lambda r: r["format"] == "preference" and r["status"] == "accepted").take_all())
    tok = load_tokenizer(str(TOKENIZER_DIR))
    first = next(r for r in rows if r["line"] == 1)
    trained = tok.decode([i for i, lab in zip(first["input_ids"], first["labels"]) if lab != IGNORE])
    rejected = tok.decode([i for i, lab in zip(first["rejected_input_ids"],
                                                first["rejected_labels"]) if lab != IGNORE])
    assert trained.startswith("Paris.") and rejected.startswith("Rome.")
    assert "Capital of France?" in tok.decode(first["rejected_input_ids"])


def test_packed_rows_restart_positions_and_mask_each_first_label(prepared):
    rows = _rows(prepared[0].split("train").take_all())
    for r in rows:
        starts = np.flatnonzero(r["position_ids"] == 0)
        assert starts[0] == 0 and (r["labels"][starts] == IGNORE).all()
        ends = np.append(starts[1:], len(r["position_ids"]))
        for s, e in zip(starts, ends):
            assert (r["position_ids"][s:e] == np.arange(e - s)).all()


def test_report_renders_per_source_reasons(prepared):
    from rich.console import Console

    console = Console(record=True, width=1000)  # no cell wraps, however long the tmp path
    render_report(prepared[0].report, console)
    out = console.export_text()
    assert "chat_b.jsonl" in out and "1 too long" in out and "packing efficiency" in out


def test_strict_mode_makes_any_rejection_fatal(prepared, mixed):
    data, tmp = prepared
    cfg = validate_config(_config(mixed, tmp, strict=True))
    with pytest.raises(UserError, match=r"data.strict is on and 5 of 53 records were rejected"):
        prepare(cfg, cfg.storage_uri(), tmp / "strict_rejects")
    assert len((tmp / "strict_rejects/rejects.jsonl").read_text().splitlines()) == 5
    assert data.report.balanced()


def test_trained_roles_and_reject_truncation_change_labels(ray_cluster, tmp_path):
    folder = tmp_path / "roles"
    write_lines(folder / "c.jsonl", [json.dumps(_chat("Short?", "Yes.")),
                                     json.dumps(_chat("Long " * 80, "No."))])
    cfg = validate_config(tiny_config(folder, tmp_path, data={
        "train_on_roles": ["user", "assistant"], "truncation": "reject", "eval_fraction": 0.0,
        "min_tokens": 5, "dedup": False, "packing": False}))
    data = prepare(cfg, cfg.storage_uri(), tmp_path / "rejects")
    assert data.report.balanced() and data.report.rejected == 1
    assert data.report.files[0].reject_reasons == {"too long": 1}
    (row,) = _rows(data.split("train").take_all())
    tok = load_tokenizer(str(TOKENIZER_DIR))
    trained = tok.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE])
    assert "Short?" in trained and "Yes." in trained and "Be brief." not in trained
