"""Bounded-memory streaming of the data pipeline, with one source on S3 (moto server).

Generates a text corpus of --corpus-mb on local disk plus a small chat shard on an S3
bucket served by moto (and, with --s3-storage, the dataset cache there too), starts a Ray cluster whose object store is
--object-store-mb, runs `prepare`, reads one worker's first batches back from S3 through
`TrainStream`, and prints JSON: sizes, wall time, driver peak RSS, object-store spill.

    python bench/data_scale.py --corpus-mb 800 --object-store-mb 75 --out bench/results/data_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path


def write_corpus(folder: Path, megabytes: float, seed: int = 0) -> int:
    """Text records of ~1.9 KB (28 quickstart-style facts) in 8 shards; returns their number."""
    from ray_app.quickstart import build_assets

    rng = random.Random(seed)
    facts = [r["text"] for r in build_assets.text_records(rng, 2000)]
    folder.mkdir(parents=True, exist_ok=True)
    target, written, n = int(megabytes * 1e6), 0, 0
    with ExitStack() as stack:
        files = [stack.enter_context(open(folder / f"part-{i:02d}.jsonl", "w")) for i in range(8)]
        while written < target:
            line = json.dumps({"text": f"Record {n}. " + " ".join(rng.choices(facts, k=28))}) + "\n"
            files[n % 8].write(line)
            written += len(line)
            n += 1
    return n


class PeakRss:
    """Samples this process's RSS every 50 ms."""

    def __init__(self):
        import psutil

        self.process, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=float, default=800)
    parser.add_argument("--object-store-mb", type=int, default=80)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--s3-storage", action="store_true",
                        help="write the dataset cache to the moto bucket too (slow: moto is "
                        "an in-process Python server, and its memory counts as the driver's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import boto3
    from moto.server import ThreadedMotoServer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # Ray's workers inherit this environment: pyarrow's S3 client reads the endpoint from it.
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="test",
                      AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="data")
    chat = "".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                            {"role": "assistant", "content": f"A{i}."}]}) + "\n"
                   for i in range(200))
    s3.put_object(Bucket="data", Key="chat/part-0.jsonl", Body=chat.encode())

    tmp = Path(tempfile.mkdtemp(prefix="data_scale_"))
    records = write_corpus(tmp / "corpus", args.corpus_mb)
    corpus_bytes = sum(p.stat().st_size for p in (tmp / "corpus").iterdir())

    import ray

    from ray_app.config import validate_config
    from ray_app.data.pipeline import prepare

    ray.init(num_cpus=args.cpus, object_store_memory=args.object_store_mb * 2**20,
             logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = validate_config({
        "data": {"train": [str(tmp / "corpus"), "s3://data/chat/"], "eval_fraction": 0.01,
                 "max_seq_len": 512},
        "run": {"storage_path": "s3://data/storage" if args.s3_storage else str(tmp / "storage"),
                "output_dir": str(tmp / "out")},
    })
    rss_before = PeakRss().process.memory_info().rss
    start = time.perf_counter()
    with PeakRss() as rss:
        data = prepare(cfg, cfg.storage_uri(), tmp / "out/rejects")
    seconds = time.perf_counter() - start
    stream = data.train_stream()
    first = next(iter(stream.batches(epoch=0, seed=0, world_size=2, rank=1, batch_size=4)))
    spilled = ray._private.internal_api.memory_summary(
        address=ray.get_runtime_context().gcs_address, stats_only=True)
    ray.shutdown()
    server.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    report = data.report
    result = {
        "corpus_mb": round(corpus_bytes / 1e6, 1), "records": records + 200,
        "object_store_mb": args.object_store_mb,
        "corpus_over_object_store": round(corpus_bytes / (args.object_store_mb * 2**20), 2),
        "cpus": args.cpus, "prepare_seconds": round(seconds, 1),
        "driver_rss_before_mb": round(rss_before / 2**20), "driver_rss_peak_mb": round(rss.peak / 2**20),
        "driver_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "records_read": report.records_read, "accepted": report.accepted,
        "balanced": report.balanced(), "train_sequences": report.train_sequences,
        "packing_efficiency": round(report.packing_efficiency, 4),
        "cache_on_s3": data.path.startswith("s3://"), "first_batch_rows": len(first["input_ids"]),
        "spill_summary": [line.strip() for line in spilled.splitlines() if "pill" in line],
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
