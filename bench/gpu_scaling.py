"""Multi-GPU scaling through `ray-app train`: FSDP2 LoRA / QLoRA on 1..N GPUs of one node.

For each GPU count, one run of `ray_app.train.run.run_training` (Ray Data + Ray Train, as
`ray-app train` runs it; `gpu_throughput.ray_app_run`) with `scaling.strategy=fsdp` (or
`--strategy`), one worker per GPU, Liger on, no activation checkpointing for LoRA (all
layers for QLoRA), a report every step, pre-tokenized random-word records longer than
`--seq` (every sequence full), random-init weights written straight to safetensors shards
(no GPU needed to make them, so the 70B shape needs no GPU that holds it whole).
Reported per run: total and per-GPU tokens/s (real tokens between the reports of rank 0
after `--warmup` steps, collected through `run_training`'s `on_metrics`, over the time
between them), MFU per GPU against a bf16 matmul timed in the same run (flops per token
from `ray_app.train.flops.flops_per_token`, as in bench/gpu_throughput.py), the peak GPU
memory that rank 0's worker reports (`peak_gib`, evaluation included; there is no eval
data here), and the scaling efficiency tokens/s(N) / (N x tokens/s(1)) against the 1-GPU
run of the same model and method.

`--kill-worker-after-s T` is the elastic check: T seconds after the workers start, one
worker process gets SIGKILL; the run restarts from its last checkpoint by itself
(run.max_failures=1) and the row records the restart, the step it resumed from and the
steps lost (`run_training`'s summary: `train.restart_history`).

    python bench/gpu_scaling.py --model 8b --gpus 1,2,4,8                 # 8B LoRA scaling
    python bench/gpu_scaling.py --model 70b --gpus 8 --method lora,qlora --batch 2
    python bench/gpu_scaling.py --model 8b --gpus 8 --steps 60 --kill-worker-after-s 120
    python bench/gpu_scaling.py --cpu-smoke    # the same code on CPU: tiny shape, gloo

`--cpu-smoke` runs 1 and 2 CPU workers (of the counts asked for) on a tiny shape with
sequences of 64 tokens and batch 2, at most 12 steps: it checks the script, its figures
mean nothing. Every finished run is appended to <out>/gpu_scaling.json
(gpu_scaling_smoke.json for the smoke run); the .md beside it is rebuilt from it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_throughput import (
    SHAPES,
    TOKENIZER,
    llama_config,
    matmul_tflops,
    ray_app_run,
    shape_flops_per_token,
    write_fixed_jsonl,
)

SCALING_SHAPES = {
    **SHAPES,
    "70b": {"name": "Llama-3.1-70B shape", "hidden_size": 8192, "intermediate_size": 28672,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
            "vocab_size": 128256, "tie_word_embeddings": False},
    "tiny": {"name": "tiny Llama (CPU smoke)", "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 1024, "tie_word_embeddings": False},
}


def write_random_checkpoint(key: str, folder: Path, shard_gib: float = 4.0) -> Path:
    """A random-init Llama of shape `key` as safetensors shards + index + config, made
    tensor by tensor on the CPU (never the whole model in memory). Norm weights are 1,
    everything else N(0, 0.02); no zeroed pad row (a zero embedding row as a sequence's
    first token gives RMSNorm a zero input and NaN gradients)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from ray_app.data.tokenize import load_tokenizer

    if (folder / "config.json").exists():
        return folder
    tokenizer = load_tokenizer(str(TOKENIZER))
    config = llama_config(SCALING_SHAPES[key], bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    with torch.device("meta"):
        names = [(n, t.shape) for n, t in AutoModelForCausalLM.from_config(config)
                 .state_dict().items()]
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, Any] = {}
    shard_bytes, total, weight_map, files = 0, 0, {}, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_bytes = {}, 0

    for name, size in names:
        tensor = torch.empty(size, dtype=torch.bfloat16)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, config.initializer_range, generator=generator)
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
        total += tensor.numel() * 2
        if shard_bytes >= shard_gib * 2**30:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    return folder


class WorkerKiller(threading.Thread):
    """SIGKILLs one Ray Train worker process `after_s` seconds after all `workers` are up."""

    def __init__(self, workers: int, after_s: float):
        super().__init__(daemon=True)
        self.workers, self.after_s = workers, after_s
        self.killed: dict[str, Any] = {}
        self.stop = threading.Event()

    @staticmethod
    def _alive() -> list[Any]:
        """Ray Train worker processes on this node (Ray titles them ray::RayTrainWorker...)."""
        import psutil

        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or [])
            if cmdline.startswith("ray::RayTrainWorker"):
                found.append(proc)
        return found

    def run(self) -> None:
        while not self.stop.is_set() and len(self._alive()) < self.workers:
            time.sleep(1)
        if self.stop.wait(self.after_s):
            return
        alive = self._alive()
        if alive:
            victim = alive[-1]
            victim.kill()
            self.killed = {"pid": victim.pid, "at": time.time()}
            print(f"killed Ray Train worker pid {victim.pid}", flush=True)


def run_one(args, key: str, model_dir: Path, data_file: Path, work: Path, gpus: int,
            method: str, tflops: float | None) -> dict[str, Any]:
    shape = SCALING_SHAPES[key]
    qlora = method == "qlora"
    name = f"scale_{key}_{method}_{gpus}gpu" + ("_kill" if args.kill_worker_after_s else "")
    killer = None
    if args.kill_worker_after_s:
        killer = WorkerKiller(gpus, args.kill_worker_after_s)
        killer.start()
    try:
        m = ray_app_run(
            f"{name}_{time.time_ns()}", str(model_dir), data_file, None, work,
            batch=args.batch, seq=args.seq, steps=args.steps, warmup_steps=args.warmup,
            log_every=1, compile_=False, liger="off" if args.cpu_smoke else "on",
            quantization="nf4" if qlora else "none",
            checkpointing="all" if qlora else args.checkpointing,
            use_gpu=not args.cpu_smoke, num_workers=gpus, strategy=args.strategy,
            worker_cpus=0.5 if args.cpu_smoke else None,
            checkpoint_every=args.checkpoint_every if args.kill_worker_after_s else 10_000,
            max_failures=1 if args.kill_worker_after_s else 0)
    finally:
        if killer:
            killer.stop.set()
    fpt = shape_flops_per_token(shape, args.seq)
    row = {
        "model": shape["name"], "variant": "ray_app", "method": method,
        "strategy": args.strategy, "gpus": gpus, "batch": args.batch, "seq_len": args.seq,
        "data": "fixed", "tokens_per_s": round(m["tokens_per_s"], 1),
        "tokens_per_s_per_gpu": round(m["tokens_per_s"] / gpus, 1),
        "mfu": round(m["tokens_per_s"] * fpt / (gpus * tflops * 1e12), 4) if tflops else None,
        "peak_gib": None if m["peak_gib"] is None else round(m["peak_gib"], 2),
        "matmul_tflops": None if tflops is None else round(tflops, 1),
        "settings": f"Ray Train {args.strategy}, liger {'off' if args.cpu_smoke else 'on'}, "
                    f"act. ckpt {'all' if qlora else args.checkpointing}"
                    + (", NF4 double quant" if qlora else ""),
        "run_wall_s": round(m["run_wall_s"], 1), "timed_steps": m["timed_steps"],
        "restarts": m["restarts"], "restart_history": m["restart_history"],
    }
    if killer:
        row["killed_worker"] = killer.killed
    return row


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    one = {(r["model"], r["method"]): r["tokens_per_s"] for r in rows
           if r["gpus"] == 1 and not r.get("killed_worker")}
    lines = ["# Multi-GPU scaling through `ray-app train`", "",
             ("Per row: one `run_training` with one worker per GPU. Scaling efficiency = "
             "tokens/s(N) / (N x tokens/s(1)) against the 1-GPU row of the same model and "
             "method. MFU per GPU against the bf16 matmul rate of the same run."), "",
             ("| model | method | strategy | GPUs | batch/GPU | tokens/s | per GPU | scaling | MFU "
             "| peak GiB | worker killed: resumed from step, steps lost, recovery s | device | date |"),
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        base = one.get((r["model"], r["method"]))
        killed = r.get("killed_worker") is not None
        eff = f"{r['tokens_per_s'] / (r['gpus'] * base):.1%}" if base and not killed else "-"
        restarts = "; ".join(f"{x['resumed_from_step']}, {x['steps_lost']}, {x['recovery_s']}"
                             for x in r.get("restart_history") or [])
        if killed:
            restarts = restarts or ("no restart" if r["killed_worker"] else "not killed")
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        lines.append(f"| {r['model']} | {r['method']} | {r['strategy']} | {r['gpus']} | "
                     f"{r['batch']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} "
                     f"| {eff} | {mfu} | {peak} | {restarts or '-'} | {r['device']} | "
                     f"{r['date']} |")
    commands = sorted({r["command"] for r in rows})
    lines += ["", "Commands:", "", *[f"    {c}" for c in commands]]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="8b", choices=sorted(SCALING_SHAPES))
    parser.add_argument("--gpus", default="1,2,4,8", help="comma list of GPU counts")
    parser.add_argument("--method", default="lora", help="comma list of: lora, qlora")
    parser.add_argument("--strategy", default="fsdp", choices=["fsdp", "ddp", "deepspeed"])
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8, help="steps left out of the timing")
    parser.add_argument("--checkpointing", default="none",
                        help="activation checkpointing for LoRA runs: none, all or n")
    parser.add_argument("--kill-worker-after-s", type=float, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--out", default=str(REPO / "bench/results"))
    parser.add_argument("--work", default="/tmp/gpu_scaling")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shape on CPU workers (gloo): checks the script, no figures")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.model, args.seq, args.batch = "tiny", 64, 2
        args.steps, args.warmup = min(args.steps, 12), min(args.warmup, 2)
    gpu_counts = [int(g) for g in args.gpus.split(",")]
    if args.cpu_smoke:
        gpu_counts = [g for g in gpu_counts if g <= 2] or [1]
    work = Path(args.work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / ("gpu_scaling_smoke.json" if args.cpu_smoke else "gpu_scaling.json")
    rows = json.loads(results_file.read_text()) if results_file.exists() else []
    command = "python bench/gpu_scaling.py " + shlex.join(sys.argv[1:])

    tflops, device = None, "CPU"
    if not args.cpu_smoke:
        import torch

        device = torch.cuda.get_device_name(0)
        tflops = matmul_tflops()
        print(f"bf16 matmul: {tflops:.1f} TFLOP/s on {device}", flush=True)
    started = time.perf_counter()
    model_dir = write_random_checkpoint(args.model, work / f"model_{args.model}")
    print(f"model {model_dir} ready ({time.perf_counter() - started:.0f} s)", flush=True)
    data_file = work / f"data_{args.seq}.jsonl"
    records = int(1.3 * args.batch * max(gpu_counts) * args.steps) + 16
    write_fixed_jsonl(data_file, records=records, chars=int(args.seq * 1.6) + 400)

    failures = []
    for method in args.method.split(","):
        for gpus in gpu_counts:
            try:
                row = run_one(args, args.model, model_dir, data_file, work, gpus, method, tflops)
            except Exception as err:  # noqa: BLE001 - keep measuring the other counts
                failures.append(f"{method} {gpus} GPU(s): {err!r}")
                print(f"FAILED {failures[-1]}", flush=True)
                continue
            row.update(device=device, date=dt.date.today().isoformat(), command=command)
            rows.append(row)
            results_file.write_text(json.dumps(rows, indent=1) + "\n")
            write_table(rows, results_file.with_suffix(".md"))
            print("RESULT", json.dumps(row), flush=True)
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
