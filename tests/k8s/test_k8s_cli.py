"""`ray-app k8s render|validate`: exit codes, outputs, one-paragraph errors."""

from __future__ import annotations

import argparse
import io

import pytest
import yaml

from ray_app.k8s import cli


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ray-app")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args, None)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "demo", "storage_path": "/mnt/shared/checkpoints"},
                "scaling": {"num_workers": 16, "use_gpu": True},
            }
        )
    )
    return path


def test_render_writes_manifests_that_validate(config, tmp_path, capsys):
    out = tmp_path / "job.yaml"
    assert run(["k8s", "render", str(config), "--gpu-type", "H100", "--spot", "-o", str(out)]) == 0
    assert f"kubectl apply -f {out}" in capsys.readouterr().err
    kinds = [d["kind"] for d in yaml.safe_load_all(out.read_text())]
    assert kinds == ["ConfigMap", "RayJob"]
    assert run(["k8s", "validate", str(out)]) == 0
    assert "2 document(s) valid" in capsys.readouterr().err


def test_render_prints_to_stdout_without_output(config, capsys):
    assert run(["k8s", "render", str(config), "--namespace", "ml"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("run: {name: x, storage_path: outputs/ckpt}\n", "run.storage_path is 'outputs/ckpt'"),
        ("run: [unclosed\n", "is not valid YAML"),
        ("- a list\n", "must be a YAML mapping"),
    ],
)
def test_render_errors_are_one_paragraph(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert run(["k8s", "render", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_validate_reports_each_problem_and_exits_1(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("apiVersion: ray.io/v1\nkind: RayJob\nmetadata: {name: x}\nspec: {}\n")
    assert run(["k8s", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: RayJob x: spec: set exactly one of rayClusterSpec" in out


def test_validate_reads_stdin(monkeypatch, capsys):
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    )
    assert run(["k8s", "validate", "-"]) == 0


def test_validate_missing_file_exits_2(tmp_path, capsys):
    assert run(["k8s", "validate", str(tmp_path / "nope.yaml")]) == 2
    assert "error: cannot read" in capsys.readouterr().err


def test_main_cli_offers_the_k8s_commands():
    from ray_app.cli import build_parser

    args = build_parser().parse_args(["k8s", "validate", "cluster/raycluster.yaml"])
    assert args.func is cli._validate
