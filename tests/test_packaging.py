"""The declared dependencies are the imported ones, and a missing optional package names its
pip line.

pyproject.toml's core dependencies are exactly the third-party packages that ray_app/
imports; an import of anything else sits inside a function, belongs to an extra, and goes
through ray_app.extras, whose table matches pyproject.toml. With an optional package made
unimportable, each command path that needs it raises a UserError with
`pip install 'ray-app[extra]'`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from ray_app.cli import main
from ray_app.config import validate_config
from ray_app.errors import MissingPackage
from ray_app.extras import OPTIONAL, TRACKERS, check_packages

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# Modules that import an optional package at their top, and are themselves imported only
# inside a function that turns the ImportError into the extra's pip line.
OPTIONAL_MODULES = {"ray_app/k8s/validate.py": "jsonschema",  # via ray_app.k8s.cli._validator
                    "ray_app/model/fp8_kernels.py": "triton"}  # via fp8.quantize_activations


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(specs: list[str]) -> dict[str, str]:
    """canonical distribution name -> the requirement as written."""
    return {_canonical(re.match(r"[A-Za-z0-9._-]+", spec).group(0)): spec for spec in specs}


CORE = _requirements(PYPROJECT["dependencies"])
EXTRAS = {extra: _requirements(specs)
          for extra, specs in PYPROJECT["optional-dependencies"].items()}
INSTALLED = {name: {_canonical(d) for d in dists}
             for name, dists in importlib.metadata.packages_distributions().items()}


def _imports() -> list[tuple[str, str, bool]]:
    """(file, top-level name, inside a function?) of every absolute runtime import in
    ray_app/ (`if TYPE_CHECKING:` blocks skipped)."""
    found = []

    def visit(node: ast.AST, file: str, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if (isinstance(child, ast.If) and isinstance(child.test, ast.Name)
                    and child.test.id == "TYPE_CHECKING"):
                continue
            if isinstance(child, ast.Import):
                found.extend((file, a.name.split(".")[0], nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                found.append((file, child.module.split(".")[0], nested))
            visit(child, file, nested or isinstance(child, (ast.FunctionDef,
                                                             ast.AsyncFunctionDef)))

    for path in sorted((REPO / "ray_app").rglob("*.py")):
        visit(ast.parse(path.read_text()), str(path.relative_to(REPO)), False)
    return [(f, name, nested) for f, name, nested in found
            if name not in sys.stdlib_module_names and name != "ray_app"]


def _distribution(name: str) -> str:
    if name in OPTIONAL:
        return _canonical(OPTIONAL[name][1])
    dists = INSTALLED.get(name)
    assert dists and len(dists) == 1, f"cannot tell which distribution provides {name!r}"
    return next(iter(dists))


def test_every_top_level_import_is_a_core_dependency():
    undeclared = sorted({f"{file}: {name} ({_distribution(name)})"
                         for file, name, nested in _imports()
                         if not nested and _distribution(name) not in CORE
                         and OPTIONAL_MODULES.get(file) != name})
    assert not undeclared, ("imported at module level, but not in [project] dependencies "
                            f"(declare it, or import it inside a function through "
                            f"ray_app.extras): {undeclared}")


def test_every_core_dependency_is_imported():
    imported = {_distribution(name) for _, name, _ in _imports()}
    unused = sorted(set(CORE) - imported)
    assert not unused, f"declared in [project] dependencies, imported nowhere in ray_app/: {unused}"


def test_every_optional_import_is_in_a_function_and_in_its_extra():
    for file, name, nested in _imports():
        if _distribution(name) in CORE:
            continue
        assert name in OPTIONAL, f"{file} imports {name}, which is neither core nor in extras.OPTIONAL"
        assert nested or OPTIONAL_MODULES.get(file) == name, (
            f"{file} imports optional {name} at module level: import it inside the function")
        extra, dist = OPTIONAL[name]
        assert _canonical(dist) in EXTRAS[extra], f"{dist} is not in the {extra!r} extra"


def test_the_extras_table_names_the_installed_distributions():
    for name, (extra, dist) in OPTIONAL.items():
        assert _canonical(dist) in EXTRAS[extra], (name, extra)
        if name in INSTALLED:
            assert _canonical(dist) in INSTALLED[name], (name, dist, INSTALLED[name])
    assert set(TRACKERS.values()) <= set(OPTIONAL)


def test_the_test_extra_pins_every_optional_package_the_tests_run():
    test = EXTRAS["test"]
    for extra, requirements in EXTRAS.items():
        if extra in ("test", "bench"):
            continue
        for dist, spec in requirements.items():
            if dist == "liger-kernel":  # GPU only (tests/test_gpu.py)
                continue
            assert test.get(dist) == spec, f"test extra: {spec!r} of extra {extra!r} missing"


def test_nothing_declared_is_left_over_from_removed_code():
    declared = set(CORE).union(*EXTRAS.values())
    assert "trl" not in declared  # the DPO losses are restated in ray_app/train/methods/dpo.py
    assert "datasets" not in set(CORE)  # bench/ only


# --- a missing optional package names its pip line --------------------------------------


@pytest.fixture
def block(monkeypatch):
    """block("x") makes package x and its submodules unimportable, as if not installed."""
    def block(name: str) -> None:
        for loaded in [m for m in sys.modules if m.startswith(f"{name}.")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)
    return block


def _install_line(extra: str) -> str:
    return f"pip install 'ray-app[{extra}]'"


def _cfg(**sections) -> dict:
    return {"data": {"train": ["x.jsonl"]}, **sections}


@pytest.mark.parametrize("module,sections,extra,needed_for", [
    ("deepspeed", {"scaling": {"strategy": "deepspeed"}}, "gpu", "scaling.strategy: deepspeed"),
    ("bitsandbytes", {"model": {"quantization": "nf4"}}, "gpu", "model.quantization: nf4"),
    ("bitsandbytes", {"train": {"optimizer": "paged_adamw_8bit"}}, "gpu",
     "train.optimizer: paged_adamw_8bit"),
    ("liger_kernel", {"model": {"liger": "on"}, "scaling": {"use_gpu": True}}, "gpu",
     "model.liger: on"),
    ("triton", {"model": {"precision": "fp8"},
                "scaling": {"use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 1}}},
     "gpu", "model.precision: fp8"),
    ("wandb", {"tracking": {"backends": ["wandb"]}}, "tracking", "tracking.backends: wandb"),
    ("tensorboardX", {"tracking": {"backends": ["tensorboard"]}}, "tracking",
     "tracking.backends: tensorboard"),
])
def test_a_setting_that_needs_a_missing_package_names_its_extra(block, module, sections, extra,
                                                                 needed_for):
    block(module)
    with pytest.raises(MissingPackage) as info:
        check_packages(validate_config(_cfg(**sections)))
    assert str(info.value).startswith(f"{needed_for} needs ")
    assert _install_line(extra) in str(info.value) and info.value.extra == extra


def test_liger_on_without_liger_kernel_fails_with_the_gpu_extra_in_the_worker_too(block):
    from ray_app.config import ModelSection
    from ray_app.model.loading import use_liger

    block("liger_kernel")
    assert not use_liger(ModelSection(liger="auto"), "llama", use_gpu=True)
    with pytest.raises(MissingPackage, match=re.escape(_install_line("gpu"))):
        use_liger(ModelSection(liger="on"), "llama", use_gpu=True)


def test_fp8_without_triton_fails_at_the_workers_set_up_with_the_gpu_extra(block):
    import torch

    from ray_app.model.fp8 import to_fp8_base

    block("triton")
    with pytest.raises(MissingPackage, match=re.escape(_install_line("gpu"))):
        to_fp8_base(torch.nn.Module(), torch.device("cuda"))


@pytest.mark.parametrize("module", ["rouge_score", "sacrebleu"])
def test_ray_app_eval_without_its_metrics_exits_2_with_the_eval_extra(block, tmp_path, capsys,
                                                                      module):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_cfg(run={"output_dir": str(tmp_path / "out")})))
    block(module)
    assert main(["eval", str(config), "--adapter", str(adapter)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "ray-app eval" in out and module in out and _install_line("eval") in out


def test_eval_metrics_name_the_eval_extra(block):
    from ray_app.export import metrics

    block("sacrebleu")
    with pytest.raises(MissingPackage, match=re.escape(_install_line("eval"))):
        metrics.generation_scores(["a b"], ["a b"])
    metrics._rouge_scorer.cache_clear()
    block("rouge_score")
    with pytest.raises(MissingPackage, match=re.escape(_install_line("eval"))):
        metrics.rouge_l("a b", "a b")
    metrics._rouge_scorer.cache_clear()


def test_optuna_search_without_optuna_fails_before_any_ray_work(block, tmp_path):
    from ray_app.tune.study import _tune_config, check_study, run_study

    cfg = validate_config(_cfg(run={"output_dir": str(tmp_path / "out")}, tune={
        "search": "optuna", "space": {"train.lr": {"loguniform": [1e-5, 1e-3]}}}))
    block("optuna")
    with pytest.raises(MissingPackage, match=re.escape(_install_line("tune"))):
        check_study(cfg)  # what `ray-app tune` can call before Ray starts
    with pytest.raises(MissingPackage, match=re.escape(_install_line("tune"))) as info:
        run_study(cfg, Console())
    assert "tune.search: optuna needs optuna" in str(info.value)
    assert "use tune.search: random" in str(info.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(MissingPackage, match=re.escape(_install_line("tune"))):
        _tune_config(cfg, concurrency=1, planned_steps=10)


def test_a_study_without_matplotlib_finishes_and_says_how_to_get_the_plot(block, tmp_path):
    from ray_app.tune.study import write_plot

    trials = [{"trial_id": "a", "history": [[2, 1.5], [4, 1.2]], "status": "completed",
               "label": "train.lr=0.001"}]
    path = tmp_path / "trials.png"
    assert write_plot(trials, "eval_loss", "a", path, Console()) == str(path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    path.unlink()
    block("matplotlib")
    console = Console(record=True, width=300)
    assert write_plot(trials, "eval_loss", "a", path, console) is None
    assert not path.exists()
    out = console.export_text()
    assert "No trials.png: trials.png of ray-app tune needs matplotlib" in out
    assert _install_line("plot") in out


def test_readme_extras_table_lists_every_extra_with_its_packages():
    readme = (REPO / "README.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in readme.splitlines()
            if line.startswith("| `") and line.count("|") == 4}
    for extra, requirements in EXTRAS.items():
        assert extra in rows, f"README extras table has no row for {extra!r}"
        if extra == "test":
            continue
        listed = {_canonical(name) for name in re.findall(r"`([A-Za-z0-9._-]+)`",
                                                          rows[extra].split("|")[3])}
        assert listed == set(requirements), (extra, listed, set(requirements))
