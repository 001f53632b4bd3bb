"""CPU-seconds of a small training run, by Ray process kind: what a run costs on a CPU-bound
machine (CI's 2 cores), the warm cluster apart from the first run.

    .venv/bin/python bench/probes/run_cpu_by_process.py /tmp/cpu_probe

Two 4-step, 2-worker runs of the tests' tiny config (tests/support.py) on one local
cluster, each on fresh storage (no dataset cache); the second is the warm figure. Every
process under this driver is sampled every 0.3 s (short-lived ones can be missed).
Measured 2026-12-05 on this repository's CPU machine: the warm run took 46.1 CPU-seconds
in Ray's processes with Ray Data's V2 Parquet reader for the dataset cache, 39.4 with V1
(ray_app/data/pipeline.py: read_own_parquet)."""

from __future__ import annotations

import collections
import json
import random
import sys
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from support import tiny_config, write_lines

from ray_app.config import validate_config
from ray_app.quickstart import build_assets
from ray_app.ray_session import connect


def _kind(process: psutil.Process) -> str:
    cmdline = process.cmdline()
    return cmdline[0] if cmdline and cmdline[0].startswith("ray::") else process.name()


def main(work: Path) -> None:
    from ray_app.train.run import run_training

    data = work / "data"
    rng = random.Random(1)
    write_lines(data / "a.jsonl", [json.dumps(r) for r in build_assets.alpaca_records(rng, 160)])
    write_lines(data / "t.jsonl", [json.dumps(r) for r in build_assets.text_records(rng, 60)])
    connect(None, num_cpus=2)
    me = psutil.Process()
    seen: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU-seconds)

    def sample(stop: threading.Event) -> None:
        while not stop.is_set():
            for process in me.children(recursive=True):
                try:
                    times = process.cpu_times()
                    seen[process.pid] = (_kind(process), times.user + times.system)
                except psutil.Error:
                    pass
            time.sleep(0.3)

    for run in range(2):
        before, stop = dict(seen), threading.Event()
        thread = threading.Thread(target=sample, args=(stop,))
        thread.start()
        started = time.monotonic()
        summary = run_training(validate_config(tiny_config(data, work / f"r{run}")),
                               Console(quiet=True))
        wall = time.monotonic() - started
        stop.set()
        thread.join()
        by_kind: collections.Counter[str] = collections.Counter()
        for pid, (kind, cpu) in seen.items():
            by_kind[kind] += cpu - before.get(pid, (kind, 0.0))[1]
        print(f"run {run} ({'warm' if run else 'cold'}): {summary['status']}, wall {wall:.1f} s, "
              f"CPU-seconds in Ray's processes {sum(by_kind.values()):.1f}")
        for kind, cpu in by_kind.most_common(15):
            print(f"   {cpu:6.1f} {kind}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
