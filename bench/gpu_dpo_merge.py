"""DPO with QLoRA on the Llama-3.1-8B shape, then `ray-app merge` of the QLoRA adapter.

One GPU, in this order (results are written to <out>/gpu_dpo_merge.json after each part):

1. A random-init bf16 model of the 8B shape, saved with `save_pretrained` (no weights can
   be downloaded; the compute and memory are those of the real shape), with the bundled
   tokenizer's pad and EOS ids. Kept in the work folder: a later run reuses it.
2. `train.method=dpo` through `ray_app.train.run.run_training` (Ray Data + Ray Train, one
   GPU worker): 4-bit NF4 base (`model.quantization=nf4`), LoRA r=16 on q,k,v,o, the
   reference being the same base with the adapter disabled, beta 0.1, lr 5e-4 constant,
   activation checkpointing on every layer. Preference records of random words: prompt,
   chosen and rejected answers of log-normal lengths. Reported: tokens/s of the run
   summary (`train.tokens_per_s`: the tokens of the chosen and rejected sequences, prompt
   included in both, over the optimizer steps' time as the worker measured it), the GPU
   memory peaks the worker reports (through `run_training`'s `on_metrics`: `peak_gib` the
   whole worker, `train_peak_gib` without and `eval_peak_gib` of the eval passes), and
   the eval DPO loss, reward accuracy and margin before and after (random data: the
   figures show the mechanics, the policy moving away from the reference, not a quality
   claim). The peak reserved by CUDA's caching allocator (`reserved_gib` in the results of
   2026-11-23) is not reported by the workers and no longer measured.
3. `ray_app.export.merge.merge_adapter` on the run's adapter: the base dequantized to
   bf16, merged, written as safetensors shards, reloaded and compared with base + adapter.

`--method sft`, `--quantization none`, `--liger off`, `--attn eager` vary the run;
`--detect-anomaly` turns on autograd's anomaly mode in every Ray worker process (Ray's
`worker_process_setup_hook`), which names the forward op whose backward first gives NaN;
`--cpu-smoke` runs the same code with the quickstart's tiny random model on a CPU worker
(it checks the script and measures nothing).

    python bench/gpu_dpo_merge.py --out $OUT/dpo
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_throughput import (
    LORA_ALPHA,
    LORA_R,
    LORA_TARGETS,
    SHAPES,
    TOKENIZER,
    build_model,
    random_words,
    worker_peaks,
)


def write_pairs(path: Path, n: int, seed: int, sft: bool = False) -> None:
    rng = random.Random(seed)

    def text(median_chars: int) -> str:
        return random_words(rng, int(min(1500, rng.lognormvariate(0, 0.5) * median_chars)) + 8)

    with path.open("w") as f:
        for _ in range(n):
            pair = {"prompt": text(300), "chosen": text(400), "rejected": text(400)}
            if sft:  # the chosen answers as instructions, for an SFT run on the same data
                pair = {"instruction": pair["prompt"], "output": pair["chosen"]}
            f.write(json.dumps(pair) + "\n")


def _detect_anomaly() -> None:
    """Ray's `worker_process_setup_hook` for `--detect-anomaly`: autograd's anomaly mode
    (a process-wide switch) in every worker process."""
    import torch

    torch.autograd.set_detect_anomaly(True)


def dpo_run(model_dir: str, work: Path, steps: int, batch: int, seq: int,
            gpu: bool = True, liger: str = "auto", detect_anomaly: bool = False,
            attn: str = "sdpa", method: str = "dpo", quantization: str = "nf4") -> dict:
    import ray
    from rich.console import Console

    import ray_app.ray_session  # noqa: F401 - Ray Train environment defaults
    from ray_app.config import validate_config
    from ray_app.train.run import run_training

    run_dir = work / f"run-{time.strftime('%H%M%S')}"  # each invocation its own run
    train, evals = work / "pairs.jsonl", work / "eval_pairs.jsonl"
    sft = method == "sft"
    write_pairs(train, int(steps * batch * 1.3), seed=0, sft=sft)
    write_pairs(evals, 16, seed=1, sft=sft)
    ray.init(include_dashboard=False, log_to_driver=detect_anomaly,
             runtime_env={"worker_process_setup_hook": _detect_anomaly} if detect_anomaly
             else None)
    cfg = validate_config({
        "model": {"name_or_path": model_dir, "tokenizer": str(TOKENIZER), "dtype": "bfloat16",
                  "quantization": quantization, "liger": liger, "attn_implementation": attn},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "target_modules": LORA_TARGETS},
        "data": {"train": [str(train)], "eval": [str(evals)], "format": "alpaca" if sft else "preference",
                 "max_seq_len": seq},
        "train": {"method": method, "dpo": {"beta": 0.1}, "max_steps": steps, "lr": 5e-4,
                  "batch_size_per_worker": batch, "log_every": 1, "eval_every": 0,
                  "checkpoint_every": steps, "warmup_ratio": 0.0, "schedule": "constant",
                  "activation_checkpointing": "all"},
        "scaling": {"num_workers": 1, "use_gpu": gpu,
                    "resources_per_worker": {"CPU": 4, "GPU": 1} if gpu else {"CPU": 1}},
        "run": {"name": "dpo8b", "storage_path": str(run_dir / "storage"),
                "output_dir": str(run_dir / "out"), "max_failures": 0},
    }, source="bench dpo")
    reports: list[dict] = []
    started = time.perf_counter()
    summary = run_training(cfg, Console(file=sys.stderr, width=120), on_metrics=reports.append)
    if summary["status"] != "succeeded":
        raise RuntimeError(f"{method} run failed: {summary.get('error')}")
    return {"steps": steps, "batch_pairs": batch, "max_seq_len": seq, "run_wall_s":
            round(time.perf_counter() - started, 1), "tokens_per_s": summary["train"]["tokens_per_s"],
            **worker_peaks(reports), "eval": summary["eval"],
            "adapter": summary["adapter_path"], "train_pairs": summary["data"]["train_sequences"]}


def merge_run(adapter: str, base: str, out: Path, dtype: str = "bfloat16") -> dict:
    from rich.console import Console

    from ray_app.errors import UserError
    from ray_app.export.merge import merge_adapter

    started = time.perf_counter()
    try:
        result = merge_adapter(adapter, str(out), base, dtype, "5GB", None,
                               Console(file=sys.stderr))
    except UserError as err:  # a failed verification is a result too
        return {"seconds": round(time.perf_counter() - started, 1), "verified": False,
                "error": str(err)}
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**30
    return {"seconds": round(time.perf_counter() - started, 1), "verified": True,
            "dtype": result.dtype,
            "max_abs_logit_diff": result.max_abs_diff, "allowed": result.allowed,
            "files": result.files, "size_gib": round(size, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dpo_bench"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2, help="pairs per step")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--liger", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--detect-anomaly", action="store_true")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--method", choices=["dpo", "sft"], default="dpo")
    parser.add_argument("--quantization", choices=["nf4", "none"], default="nf4")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a tiny random model on CPU: checks this script, measures nothing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(sys.argv), "model": SHAPES["8b"]["name"]}

    def save() -> None:
        (args.out / "gpu_dpo_merge.json").write_text(json.dumps(results, indent=2) + "\n")
        print("RESULT", json.dumps(results), flush=True)

    import torch

    t0 = time.perf_counter()
    # Apart, so that a GPU run in the same work folder never reuses the smoke's tiny model.
    model_dir = str(args.work / ("model_tiny" if args.cpu_smoke else "model_8b"))
    if args.cpu_smoke:
        results["model"] = "tiny (smoke)"
    if (Path(model_dir) / "config.json").exists():
        results["device"] = "cpu" if args.cpu_smoke else torch.cuda.get_device_name()
        model = None  # built by an earlier run in the same work folder
    elif args.cpu_smoke:
        from ray_app.data.tokenize import load_tokenizer
        from ray_app.model.loading import build_tiny_llama

        results["device"] = "cpu"
        model = build_tiny_llama(load_tokenizer(str(TOKENIZER)), seed=0)
    else:
        from ray_app.data.tokenize import load_tokenizer

        results["device"] = torch.cuda.get_device_name()
        # The model's pad id is the tokenizer's: random init zeroes the pad row of the
        # embedding, and a zero first token (here <|im_start|>, id 2, were it the pad id)
        # keeps its hidden state at zero through every layer, where each RMSNorm's
        # backward multiplies the gradient by 1/sqrt(eps): NaN within 32 layers.
        tok = load_tokenizer(str(TOKENIZER))
        model = build_model("8b", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if model is not None:
        model.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()
    results["save_base_s"] = round(time.perf_counter() - t0, 1)
    save()
    results.update(liger=args.liger, attn=args.attn, method=args.method,
                   quantization=args.quantization)
    results["train_run"] = dpo_run(model_dir, args.work, args.steps, args.batch, args.seq,
                                   gpu=not args.cpu_smoke, liger=args.liger,
                                   detect_anomaly=args.detect_anomaly, attn=args.attn,
                                   method=args.method, quantization=args.quantization)
    save()
    results["merge"] = merge_run(results["train_run"]["adapter"], model_dir,
                                 args.work / f"merged-{args.method}-{args.quantization}")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
