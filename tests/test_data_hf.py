"""Hugging Face datasets as sources: Parquet and Arrow shards, `save_to_disk` folders and
hf:// Hub ids, read row by row and accounted like JSONL lines."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ONE_WORKER, tiny_config

from ray_app.config import validate_config
from ray_app.data.hub import PARQUET_REVISION, expand_hub
from ray_app.data.sources import expand_sources
from ray_app.data.tables import table_rows
from ray_app.errors import UserError

ALPACA_FIELDS = {"instruction": "question", "output": "answer"}
CHAT_FIELDS = {"messages": "dialog", "role": "speaker", "content": "utterance"}


def qa(i: int) -> dict:
    return {"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}.", "id": i}


def chat(i: int, role: str = "assistant", reply: str | None = None) -> dict:
    return {"dialog": [{"speaker": "user", "utterance": f"Say the number {i}."},
                       {"speaker": role, "utterance": f"{i}!" if reply is None else reply}]}


def write_arrow_stream(path: Path, rows: list[dict], batch_rows: int = 4) -> None:
    """An Arrow IPC stream, as datasets.save_to_disk writes it."""
    table = pa.Table.from_pylist(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=batch_rows)


def save_to_disk(folder: Path, splits: dict[str, list[dict]]) -> Path:
    """A DatasetDict laid out as `datasets.DatasetDict.save_to_disk` lays it out."""
    for split, rows in splits.items():
        name = "data-00000-of-00001.arrow"
        write_arrow_stream(folder / split / name, rows)
        (folder / split / "state.json").write_text(json.dumps(
            {"_data_files": [{"filename": name}], "_fingerprint": "0", "_format_type": None,
             "_split": split}))
        (folder / split / "dataset_info.json").write_text("{}")
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    return folder


def rows_of(path: Path) -> list[tuple[int, dict | None, str]]:
    """(number, record, error) of each row the reader yields for a local file."""
    with pa.OSFile(str(path)) as f:
        return [(n, json.loads(raw) if raw and not err else None, err)
                for n, raw, _, err in table_rows(f, str(path), 1 << 20)]


# --- the row reader ------------------------------------------------------------------------

def test_parquet_and_arrow_rows_read_as_numbered_json_records(tmp_path):
    rows = [qa(i) for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=3)
    write_arrow_stream(tmp_path / "s.arrow", rows)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:  # an IPC file (Feather v2)
        writer.write_table(table, max_chunksize=4)
    for name in ("a.parquet", "s.arrow", "f.arrow"):
        assert rows_of(tmp_path / name) == [(i + 1, r, "") for i, r in enumerate(rows)], name


def test_a_value_json_cannot_hold_rejects_its_row_only(tmp_path):
    rows = [{"text": "kept", "blob": None}, {"text": "has bytes", "blob": b"\x00\x01"},
            {"text": "kept too", "blob": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b.parquet")
    got = rows_of(tmp_path / "b.parquet")
    assert [(n, err) for n, _, err in got] == [
        (1, ""), (2, ("column 'blob' holds binary data (bytes), which a JSON record cannot hold "
                     "(text columns only)")), (3, "")]


def _table_bytes(kind: str, rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    if kind == "parquet":
        pq.write_table(table, sink, row_group_size=5)
    else:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=5)
    return sink.getvalue().to_pybytes()


ORIGINAL = [qa(i) for i in range(23)]
FILES = {kind: _table_bytes(kind, ORIGINAL) for kind in ("parquet", "arrow")}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["parquet", "arrow"]), cut=st.integers(0, 4000),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=3))
def test_a_damaged_table_never_raises_and_numbers_every_row_it_reads(kind, cut, flips):
    """Cut short and with random bytes overwritten, a Parquet or Arrow file yields rows
    1..n with at most one break, the last; a file only cut short yields the original rows
    before the break (an Arrow stream cut exactly between two batches reads as a shorter
    stream: its format has no footer that would tell)."""
    data = bytearray(FILES[kind][:cut])
    for at, value in flips:
        if at < len(data):
            data[at] = value
    got = list(table_rows(pa.BufferReader(bytes(data)), f"x.{kind}", 1 << 20))
    assert [n for n, *_ in got] == list(range(1, len(got) + 1))
    breaks = [i for i, (_, _, _, err) in enumerate(got) if "truncated or corrupt" in err]
    assert breaks in ([], [len(got) - 1])
    if not flips:
        good = [json.loads(raw) for _, raw, _, err in got if not err]
        assert good == ORIGINAL[:len(good)]
        if kind == "parquet":  # whole, nothing, or a break that says so
            assert breaks or len(good) in (0, len(ORIGINAL))


# --- save_to_disk folders ------------------------------------------------------------------

def test_a_saved_dataset_dict_gives_the_chosen_split_and_names_the_ones_it_has(tmp_path):
    saved = save_to_disk(tmp_path / "saved", {"train": [chat(1)], "test": [chat(2)]})
    train = expand_sources([str(saved)])
    assert train == [str(saved / "train" / "data-00000-of-00001.arrow")]
    assert expand_sources([str(saved)], "data.eval", role="eval") == [
        str(saved / "test" / "data-00000-of-00001.arrow")]  # no validation split: test
    with pytest.raises(UserError, match=r"no split 'dev'; its splits: test, train. Set split:"):
        expand_sources([str(saved)], split="dev")
    # In a plain folder above it, its metadata files are not JSONL shards.
    assert expand_sources([str(tmp_path)]) == sorted(
        str(saved / s / "data-00000-of-00001.arrow") for s in ("test", "train"))
    with pytest.raises(UserError, match="split: 'train' applies to save_to_disk folders"):
        expand_sources([str(tmp_path)], split="train")


def test_datasets_save_to_disk_output_is_read_row_for_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [qa(i) for i in range(7)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:2])}
                         ).save_to_disk(str(tmp_path / "saved"))
    [train] = expand_sources([str(tmp_path / "saved")])
    assert [r for _, r, _ in rows_of(Path(train))] == rows
    [val] = expand_sources([str(tmp_path / "saved")], role="eval")
    assert [r for _, r, _ in rows_of(Path(val))] == rows[:2]


# --- Hub ids -------------------------------------------------------------------------------

def hub_mirror(root: Path):
    """A local fsspec filesystem laid out as HfFileSystem (datasets/ORG/NAME@REV/...)."""
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    return DirFileSystem(path=str(root), fs=LocalFileSystem())


def _touch(root: Path, repo: str, revision: str, files: list[str], readme: str = "") -> None:
    from urllib.parse import quote

    base = root / "datasets" / f"{repo}@{quote(revision, safe='')}"
    for name in files:
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_bytes(b"")
    if readme:
        (base / "README.md").write_text(readme)


def test_hub_splits_follow_the_file_names_as_on_the_hub(tmp_path):
    _touch(tmp_path, "org/qa", "main", [
        "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
        "data/validation-00000-of-00001.parquet", "data/test-00000-of-00001.parquet",
        ".gitattributes"])
    fs = hub_mirror(tmp_path)
    def get(**kw):
        return expand_hub("hf://datasets/org/qa", key="data.train", fs=fs,
                          **{"subset": None, "split": None, "revision": None, "role": "train",
                             **kw})

    assert get() == [f"hf://datasets/org/qa@main/data/train-0000{i}-of-00002.parquet"
                     for i in range(2)]
    assert get(role="eval") == ["hf://datasets/org/qa@main/data/validation-00000-of-00001.parquet"]
    assert get(split="test") == ["hf://datasets/org/qa@main/data/test-00000-of-00001.parquet"]
    with pytest.raises(UserError, match="no split 'dev'; its splits: test, train, validation"):
        get(split="dev")
    with pytest.raises(UserError, match="no subset 'fr'; its subsets: default"):
        get(subset="fr")


def test_hub_subsets_come_from_the_readme_configs(tmp_path):
    readme = ("---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n"
              "    path: en/train-*\n  - split: test\n    path: en/test-*\n"
              "- config_name: fr\n  data_files: fr/*.jsonl\n---\n# QA\n")
    _touch(tmp_path, "org/multi", "v1.0", ["en/train-0.parquet", "en/test-0.parquet",
                                            "fr/a.jsonl", "fr/b.jsonl"], readme)
    fs = hub_mirror(tmp_path)
    def get(**kw):
        return expand_hub("hf://datasets/org/multi", key="data.train", fs=fs,
                          **{"split": None, "revision": "v1.0", "role": "train", **kw})

    assert get(subset="en") == ["hf://datasets/org/multi@v1.0/en/train-0.parquet"]
    assert get(subset="fr") == ["hf://datasets/org/multi@v1.0/fr/a.jsonl",
                                "hf://datasets/org/multi@v1.0/fr/b.jsonl"]
    with pytest.raises(UserError, match=r"several subsets \(en, fr\): choose one with subset:"):
        get(subset=None)


def test_a_hub_dataset_without_readable_shards_is_read_from_its_parquet_conversion(tmp_path):
    _touch(tmp_path, "org/csv", "main", ["train.csv", "test.csv"])
    _touch(tmp_path, "org/csv", PARQUET_REVISION, ["default/train/0000.parquet",
                                                   "default/train/0001.parquet",
                                                   "default/test/0000.parquet"])
    got = expand_hub("hf://datasets/org/csv", subset=None, split=None, revision=None,
                     role="train", key="data.train", fs=hub_mirror(tmp_path))
    assert got == [f"hf://datasets/org/csv@refs%2Fconvert%2Fparquet/default/train/000{i}.parquet"
                   for i in range(2)]
    with pytest.raises(UserError, match="no shard this app can read"):
        expand_hub("hf://datasets/org/csv", subset=None, split=None, revision="main",
                   role="train", key="data.train", fs=hub_mirror(tmp_path))


@pytest.mark.parametrize(("entry", "message"), [
    ("hf://org/name", "write the Hub dataset 'hf://org/name' as hf://datasets/ORG/NAME"),
    ("hf://datasets/org/name@v2", ("give the revision as its own key, not in the id: "
                                  "{path: hf://datasets/org/name, revision: v2}")),
    ("hf://datasets/org/name/data/x.parquet", "choose its files with subset: and split:"),
    ("hf://models/org/name", "only dataset repositories are data sources"),
    ({"path": "data/a.jsonl", "subset": "en"}, ("subset applies to hf://datasets/ORG/NAME ids "
                                               "only, and 'data/a.jsonl' is not one")),
])
def test_bad_hub_ids_are_refused_with_the_fix(entry, message):
    with pytest.raises(UserError) as err:
        validate_config({"data": {"train": [entry]}})
    assert message in str(err.value)


def test_hub_ids_with_subset_split_and_revision_are_valid():
    cfg = validate_config({"data": {"train": [{"path": "hf://datasets/org/name", "subset": "en",
                                               "split": "train", "revision": "v1.0"}]}})
    [spec] = cfg.data.sources("train")
    assert (spec.subset, spec.split, spec.revision) == ("en", "train", "v1.0")


# --- through the pipeline and training (Ray) ----------------------------------------------

@pytest.fixture(scope="module")
def hf_data(tmp_path_factory) -> tuple[Path, Path]:
    """A Parquet folder (alpaca under other names) and a saved DatasetDict (chat under other
    names), each with a few bad rows and one duplicate."""
    root = tmp_path_factory.mktemp("hf")
    shards = root / "qa" / "data"
    shards.mkdir(parents=True)
    first = [qa(i) for i in range(24)] + [{**qa(90), "answer": None}, {**qa(91), "answer": ""}]
    pq.write_table(pa.Table.from_pylist(first), shards / "train-00000-of-00002.parquet",
                   row_group_size=10)
    second = [{**qa(i), "blob": None} for i in range(24, 48)]
    second += [{**qa(3), "blob": None}, {**qa(92), "blob": b"\xff"}]  # a duplicate, bytes
    pq.write_table(pa.Table.from_pylist(second), shards / "train-00001-of-00002.parquet")
    saved = save_to_disk(root / "chat", {
        "train": [chat(i) for i in range(20)] + [chat(93, role="wizard"), chat(94, reply=" ")],
        "test": [chat(i) for i in range(100, 106)]})
    return root / "qa", saved


@pytest.mark.ray
def test_parquet_a_saved_dataset_and_a_hub_id_are_accounted_row_by_row(
        ray_cluster, hf_data, tmp_path, monkeypatch):
    """The Hub is a local mirror here (no network): the listing, the pinned revision and
    the read through a pyarrow filesystem wrapping fsspec are those of HfFileSystem."""
    from ray_app.data import hub
    from ray_app.data.pipeline import prepare

    qa_dir, saved = hf_data
    _touch(tmp_path / "hub", "org/qa", "0123abc", ["data/test-00000-of-00001.parquet"])
    pq.write_table(pa.Table.from_pylist([qa(i) for i in range(200, 208)]),
                   tmp_path / "hub/datasets/org/qa@0123abc/data/train-00000-of-00001.parquet")
    monkeypatch.setattr(hub, "hub_filesystem", lambda: hub_mirror(tmp_path / "hub"))
    monkeypatch.setattr(hub, "_commit", lambda repo, rev, key: "0123abc")  # main's commit
    cfg = validate_config(tiny_config([], tmp_path, data={
        "train": [{"path": str(qa_dir), "fields": ALPACA_FIELDS},
                  {"path": str(saved), "fields": CHAT_FIELDS},
                  {"path": "hf://datasets/org/qa", "fields": ALPACA_FIELDS}],
        "eval": [{"path": str(saved), "fields": CHAT_FIELDS}]}))
    report = prepare(cfg, cfg.storage_uri(), tmp_path / "rejects").report
    hub_file = "hf://datasets/org/qa@0123abc/data/train-00000-of-00001.parquet"
    assert {f.path: f.records_read for f in report.files}[hub_file] == 8
    report.files = [f for f in report.files if f.path != hub_file]
    counted = {p.name: pq.ParquetFile(p).metadata.num_rows for p in (qa_dir / "data").iterdir()}
    for split in ("train", "test"):
        with pa.ipc.open_stream(str(saved / split / "data-00000-of-00001.arrow")) as reader:
            counted[f"{split}/data-00000-of-00001.arrow"] = reader.read_all().num_rows
    got = {"/".join(Path(f.path).parts[-2:]) if f.path.endswith(".arrow") else Path(f.path).name:
           (f.records_read, f.accepted, f.rejected, f.duplicates, f.format) for f in report.files}
    assert {k: v[0] for k, v in got.items()} == counted
    assert got == {"train-00000-of-00002.parquet": (26, 24, 2, 0, "alpaca"),
                   "train-00001-of-00002.parquet": (26, 24, 1, 1, "alpaca"),
                   "train/data-00000-of-00001.arrow": (22, 20, 2, 0, "messages"),
                   "test/data-00000-of-00001.arrow": (6, 6, 0, 0, "messages")}
    assert (report.train_records, report.eval_records) == (68 + 8, 6)
    rejects = [json.loads(x) for x in (tmp_path / "rejects/rejects.jsonl").read_text().splitlines()]
    found = {(Path(r["source"]).name, r["line"]): r["reason"] for r in rejects}
    assert found == {
        ("train-00000-of-00002.parquet", 25): "missing field 'answer' (alpaca format)",
        ("train-00000-of-00002.parquet", 26): "field 'answer' is empty (alpaca format)",
        ("train-00001-of-00002.parquet", 26): "column 'blob' holds binary data (bytes), which "
                                              "a JSON record cannot hold (text columns only)",
        ("data-00000-of-00001.arrow", 21): found.get(("data-00000-of-00001.arrow", 21)),
        ("data-00000-of-00001.arrow", 22): ("messages[1] (assistant) has empty "
                                              "content (messages format)"),
    }
    assert "unknown role 'wizard'" in found[("data-00000-of-00001.arrow", 21)]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_saved_dataset_trains_end_to_end(ray_cluster, hf_data, tmp_path):
    from rich.console import Console

    from ray_app.train.run import run_training

    _, saved = hf_data
    cfg = tiny_config([], tmp_path, data={"train": [{"path": str(saved), "fields": CHAT_FIELDS}]},
                      train={"max_steps": 2, "batch_size_per_worker": 4}, scaling=ONE_WORKER)
    summary = run_training(validate_config(cfg), Console(width=120))
    assert summary["status"] == "succeeded", summary.get("error")
    assert summary["train"]["steps"] == 2 and Path(summary["adapter_path"]).is_dir()
    [source] = summary["data"]["files"]
    assert (source["records_read"], source["accepted"], source["rejected"]) == (22, 20, 2)
