"""The command line: unreachable clusters and bad data give one short error, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import yaml

from ray_app.cli import main


def _config(tmp_path, train):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": train},
                                    "run": {"output_dir": str(tmp_path / "o")}}))
    return str(path)


def test_unreachable_ray_client_address_is_explained(tmp_path, capsys):
    code = main(["train", _config(tmp_path, ["x.jsonl"]), "--address", "ray://127.0.0.1:9"])
    out = capsys.readouterr().out
    assert code == 2 and "Cannot reach the Ray client server" in out and "Traceback" not in out


def test_unreachable_dashboard_address_is_explained(tmp_path, capsys):
    code = main(["train", _config(tmp_path, ["x.jsonl"]), "--address", "http://127.0.0.1:9"])
    out = capsys.readouterr().out
    assert code == 2 and "Cannot reach the Ray dashboard" in out and "Traceback" not in out


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "ray_app", "--help"], capture_output=True,
                          text=True, check=True)
    assert "train" in done.stdout and "data" in done.stdout
