"""`run_summary.json`: the one file that says what a run did."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ray_app.secrets import redact


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("ray", "torch", "transformers", "peft", "ray-app"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    from ray_app.data import storage

    summary = redact({**summary, "versions": versions()})
    # Atomic: a crash mid-write must not leave a summary that later tools cannot parse.
    storage.write_text(str(path), json.dumps(summary, indent=2, default=str) + "\n")


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_summary(summary: dict[str, Any], console: Console, path: Path) -> None:
    train, evals, data = summary["train"], summary["eval"], summary["data"]
    table = Table(title=f"Run {summary['config']['run']['name']}: {summary['status']}",
                  show_header=False)
    table.add_row("steps", str(train["steps"]))
    table.add_row("tokens seen", _num(train["tokens_seen"], ","))
    table.add_row("tokens/s", _num(train["tokens_per_s"], ",.0f"))
    table.add_row("restarts", str(train["restarts"]))
    # Every eval metric of the method, before -> after (eval loss first).
    for name in dict.fromkeys(k.rsplit("_", 1)[0] for k in evals):
        table.add_row(f"eval {name.replace('_', ' ')}",
                      f"{_num(evals.get(f'{name}_initial'), '.4g')} -> "
                      f"{_num(evals.get(f'{name}_final'), '.4g')}")
    table.add_row("records", f"{data['accepted']} accepted, {data['rejected']} rejected, "
                             f"{data['duplicates']} duplicates of {data['records_read']}")
    table.add_row("adapter", str(summary["adapter_path"] or "-"))
    table.add_row("summary", str(path))
    console.print(table)
    if summary.get("error"):
        console.print(f"[red]Training failed:[/red] {redact(summary['error'])}")
