"""Config validation: every mistake is named with its key path, value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_app.cli import main
from ray_app.config import FORMAT_SETTINGS, Config, load_config, validate_config
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
    ("data", "format", "csv", "'auto', 'text', 'alpaca', 'messages', 'preference' or 'unpaired'"),
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


def test_format_errors_list_the_formats_of_the_one_literal_and_suggest_the_nearest():
    assert FORMAT_SETTINGS == ("auto", "text", "alpaca", "messages", "preference", "unpaired")
    msg = _error({"data": {"train": [{"path": "x.jsonl", "format": "mesages"}]}})
    assert "data.train.0.format: got 'mesages'" in msg and "did you mean 'messages'?" in msg
    assert "'auto', 'text', 'alpaca', 'messages', 'preference' or 'unpaired'" in msg
    assert validate_config({"data": {"train": ["x"], "format": "preference"}}).data.format == (
        "preference")


def test_importing_config_starts_neither_ray_nor_torch():
    code = ("import sys, ray_app.config; heavy = {'ray', 'torch', 'transformers', 'pyarrow'}; "
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def _with(**sections) -> dict:
    raw = _valid()
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


@pytest.mark.parametrize("sections,expected", [
    ({"train": {"keep_best_by": "eval_loss"}, "data": {"eval_fraction": 0}},
     ["train.keep_best_by: eval_loss", "data.eval is empty and data.eval_fraction is 0",
      "set data.eval (eval shards) or data.eval_fraction > 0", "train.keep_best_by: latest"]),
    ({"tune": {"space": {"train.lr": {"choice": [1e-4]}}}, "data": {"eval_fraction": 0}},
     ["tune.metric: eval_loss", "data.eval_fraction is 0", "or use tune.metric: loss"]),
    ({"model": {"attn_implementation": "flash_attention_2"}},
     ["model.attn_implementation: flash_attention_2 needs scaling.use_gpu: true",
      "CUDA GPUs only", "model.attn_implementation: sdpa on CPU"]),
    ({"model": {"liger": "on"}},
     ["model.liger: on needs scaling.use_gpu: true", "model.liger: auto", "or off"]),
    ({"run": {"record_samples": True, "storage_path": "s3://bucket/runs"}},
     ["run.record_samples: true", "s3:// object storage", "local or NFS run.storage_path",
      "run.record_samples: false"]),
    ({"data": {"min_tokens": 10, "max_tokens": 5}},
     ["data: data.max_tokens=5 is below data.min_tokens=10", "every record would be rejected",
      "raise data.max_tokens"]),
    ({"train": {"dpo": {"loss": "hinge", "label_smoothing": 0.1}}},
     ["train.dpo: train.dpo.label_smoothing=0.1", "loss: sigmoid only",
      "set label_smoothing: 0, or loss: sigmoid"]),
    ({"scaling": {"resources_per_worker": {"CPU": 1, "GPU": 1}}},
     ["scaling: scaling.resources_per_worker asks for GPU: 1", "scaling.use_gpu is false",
      "set scaling.use_gpu: true", "remove GPU from scaling.resources_per_worker"]),
    ({"scaling": {"use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 0}}},
     ["scaling.resources_per_worker gives GPU: 0", "remove GPU: 0",
      "scaling.use_gpu: false"]),
    ({"tune": {"space": {"data.max_seq_len": {"choice": [64, 128]}}}},
     ["tune.space.data.max_seq_len: data.max_seq_len cannot vary between trials",
      "Set it outside tune.space"]),
])
def test_settings_that_cannot_work_together_are_named_with_both_keys_and_the_fix(sections,
                                                                                  expected):
    msg = _error(_with(**sections))
    for part in expected:
        assert part in msg, (part, msg)


def test_every_rule_between_sections_is_reported_at_once():
    msg = _error(_with(model={"attn_implementation": "flash_attention_2"},
                       train={"keep_best_by": "eval_loss"}, data={"eval_fraction": 0}))
    assert "train.keep_best_by" in msg and "model.attn_implementation" in msg


def test_rules_between_sections_accept_the_settings_that_work():
    validate_config(_with(model={"attn_implementation": "flash_attention_2", "liger": "on"},
                          scaling={"use_gpu": True, "resources_per_worker": {"CPU": 4, "GPU": 1}},
                          train={"keep_best_by": "eval_loss",
                                 "dpo": {"loss": "ipo", "label_smoothing": 0.0}},
                          data={"eval": ["e.jsonl"], "eval_fraction": 0, "max_tokens": 5,
                                "min_tokens": 5},
                          run={"record_samples": True, "storage_path": "/mnt/shared/runs"}))
    # a study that ranks by train loss needs no eval data
    validate_config(_with(data={"eval_fraction": 0},
                          tune={"metric": "loss", "space": {"train.lr": {"choice": [1e-4]}}}))


def test_a_search_space_value_that_breaks_a_rule_between_sections_is_named():
    msg = _error(_with(data={"eval_fraction": 0}, tune={"metric": "loss", "space": {
        "train.keep_best_by": {"choice": ["latest", "eval_loss"]}}}))
    assert "tune.space.train.keep_best_by: choice ['latest', 'eval_loss'] allows 'eval_loss'" in msg
    assert "train.keep_best_by: latest" in msg


def test_a_source_mapping_is_reported_as_written_with_its_own_keys():
    msg = _error({"data": {"train": ["x"], "eval": {"path": "e.jsonl", "wieght": 2}}})
    assert ("data.eval.0.wieght: unknown key in section 'data.eval.0'; did you mean 'weight'? "
            "Allowed: path, format, fields, weight, split, subset, revision.") in msg
    assert ".str" not in msg and "SourceSpec" not in msg


def test_readme_config_table_names_every_key_and_every_record_format():
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| section | keys |"):readme.index("Any key can be overridden")]
    for section, field in Config.model_fields.items():
        (row,) = [line for line in table.splitlines() if line.startswith(f"| `{section}` |")]
        missing = [key for key in field.annotation.model_fields if f"`{key}`" not in row]
        assert not missing, f"README config table, section {section}: {missing}"
    (data,) = [line for line in table.splitlines() if line.startswith("| `data` |")]
    assert "`format` (" + ", ".join(f"`{f}`" for f in FORMAT_SETTINGS) + ")" in data
