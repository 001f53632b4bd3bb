"""Config validation: every mistake is named with its key path, value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ray_app.cli import main
from ray_app.config import Config, load_config, validate_config
from ray_app.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _valid() -> dict:
    return {"data": {"train": ["x.jsonl"]}}


def _error(raw: dict) -> str:
    with pytest.raises(UserError) as info:
        validate_config(raw)
    return str(info.value)


def test_quickstart_config_is_valid():
    cfg = load_config(None)
    assert cfg.model.name_or_path == "builtin:tiny-llama"
    assert cfg.scaling.num_workers == 2


def test_unknown_key_names_path_and_suggests_the_right_one():
    msg = _error({**_valid(), "train": {"lrr": 1e-4}})
    assert "train.lrr" in msg and "did you mean 'lr'" in msg and "max_steps" in msg


def test_unknown_top_level_section_is_rejected():
    msg = _error({**_valid(), "trainer": {}})
    assert "trainer" in msg and "did you mean 'train'" in msg


def test_wrong_type_names_key_and_value():
    msg = _error({**_valid(), "train": {"batch_size_per_worker": "eight"}})
    assert "train.batch_size_per_worker" in msg and "'eight'" in msg and "integer" in msg


@pytest.mark.parametrize("section,key,value,expected", [
    ("train", "lr", -1, "greater than 0"),
    ("scaling", "num_workers", 0, "greater than or equal to 1"),
    ("data", "eval_fraction", 1.5, "less than 1"),
    ("data", "format", "csv", "'auto', 'text', 'alpaca' or 'messages'"),
    ("lora", "dropout", 1.0, "less than 1"),
    ("run", "name", "bad name!", "letters, digits"),
    ("scaling", "resources_per_worker", {"CPU": -1}, ">= 0"),
])
def test_impossible_values_are_rejected_with_allowed_range(section, key, value, expected):
    raw = _valid()
    raw.setdefault(section, {})[key] = value
    msg = _error(raw)
    assert f"{section}.{key}" in msg and repr(value) in msg and expected in msg


def test_missing_train_data_is_named():
    assert "data: required key is missing" in _error({})


def test_set_overrides_nested_keys_with_yaml_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_valid()))
    cfg = load_config(path, ["train.lr=1e-4", "scaling.use_gpu=true", "data.train=[a, b]"])
    assert cfg.train.lr == 1e-4 and cfg.scaling.use_gpu is True
    assert cfg.data.train == ["a", "b"]


def test_set_without_equals_is_explained():
    with pytest.raises(UserError, match="key.path=value"):
        load_config(None, ["train.lr"])


def test_invalid_yaml_reports_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  train: [a\n  eval: b\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_config(path)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cli_prints_a_short_error_not_a_traceback(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": ["x"]}, "train": {"lr": "fast"}}))
    assert main(["train", str(path)]) == 2
    out = capsys.readouterr().out
    assert "train.lr" in out and "'fast'" in out and "Traceback" not in out


def _keys(model) -> set[str]:
    out = set()
    for section, field in model.model_fields.items():
        out |= {f"{section}.{name}" for name in field.annotation.model_fields}
    return out


def test_example_config_documents_every_key():
    example = yaml.safe_load((REPO / "jobs/configs/example.yaml").read_text())
    documented = {f"{s}.{k}" for s, values in example.items() for k in values}
    assert documented == _keys(Config)
    validate_config(example)


def test_every_bundled_config_is_valid():
    configs = sorted((REPO / "jobs/configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_train_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in _keys(Config):
        assert f"  {key.split('.')[1]} (" in out
