"""Where the data pipeline's CPU time goes: `prepare` on N pinned cores, with the CPU
seconds of every process sampled once a second and grouped by role (tokenizer actors,
read tasks, other Ray task workers, idle/starting workers, Ray's daemons, this driver).

    python bench/probes/data_cpu_trace.py --corpus-mb 40 --cpus 2 \
        --out bench/results/data_cpu_trace.json

The tokenizer is the Qwen one of bench/data_pipeline.py; the corpus that of data_scale.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
ROLES = ("TokenizeRecords", "ReadJsonl", "ReadFiles", "pack_batch", "Write", "ray::IDLE",
         "ray::", "raylet", "gcs_server")


def role_of(process: psutil.Process) -> str:
    try:
        line = " ".join(process.cmdline())
    except psutil.Error:
        return "other"
    if process.pid == os.getpid():
        return "driver"
    return next((r for r in ROLES if r in line), "other")


def sample(samples: list[dict], stop: threading.Event) -> None:
    last: dict[int, float] = {}
    while not stop.wait(1.0):
        now, by_role = {}, {}
        for process in psutil.process_iter():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            now[process.pid] = times.user + times.system
            used = now[process.pid] - last.get(process.pid, now[process.pid])
            if used > 0.005:
                role = role_of(process)
                by_role[role] = by_role.get(role, 0.0) + used
        last = now
        samples.append({"t": time.perf_counter(), **by_role})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=float, default=40)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--tokenize-actors", type=int, default=None,
                        help="data.tokenize_actors (default: the pipeline's own, one per 4 CPUs)")
    parser.add_argument("--work", default="/tmp/data_cpu_trace")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import ray
    from data_pipeline import build_qwen_tokenizer, write_corpus

    from ray_app.config import validate_config
    from ray_app.data.pipeline import prepare

    work = Path(args.work)
    tokenizer = work / "qwen_tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        build_qwen_tokenizer(tokenizer)
    corpus = work / f"corpus-{args.corpus_mb:g}mb"
    if not corpus.exists():
        write_corpus(corpus, args.corpus_mb)
    # Ray's processes inherit the affinity: N CPUs are N cores.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cpus])
    ray.init(num_cpus=args.cpus, logging_level="ERROR", log_to_driver=False,
             include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = validate_config({
        "model": {"tokenizer": str(tokenizer)},
        "data": {"train": [str(corpus)], "eval_fraction": 0.0, "max_seq_len": 2048,
                 "format": "text", "tokenize_actors": args.tokenize_actors},
        "run": {"storage_path": str(work / f"storage-{time.time_ns()}")}})
    samples: list[dict] = []
    stop = threading.Event()
    thread = threading.Thread(target=sample, args=(samples, stop), daemon=True)
    thread.start()
    start = time.perf_counter()
    data = prepare(cfg, cfg.storage_uri(), work / "rejects")
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    totals: dict[str, float] = {}
    for s in samples:
        for key, value in s.items():
            if key != "t":
                totals[key] = totals.get(key, 0.0) + value
    result = {
        "corpus_mb": args.corpus_mb, "cpus": args.cpus, "tokenize_actors": args.tokenize_actors,
        "seconds": round(seconds, 2),
        "tokens": data.report.train_tokens, "stage_seconds": data.report.stage_seconds,
        "cpu_seconds_by_role": {k: round(v, 2) for k, v in
                                sorted(totals.items(), key=lambda kv: -kv[1])},
        "busy_share": round(sum(totals.values()) / (seconds * args.cpus), 3),
        "per_second": [{"t": round(s["t"] - start, 1),
                        **{k: round(v, 2) for k, v in s.items() if k != "t"}} for s in samples],
        "command": "python bench/probes/data_cpu_trace.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_second"}, indent=1))


if __name__ == "__main__":
    main()
