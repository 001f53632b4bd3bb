"""Live progress on the driver's console.

Rank 0 pushes its reported metrics to a small actor; the driver polls it and renders a
rich progress bar (on a terminal) or one log line per report (in `ray job submit` logs).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typing_extensions import Self


@ray.remote(num_cpus=0)
class ProgressHub:
    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def update(self, metrics: dict[str, Any]) -> None:
        self.history.append({**metrics, "time": time.time()})

    def since(self, index: int) -> list[dict[str, Any]]:
        return self.history[index:]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class ProgressDisplay:
    """Polls the hub in a background thread while `trainer.fit()` blocks the main one."""

    def __init__(self, hub, total_steps: int, console: Console, interval_s: float = 0.5):
        self.hub = hub
        self.total = total_steps
        self.console = console
        self.interval = interval_s
        self.latest: dict[str, Any] = {}
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.live = console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console, disable=not self.live,
        )
        self.task = self.progress.add_task("train", total=total_steps, info="starting workers")

    def __enter__(self) -> Self:
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()
        self.progress.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        try:
            new = ray.get(self.hub.since.remote(self._seen), timeout=10)
        except Exception:  # noqa: BLE001 - the display must never kill the run
            return
        self._seen += len(new)
        for metrics in new:
            self._show(metrics)

    def _show(self, metrics: dict[str, Any]) -> None:
        if metrics.get("resumed"):
            self.console.print(f"Resumed from checkpoint at step {metrics['step']} "
                               f"(restart {metrics.get('restarts', 0)}).")
        self.latest.update({k: v for k, v in metrics.items() if v is not None})
        m = self.latest
        info = (f"loss {_fmt(m.get('loss'), '.4f')}  eval {_fmt(m.get('eval_loss'), '.4f')}  "
                f"{_fmt(m.get('tokens_per_s'), ',.0f')} tok/s")
        self.progress.update(self.task, completed=m.get("step", 0), info=info)
        if not self.live:
            self.console.print(f"step {m.get('step', 0)}/{self.total}  {info}  "
                               f"lr {_fmt(m.get('lr'), '.2e')}", highlight=False)
