"""Where one training step of the 1B or 8B shape spends its GPU time (torch.profiler).

Profiles 3 training steps, after 3 or 4 warm-up steps, of each of:
- the common recipe at batch 4 (PEFT LoRA r=16 on q,k,v,o, gradient checkpointing, no
  Liger, autocast bf16, AdamW; `--common-batch 0` skips it);
- ray_app's model stack at `--batch` (default 8) without Ray, once per `--precisions`
  entry (default, fp8): `gpu_throughput.plain_loop_step` with Liger, per-layer compile
  and no activation checkpointing, i.e. the package's `load_base`, `apply_speedups`,
  `add_lora` and `make_optimizer`, and its step (`ray_app.train.steps.optimizer_step` with
  the SFT method) through ray_app's DDP `Engine` on one process (`Layout(device, 0, 1)`),
  so the profiled step is the loop's own.
CUDA kernel time is grouped by kind: matmul (cuBLAS/CUTLASS, FP8 `_scaled_mm` included),
attention (SDPA flash/efficient kernels), fp8 quantise (the FP8 path's activation and
gradient quantisation), Triton (Liger and torch.compile's fused kernels), optimizer, other
(elementwise, copies, reductions). 'idle' is the step's wall time not covered by any kernel
(launch gaps, host work). The 25 longest kernels by name are listed too.

    python bench/probes/profile_step.py --out bench/results/profile_8b_step.json
    python bench/probes/profile_step.py --model 1b --batch 16 --common-batch 0 \
        --precisions default,fp8 --out bench/results/profile_1b_step.json
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu_throughput as gt

# First match wins: cuDNN's SDPA kernel names also contain "sm90_".
KINDS = [("attention", r"sdpa|flash|fmha|attention|mem_eff"),
         ("fp8 quantise", r"quantize_rows"),
         ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|sm90_|sm80_"),
         ("optimizer", r"adam|multi_tensor|foreach"),
         ("triton", r"triton|liger|^fused_|_kernel$")]


def kind_of(name: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def profile(step, steps: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    by_kind: dict[str, float] = {}
    top: dict[str, float] = {}
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        seconds = event.device_time / 1e6 / steps  # microseconds over all steps
        by_kind[kind_of(event.name)] = by_kind.get(kind_of(event.name), 0.0) + seconds
        top[event.name[:90]] = top.get(event.name[:90], 0.0) + seconds
    busy = sum(by_kind.values())
    return {"step_s": wall,
            "share": {k: round(v / wall, 4) for k, v in sorted(by_kind.items())},
            "idle_share": round(max(0.0, wall - busy) / wall, 4),
            "top_kernels_s": {k: round(v, 4) for k, v in
                              sorted(top.items(), key=lambda kv: -kv[1])[:25]}}


def ray_app_stack(folder: str, batch: int, seq: int, precision: str):
    return gt.plain_loop_step(folder, Path("/tmp"), batch=batch, seq=seq, compile_=True,
                              liger="on", quantization="none", checkpointing="none",
                              precision=precision)


def common_recipe_stack(model_key: str, batch: int, seq: int):
    from peft import LoraConfig, get_peft_model

    model = gt.build_model(model_key)
    model.requires_grad_(False)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, LoraConfig(
        r=gt.LORA_R, lora_alpha=gt.LORA_ALPHA, lora_dropout=gt.LORA_DROPOUT,
        target_modules=gt.LORA_TARGETS, task_type="CAUSAL_LM")).train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    gen = torch.Generator(device="cuda").manual_seed(1)

    def step() -> None:
        ids = torch.randint(3, model.config.vocab_size, (batch, seq), device="cuda",
                            generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results JSON file")
    parser.add_argument("--model", choices=sorted(gt.SHAPES), default="8b")
    parser.add_argument("--batch", type=int, default=8, help="ray_app stack's batch")
    parser.add_argument("--common-batch", type=int, default=4,
                        help="the common recipe's batch (0: not profiled)")
    parser.add_argument("--precisions", default="default",
                        help="model.precision of each ray_app stack run, comma-separated")
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(0), "model": gt.SHAPES[args.model]["name"],
               "seq": args.seq,
               "command": "python bench/probes/profile_step.py " + " ".join(sys.argv[1:])}

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")

    if args.common_batch:
        step = common_recipe_stack(args.model, args.common_batch, args.seq)
        for _ in range(3):
            step()
        results[f"common_recipe_b{args.common_batch}"] = profile(step, 3)
        print(json.dumps(results[f"common_recipe_b{args.common_batch}"], indent=1), flush=True)
        save()
        del step
        gc.collect()
        torch.cuda.empty_cache()
    folder = f"/tmp/profile_{args.model}"
    if not Path(folder, "config.json").exists():
        gt.build_model(args.model).save_pretrained(folder)
    gc.collect()
    torch.cuda.empty_cache()
    for precision in args.precisions.split(","):
        step = ray_app_stack(folder, args.batch, args.seq, precision)
        for _ in range(4):  # compiles on the first steps
            step()
        key = f"ray_app_stack_b{args.batch}" + ("" if precision == "default" else f"_{precision}")
        results[key] = profile(step, 3)
        print(json.dumps(results[key], indent=1), flush=True)
        save()
        del step
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
