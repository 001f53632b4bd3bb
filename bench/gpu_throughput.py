"""GPU training throughput: a common HF + PEFT recipe against ray_app's own trainer.

One invocation, one GPU, in this order for every model shape asked for:

1. bf16 matmul rate (8192^3 products, median of many) -> `matmul_tflops`, the MFU denominator.
2. common recipe, in this process: random-init Llama in bf16, PEFT LoRA r=16 alpha=32 on
   q,k,v,o, gradient checkpointing, AdamW, autocast bf16, random token ids; warm-up steps,
   then timed steps between `torch.cuda.synchronize()` calls; peak from
   `torch.cuda.max_memory_allocated`.
3. ray_app: the same random weights saved with `save_pretrained`, a JSONL file of `{"text"}`
   records that are all longer than `data.max_seq_len` (so every training sequence is
   exactly max_seq_len tokens: "fixed" data), trained by `ray_app.train.run.run_training`
   through Ray Data and Ray Train on one GPU worker. Throughput is wall-clock: real
   (non-pad) tokens between the rank-0 progress reports after warm-up, divided by the time
   between those reports (data loading, reporting and everything else in the loop
   included). The worker's `torch.cuda.max_memory_allocated` is read by wrapping the
   per-worker loop function.
   The trainer switches the model to training mode only at the end of an evaluation
   (`from_pretrained` returns it in eval mode), so a run without eval data trains in eval
   mode: no LoRA dropout, no activation checkpointing, and Liger's fused linear
   cross-entropy falls back to full logits. The variants therefore get a small eval file
   (8 records, evaluated before the first step and after the last, outside the timed
   window); a `noeval` variant measures the run without one.

MFU counts useful work only, per token:
    4 * N_matmul                      frozen base linears incl. lm_head: forward 2N + input-grad 2N
  + 3 * (2 * layers * seq * hidden)   causal attention scores and values, forward + backward
  + 3 * (2 * N_lora)                  LoRA forward + input-grad + weight-grad
  MFU = tokens_per_s * flops_per_token / (matmul_tflops * 1e12)
Recomputation (activation checkpointing) is not counted.

Run on a GPU machine (Ray, Liger and bitsandbytes importable):
    python bench/gpu_throughput.py --models 1b --out bench/results
Results are appended to <out>/gpu_throughput.json after every measurement; `--table`
rebuilds <out>/gpu_throughput.md from that file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import random
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "ray_app" / "quickstart" / "tokenizer"

SHAPES: dict[str, dict[str, Any]] = {
    "1b": {"name": "Llama-3.2-1B shape", "hidden_size": 2048, "intermediate_size": 8192,
           "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "vocab_size": 128256, "tie_word_embeddings": True},
    "8b": {"name": "Llama-3.1-8B shape", "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "vocab_size": 128256, "tie_word_embeddings": False},
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05


# --------------------------------------------------------------------------- flops


def flops_per_token(shape: dict[str, Any], seq: int, r: int = LORA_R) -> float:
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i  # q, o; k, v; gate, up, down
    n_matmul = layers * per_layer + shape["vocab_size"] * h  # + lm_head
    n_lora = layers * r * ((h + h) * 2 + (h + kv) * 2)  # A and B of q, o, k, v
    return 4 * n_matmul + 3 * (2 * layers * seq * h) + 3 * (2 * n_lora)


def matmul_tflops(n: int = 8192, reps: int = 50) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(10):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


# --------------------------------------------------------------------------- models


def build_model(key: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = {k: v for k, v in SHAPES[key].items() if k != "name"}
    config = LlamaConfig(**shape, max_position_embeddings=131072, rope_theta=500000.0,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                attn_implementation="sdpa")


def common_recipe(model, batch: int, seq: int, warmup: int, steps: int) -> dict[str, Any]:
    """The usual LoRA loop: PEFT, gradient checkpointing, autocast bf16, AdamW."""
    import torch
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
        target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(1)

    def step() -> None:
        ids = torch.randint(3, vocab, (batch, seq), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"tokens_per_s": batch * seq * steps / seconds, "peak_gib": peak,
            "timed_steps": steps, "seconds": seconds}


def common_recipe_qlora(folder: str, batch: int, seq: int, warmup: int,
                        steps: int) -> dict[str, Any]:
    """The same loop on a 4-bit NF4 (double quantization) base loaded from `folder`."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    out = common_recipe(model, batch, seq, warmup, steps)
    del model
    return out


# --------------------------------------------------------------------------- ray_app


def write_fixed_jsonl(path: Path, records: int, chars: int, seed: int = 0) -> None:
    """Unique random-word texts, each far longer than max_seq_len tokens (about 1.2
    characters per token with the bundled 1,024-token tokenizer)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(records):
            words, n = [], 0
            while n < chars:
                w = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
                words.append(w)
                n += len(w) + 1
            f.write(json.dumps({"text": " ".join(words)}) + "\n")


def _peak_wrapper(peak_file: str):
    def loop_with_peak(loop_config):
        import torch

        from ray_app.train.loop import train_loop_per_worker

        gpu = torch.cuda.is_available()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        error = None
        try:
            train_loop_per_worker(loop_config)
        except BaseException as err:
            error = f"{type(err).__name__}: {str(err)[:1000]}"
            raise
        finally:
            if gpu:
                Path(peak_file).write_text(json.dumps({
                    "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
                    "error": error}))

    return loop_with_peak


def ray_app_run(name: str, model_dir: str, data_file: Path, eval_file: Path | None,
                work: Path, *, batch: int,
                seq: int, steps: int, warmup_steps: int, log_every: int, compile_: bool,
                liger: str, quantization: str, checkpointing: str | int,
                use_gpu: bool = True) -> dict[str, Any]:
    import ray
    import ray.data
    from rich.console import Console

    import ray_app.ray_session  # noqa: F401 - sets Ray Train's environment defaults
    import ray_app.train.run as run_mod
    from ray_app.config import validate_config

    if not ray.is_initialized():
        for logger in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(logger).setLevel(logging.WARNING)
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    raw = {
        "model": {"name_or_path": model_dir, "tokenizer": str(TOKENIZER), "dtype": "bfloat16",
                  "attn_implementation": "sdpa", "quantization": quantization,
                  "liger": liger, "compile": compile_},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT,
                 "target_modules": LORA_TARGETS},
        "data": {"train": [str(data_file)], "eval": [str(eval_file)] if eval_file else [],
                 "eval_fraction": 0.0, "format": "text",
                 "max_seq_len": seq, "truncation": "right"},
        "train": {"max_steps": steps, "batch_size_per_worker": batch, "grad_accum_steps": 1,
                  "log_every": log_every, "eval_every": 0, "checkpoint_every": 10_000,
                  "activation_checkpointing": checkpointing, "warmup_ratio": 0.0,
                  "schedule": "constant"},
        "scaling": {"num_workers": 1, "use_gpu": use_gpu, "strategy": "ddp",
                    "resources_per_worker": {"CPU": 4, "GPU": 1} if use_gpu else {"CPU": 1}},
        "run": {"name": name, "storage_path": str(work / "storage"),
                "output_dir": str(work / "outputs" / name), "max_failures": 0},
    }
    cfg = validate_config(raw, source=f"bench {name}")
    peak_file = work / f"peak_{name}.json"
    captured: dict[str, Any] = {}

    class RecordingDisplay(run_mod.ProgressDisplay):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            captured["history"] = ray.get(self.hub.since.remote(0), timeout=30)

    original_display, original_loop = run_mod.ProgressDisplay, run_mod.train_loop_per_worker
    run_mod.ProgressDisplay = RecordingDisplay
    run_mod.train_loop_per_worker = _peak_wrapper(str(peak_file))
    started = time.perf_counter()
    try:
        summary = run_mod.run_training(cfg, Console(file=sys.stderr, width=120))
    finally:
        run_mod.ProgressDisplay, run_mod.train_loop_per_worker = original_display, original_loop
    wall = time.perf_counter() - started
    peak = json.loads(peak_file.read_text()) if peak_file.exists() else {}
    if summary.get("status") != "succeeded":
        raise RuntimeError(f"ray_app run {name} failed: worker error {peak.get('error')!r}; "
                           f"run summary error {summary.get('error')!r}")
    reports = [m for m in captured.get("history", []) if m.get("tokens_per_s") is not None]
    # The report of the last step also holds the final checkpoint: leave it out.
    window = [m for m in reports if warmup_steps <= m["step"] < steps]
    if len(window) < 2:
        raise RuntimeError(f"ray_app run {name}: too few progress reports after warm-up "
                           f"({[m['step'] for m in reports]})")
    first, last = window[0], window[-1]
    tokens = last["tokens_seen"] - first["tokens_seen"]
    seconds = last["time"] - first["time"]
    steps_timed = last["step"] - first["step"]
    return {
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_loop": sum(m["tokens_per_s"] for m in window[1:]) / len(window[1:]),
        "tokens_per_step": tokens / steps_timed,
        "timed_steps": steps_timed, "seconds": seconds,
        "peak_gib": peak.get("peak_gib"), "reserved_gib": peak.get("reserved_gib"),
        "run_wall_s": wall, "summary_tokens_per_s": summary["train"]["tokens_per_s"],
        "data_sequences": summary["data"].get("train_sequences")
        or summary["data"].get("train_records"),
    }


# --------------------------------------------------------------------------- driver


class Results:
    def __init__(self, out: Path, command: str):
        self.file = out / "gpu_throughput.json"
        self.command = command
        self.rows: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict[str, Any]) -> None:
        row = {**row, "date": dt.date.today().isoformat(), "command": self.command}
        self.rows.append(row)
        self.file.write_text(json.dumps(self.rows, indent=2) + "\n")
        write_table(self.rows, self.file.with_suffix(".md"))
        keys = ("model", "variant", "method", "batch", "tokens_per_s", "mfu", "peak_gib")
        print("RESULT", json.dumps({k: row.get(k) for k in keys}), flush=True)


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    def num(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [
        "# GPU training throughput",
        "",
        ("Tokens/s are real (non-pad) training tokens per second after warm-up, one GPU, "
         "sequence length 2048, LoRA r=16 alpha=32 on q,k,v,o, bf16. MFU = tokens/s x useful "
         "flops per token / measured bf16 matmul rate (see `bench/gpu_throughput.py`; "
         "recomputation not counted), with the matmul rate measured in the same run. Peak is "
         "`torch.cuda.max_memory_allocated` of the training process. ray_app runs get an "
         "8-record eval file; 'no eval data' is the same run without it, where the trainer "
         "stays in eval mode (no dropout, no activation checkpointing, Liger's fused "
         "linear cross-entropy falls back to full logits; see the script's docstring)."),
        "",
        ("| model | variant | method | settings | device | batch | tokens/s | MFU | peak GiB "
         "| matmul TFLOP/s |"),
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['method']} | {r.get('settings', '')} "
            f"| {r['device']} | {r['batch']} | {num(r['tokens_per_s'], ',.0f')} "
            f"| {num(r['mfu'] * 100 if r.get('mfu') is not None else None, '.1f')}% "
            f"| {num(r['peak_gib'], '.1f')} | {num(r['matmul_tflops'], '.0f')} |")
    commands = sorted({r["command"] for r in rows})
    lines += ["", "Command:" if len(commands) == 1 else "Commands:", ""]
    lines += [f"    {c}" for c in commands]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b", help="comma list of: " + ", ".join(SHAPES))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="/tmp/gpu_throughput")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--common-batch", type=int, default=4)
    parser.add_argument("--ray-batch", default="1b:8,8b:4",
                        help="ray_app batch per model, e.g. 1b:8,8b:4")
    parser.add_argument("--ray-variants", default="liger,liger+compile,qlora",
                        help="comma list of ray_app variants, each options joined by '+' "
                        "(liger | noliger, compile, qlora, noeval) and an optional ':BATCH', "
                        "e.g. liger+compile:16,qlora:8")
    parser.add_argument("--common-qlora", action="store_true",
                        help="also time the common recipe on a 4-bit NF4 base")
    parser.add_argument("--ray-steps", type=int, default=40)
    parser.add_argument("--deadline-s", type=float, default=1e9,
                        help="skip measurements that would start after this many seconds")
    parser.add_argument("--table", action="store_true", help="only rebuild the markdown table")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table:
        write_table(json.loads((out / "gpu_throughput.json").read_text()),
                    out / "gpu_throughput.md")
        return 0

    import torch

    t0 = time.perf_counter()
    command = "python bench/gpu_throughput.py " + shlex.join(sys.argv[1:])
    results = Results(out, command)
    device = torch.cuda.get_device_name(0)
    tflops = matmul_tflops()
    print(f"bf16 matmul 8192^3: {tflops:.1f} TFLOP/s on {device}", flush=True)
    work = Path(args.work)
    data_file, eval_file = work / "fixed.jsonl", work / "fixed_eval.jsonl"
    ray_batch = dict(item.split(":") for item in args.ray_batch.split(","))
    failures = []

    for key in args.models.split(","):
        shape = SHAPES[key]
        fpt = flops_per_token(shape, args.seq)
        base = {"model": shape["name"], "gpus": 1, "device": device, "seq_len": args.seq,
                "data": "fixed", "matmul_tflops": round(tflops, 1),
                "flops_per_token": fpt}

        def add(variant, method, strategy, batch, settings, m, base=base, fpt=fpt):
            results.add({**base, "variant": variant, "method": method, "strategy": strategy,
                         "batch": batch, "settings": settings,
                         "tokens_per_s": round(m["tokens_per_s"], 1),
                         "mfu": round(m["tokens_per_s"] * fpt / (tflops * 1e12), 4),
                         "peak_gib": None if m.get("peak_gib") is None
                         else round(m["peak_gib"], 2),
                         **{k: v for k, v in m.items() if k not in ("tokens_per_s", "peak_gib")}})

        model_dir = str(work / f"model_{key}")
        model = build_model(key)
        model.save_pretrained(model_dir)
        print(f"{shape['name']}: saved random-init bf16 model to {model_dir} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        try:
            m = common_recipe(model, args.common_batch, args.seq, warmup=3,
                              steps=15 if key == "1b" else 10)
            add("common_recipe", "lora", "single-gpu", args.common_batch,
                "HF+PEFT, grad ckpt, autocast bf16, AdamW", m)
        except Exception as err:  # noqa: BLE001 - keep measuring the rest
            failures.append(f"common_recipe lora {key}: {err!r}")
            traceback.print_exc()
        del model
        gc.collect()
        torch.cuda.empty_cache()
        if args.common_qlora and time.perf_counter() - t0 < args.deadline_s:
            try:
                m = common_recipe_qlora(model_dir, args.common_batch, args.seq, warmup=2,
                                        steps=8)
                add("common_recipe", "qlora", "single-gpu", args.common_batch,
                    "HF+PEFT, NF4 double quant, grad ckpt, autocast bf16, AdamW", m)
            except Exception as err:  # noqa: BLE001
                failures.append(f"common_recipe qlora {key}: {err!r}")
                traceback.print_exc()
            gc.collect()
            torch.cuda.empty_cache()

        if not data_file.exists():
            chars = int(args.seq * 1.6) + 400
            write_fixed_jsonl(data_file, records=1000, chars=chars)
            write_fixed_jsonl(eval_file, records=8, chars=chars, seed=1)
        for spec in args.ray_variants.split(","):
            if time.perf_counter() - t0 > args.deadline_s:
                print(f"deadline: skipping ray_app {spec} {key}", flush=True)
                continue
            opts, _, batch_text = spec.partition(":")
            opts_set = set(opts.split("+"))
            batch = int(batch_text or ray_batch[key])
            qlora = "qlora" in opts_set
            compile_ = "compile" in opts_set
            liger = "off" if "noliger" in opts_set else "on"
            with_eval = "noeval" not in opts_set
            ckpt: str | int = "all" if qlora else "none"
            while True:
                settings = (f"Ray Train ddp, liger {liger}, compile {str(compile_).lower()}, "
                            f"act. ckpt {ckpt}" + (", NF4 double quant" if qlora else "")
                            + ("" if with_eval else ", no eval data"))
                name = f"{key}-{opts.replace('+', '-')}-b{batch}"
                try:
                    m = ray_app_run(
                        name, model_dir, data_file, eval_file if with_eval else None, work,
                        batch=batch, seq=args.seq, steps=args.ray_steps if key == "1b" else 30,
                        warmup_steps=10, log_every=5, compile_=compile_, liger=liger,
                        quantization="nf4" if qlora else "none", checkpointing=ckpt)
                    add("ray_app", "qlora" if qlora else "lora", "ddp", batch, settings, m)
                except Exception as err:  # noqa: BLE001
                    failures.append(f"ray_app {name}: {type(err).__name__}: {err}")
                    traceback.print_exc()
                    if "out of memory" in str(err).lower() and batch > 1:
                        batch //= 2  # the worker ran out of GPU memory: try half the batch
                        continue
                break
        os.system(f"rm -rf {shlex.quote(model_dir)}")

    print("\n| model | variant | method | batch | tokens/s | MFU | peak GiB |")
    for r in results.rows:
        print(f"| {r['model']} | {r['variant']} {r.get('settings', '')} | {r['method']} "
              f"| {r['batch']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} "
              f"| {r['peak_gib']} |")
    for f in failures:
        print("FAILED:", f)
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
