"""DPO with QLoRA on the Llama-3.1-8B shape, then `ray-app merge` of the QLoRA adapter.

One GPU, in this order (results are written to <out>/gpu_dpo_merge.json after each part):

1. A random-init bf16 model of the 8B shape, saved with `save_pretrained` (no weights can
   be downloaded; the compute and memory are those of the real shape).
2. `train.method=dpo` through `ray_app.train.run.run_training` (Ray Data + Ray Train, one
   GPU worker): 4-bit NF4 base (`model.quantization=nf4`), LoRA r=16 on q,k,v,o, the
   reference being the same base with the adapter disabled. Preference records of random
   words: prompt, chosen and rejected answers of log-normal lengths. Reported: tokens/s
   over the run (chosen + rejected tokens, wall clock of the optimizer steps), the
   worker's peak GPU memory (training and evaluation together), and the eval DPO loss,
   reward accuracy and margin before and after (random data: the figures show the
   mechanics, the policy moving away from the reference, not a quality claim).
3. `ray_app.export.merge.merge_adapter` on the run's adapter: the base dequantized to
   bf16, merged, written as safetensors shards, reloaded and compared with base + adapter.

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
    _peak_wrapper,
    build_model,
    random_words,
)


def write_pairs(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)

    def text(median_chars: int) -> str:
        return random_words(rng, int(min(1500, rng.lognormvariate(0, 0.5) * median_chars)) + 8)

    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(300), "chosen": text(400),
                                "rejected": text(400)}) + "\n")


def dpo_run(model_dir: str, work: Path, steps: int, batch: int, seq: int,
            gpu: bool = True) -> dict:
    import ray
    from rich.console import Console

    import ray_app.ray_session  # noqa: F401 - Ray Train environment defaults
    import ray_app.train.run as run_mod
    from ray_app.config import validate_config

    train, evals = work / "pairs.jsonl", work / "eval_pairs.jsonl"
    write_pairs(train, int(steps * batch * 1.3), seed=0)
    write_pairs(evals, 16, seed=1)
    ray.init(include_dashboard=False, log_to_driver=False)
    cfg = validate_config({
        "model": {"name_or_path": model_dir, "tokenizer": str(TOKENIZER), "dtype": "bfloat16",
                  "quantization": "nf4"},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "target_modules": LORA_TARGETS},
        "data": {"train": [str(train)], "eval": [str(evals)], "format": "preference",
                 "max_seq_len": seq},
        "train": {"method": "dpo", "dpo": {"beta": 0.1}, "max_steps": steps, "lr": 5e-4,
                  "batch_size_per_worker": batch, "log_every": 1, "eval_every": 0,
                  "checkpoint_every": steps, "warmup_ratio": 0.0, "schedule": "constant",
                  "activation_checkpointing": "all"},
        "scaling": {"num_workers": 1, "use_gpu": gpu,
                    "resources_per_worker": {"CPU": 4, "GPU": 1} if gpu else {"CPU": 1}},
        "run": {"name": "dpo8b", "storage_path": str(work / "storage"),
                "output_dir": str(work / "dpo_out"), "max_failures": 0},
    }, source="bench dpo")
    peak_file = work / "peak_dpo.json"
    original = run_mod.train_loop_per_worker
    run_mod.train_loop_per_worker = _peak_wrapper(str(peak_file))
    started = time.perf_counter()
    try:
        summary = run_mod.run_training(cfg, Console(file=sys.stderr, width=120))
    finally:
        run_mod.train_loop_per_worker = original
    peak = json.loads(peak_file.read_text()) if peak_file.exists() else {}
    if summary["status"] != "succeeded":
        raise RuntimeError(f"DPO run failed: {summary.get('error')} / {peak.get('error')}")
    return {"steps": steps, "batch_pairs": batch, "max_seq_len": seq, "run_wall_s":
            round(time.perf_counter() - started, 1), "tokens_per_s": summary["train"]["tokens_per_s"],
            "peak_gib": peak.get("peak_gib"), "reserved_gib": peak.get("reserved_gib"),
            "eval": summary["eval"], "adapter": summary["adapter_path"],
            "train_pairs": summary["data"]["train_sequences"]}


def merge_run(adapter: str, base: str, out: Path) -> dict:
    from rich.console import Console

    from ray_app.errors import UserError
    from ray_app.export.merge import merge_adapter

    started = time.perf_counter()
    try:
        result = merge_adapter(adapter, str(out), base, "bfloat16", "5GB", None,
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
    model_dir = str(args.work / "model_8b")
    if args.cpu_smoke:
        from ray_app.data.tokenize import load_tokenizer
        from ray_app.model.loading import build_tiny_llama

        results["device"], results["model"] = "cpu", "tiny (smoke)"
        model = build_tiny_llama(load_tokenizer(str(TOKENIZER)), seed=0)
    else:
        results["device"] = torch.cuda.get_device_name()
        model = build_model("8b")
    model.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()
    results["save_base_s"] = round(time.perf_counter() - t0, 1)
    save()
    results["dpo_qlora"] = dpo_run(model_dir, args.work, args.steps, args.batch, args.seq,
                                   gpu=not args.cpu_smoke)
    save()
    results["merge"] = merge_run(results["dpo_qlora"]["adapter"], model_dir, args.work / "merged")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
