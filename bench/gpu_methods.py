"""The preference methods side by side on the Llama-3.1-8B shape: DPO, ORPO, SimPO, KTO
(and SFT as the floor), on one GPU, the same data, the same settings.

One process, so that one short device call covers every method: a random-init bf16 model
of the 8B shape is built once on the GPU (no weights downloaded), with Liger's kernels
(`apply_speedups`); for each method a fresh LoRA adapter (r=16, q,k,v,o; `add_lora`) and
ray_app's DDP `Engine` on one process (`Layout(device, 0, 1)`), and each step is
`ray_app.train.steps.optimizer_step` with the method's own collate, loss and statistics:
the training core of a run, without Ray Data, Ray Train, reports or checkpoints (which
cost nothing measurable against it: bench/results/gpu_throughput.md).

Data: `--pairs` preference pairs per step of random token ids, prompt `--prompt` tokens,
chosen and rejected answers `--answer` tokens each, the same pairs for every method:
DPO, ORPO and SimPO train on them as pairs; KTO on the same answers as labelled
completions (chosen desirable, rejected undesirable: 2 x pairs completions per step, plus
its mismatched KL rows, forward only); SFT on the same 2 x pairs sequences.
`--warmup` steps, then `--steps` timed between `torch.cuda.synchronize()` calls.

Reported per method: tokens/s as the loop counts them (every non-pad token of every row
the step computes, KTO's KL rows included), answers/s (answers in the trained forward),
step time, the GPU memory peak (`torch.cuda.max_memory_allocated`, reset before each
method, model included), `ray-app estimate`'s training peak for the same settings, the
loss at the first and the last step and the method's statistics at the last step
(random data: they show the mechanics, not quality).

    python bench/gpu_methods.py --out $OUT
    python bench/gpu_methods.py --out /tmp/m --cpu-smoke   # checks the script on CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_throughput import LORA_ALPHA, LORA_R, LORA_TARGETS, SHAPES, TOKENIZER, build_model

METHOD_NAMES = ("dpo", "orpo", "simpo", "kto", "sft")
# LoRA variants, each run as `METHOD+VARIANT` (e.g. dpo+dora): the settings they change.
# PiSSA moves the base's principal part into the adapter and so changes the base that the
# later runs share: list it last.
VARIANTS = {
    "dora": ({"use_dora": True}, {}),
    "rslora": ({"use_rslora": True}, {}),
    "pissa": ({"init": "pissa_niter_4"}, {}),
    "olora": ({"init": "olora"}, {}),
    "loraplus": ({}, {"lora_plus_ratio": 16.0}),
}


def method_config(spec: str, args, model_dir: str):
    """The config of a run `METHOD[+VARIANT...]`."""
    from ray_app.config import validate_config

    method, *variants = spec.split("+")
    lora_extra, train_extra = {}, {}
    for name in variants:
        lora_extra.update(VARIANTS[name][0])
        train_extra.update(VARIANTS[name][1])
    gpu = not args.cpu_smoke
    return validate_config({
        "model": {"name_or_path": model_dir, "tokenizer": str(TOKENIZER),
                  "dtype": "bfloat16" if gpu else "float32", "liger": "auto" if gpu else "off"},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "target_modules": LORA_TARGETS,
                 **lora_extra},
        "data": {"train": ["unused.jsonl"], "max_seq_len": args.prompt + args.answer,
                 "eval_fraction": 0.0},
        "train": {"method": method, "batch_size_per_worker": args.pairs * (1 if method in (
            "dpo", "orpo", "simpo") else 2), "lr": 5e-5, "schedule": "constant",
                  "warmup_ratio": 0.0, "activation_checkpointing": "none", **train_extra},
        "scaling": {"num_workers": 1, "use_gpu": gpu,
                    "resources_per_worker": {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}},
    }, source=f"bench {method}")


def batches(args, vocab: int, n: int, seed: int = 1):
    """n steps' worth of pairs: (prompt + chosen, prompt + rejected) rows with masked prompts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rows = {"input_ids": [], "labels": [], "rejected_input_ids": [], "rejected_labels": []}
        for _ in range(args.pairs):
            prompt = rng.integers(3, vocab, args.prompt)
            for key in ("", "rejected_"):
                answer = rng.integers(3, vocab, args.answer)
                rows[f"{key}input_ids"].append(np.concatenate([prompt, answer]))
                rows[f"{key}labels"].append(np.concatenate([np.full(args.prompt, -100), answer]))
        out.append(rows)
    return out


def as_method_input(method: str, pairs: dict) -> dict:
    if method in ("dpo", "orpo", "simpo"):
        return pairs
    ids = pairs["input_ids"] + pairs["rejected_input_ids"]
    labels = pairs["labels"] + pairs["rejected_labels"]
    if method == "kto":
        n = len(pairs["input_ids"])
        return {"input_ids": ids, "labels": labels, "desirable": [True] * n + [False] * n}
    return {"input_ids": ids, "labels": labels}


def run_method(method: str, base, args, model_dir: str, data: list[dict], device) -> dict:
    import torch

    from ray_app.data.collate import REAL_TOKENS
    from ray_app.estimate import estimate, plan_from_config, shape_of
    from ray_app.model.loading import add_lora
    from ray_app.train.engines import Engine, Layout
    from ray_app.train.methods import method_for
    from ray_app.train.plan import StepPlan
    from ray_app.train.steps import MicroBatch, optimizer_step

    cfg = method_config(method, args, model_dir)
    training = method_for(cfg)
    plan = StepPlan(micro_batches_per_epoch=1, steps_per_epoch=1, total_steps=1 << 30,
                    warmup_steps=0, has_eval=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    peft_model = add_lora(base, cfg.lora, autocast=device.type == "cuda")
    engine = Engine(peft_model, cfg, plan, Layout(device, 0, 1))
    engine.model.train()
    collate, _ = training.collates(base.config.pad_token_id, False)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    results, answers = [], 0

    def step(pairs: dict):
        nonlocal answers
        inputs = collate(as_method_input(cfg.train.method, pairs))
        real = int(inputs.pop(REAL_TOKENS))
        micro = MicroBatch({k: v.to(device, non_blocking=True) for k, v in inputs.items()},
                           training.units(inputs), real)
        answers = 2 * len(pairs["input_ids"])
        return optimizer_step(engine, training, [micro], autocast), real

    for pairs in data[:args.warmup]:
        results.append(step(pairs)[0].result())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started, tokens, queued = time.perf_counter(), 0, []
    for pairs in data[args.warmup:args.warmup + args.steps]:
        q, real = step(pairs)
        queued.append(q)
        tokens += real
    sync()
    seconds = time.perf_counter() - started
    results += [q.result() for q in queued]
    shape = shape_of(base.config, SHAPES["8b"]["name"])
    est = estimate(shape, plan_from_config(cfg, liger_auto=device.type == "cuda"))
    row = {
        "method": method, "tokens_per_s": tokens / seconds,
        "answers_per_s": answers * args.steps / seconds, "step_s": seconds / args.steps,
        "peak_gib": (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                     else None),
        "estimate_train_peak_gib": round(est.train_peak / 2**30, 2),
        "loss_first": results[0].loss, "loss_last": results[-1].loss,
        "stats_last": results[-1].stats,
    }
    peft_model.unload()  # the base without adapter layers again, for the next method
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--answer", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--methods", default=",".join(METHOD_NAMES),
                        help="comma list of METHOD[+VARIANT] runs; methods: "
                        f"{', '.join(METHOD_NAMES)}; LoRA variants: {', '.join(VARIANTS)}")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the quickstart's tiny model on CPU: checks the script only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from ray_app.data.tokenize import load_tokenizer
    from ray_app.model.loading import apply_speedups, build_tiny_llama

    tok = load_tokenizer(str(TOKENIZER))
    results: dict = {"command": " ".join(sys.argv), "settings": {
        "pairs_per_step": args.pairs, "prompt_tokens": args.prompt, "answer_tokens": args.answer,
        "warmup_steps": args.warmup, "timed_steps": args.steps, "lora": f"r={LORA_R} "
        f"alpha={LORA_ALPHA} on {','.join(LORA_TARGETS)}", "activation_checkpointing": "none"}}
    started = time.perf_counter()
    if args.cpu_smoke:
        device, model = torch.device("cpu"), build_tiny_llama(tok, seed=0)
        results["device"], results["model"] = "cpu", "tiny (smoke)"
    else:
        device = torch.device("cuda")
        # The tokenizer's pad id: random init zeroes the pad row (gpu_dpo_merge.py says why).
        model = build_model("8b", pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        results["device"], results["model"] = torch.cuda.get_device_name(), SHAPES["8b"]["name"]
    model.requires_grad_(False)
    cfg = method_config("dpo", args, "unused")
    model = apply_speedups(model, cfg.model, "none", not args.cpu_smoke)
    results["build_s"] = round(time.perf_counter() - started, 1)
    data = batches(args, model.config.vocab_size, args.warmup + args.steps)
    results["methods"] = []
    for method in args.methods.split(","):
        try:
            results["methods"].append(run_method(method, model, args, "unused", data, device))
        except Exception as err:  # noqa: BLE001 - one method's failure is a result too
            results["methods"].append({"method": method, "error": f"{type(err).__name__}: {err}"})
        (args.out / "gpu_methods.json").write_text(json.dumps(results, indent=2) + "\n")
        print("RESULT", json.dumps(results["methods"][-1]), flush=True)
    (args.out / "gpu_methods.md").write_text(table(results))
    return 0


def table(results: dict) -> str:
    rows = {r["method"]: r for r in results["methods"]}
    dpo = rows.get("dpo", {})
    lines = [f"# Preference methods on the {results['model']}", "",
             f"Device: {results['device']}. Command: `{results['command']}`.", "",
             ("| method | tokens/s | answers/s | vs DPO | step s | peak GiB | estimate GiB | "
              "loss first -> last |"), "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["methods"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:200]} |||||||")
            continue
        ratio = (f"{r['answers_per_s'] / dpo['answers_per_s']:.2f}x"
                 if dpo.get("answers_per_s") else "")
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['method']} | {r['tokens_per_s']:,.0f} | {r['answers_per_s']:.1f} | "
                     f"{ratio} | {r['step_s']:.2f} | {peak} | {r['estimate_train_peak_gib']:.1f} "
                     f"| {r['loss_first']:.4f} -> {r['loss_last']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
