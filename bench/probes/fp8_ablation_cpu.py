"""The FP8 quality question at toy scale on CPU: does e4m3 rounding alone (exact
accumulation) slow LoRA fine-tuning?

A small Llama (4 layers, hidden 256, the bundled tokenizer's 1,024 ids) is trained in full
(fp32, AdamW 2e-3, cosine, batch 8 x 256) for --pretrain-steps on the base word chain and
progressions of `bench/quality_tasks.py`, then LoRA r16 on q,k,v,o (dropout 0.05, AdamW
1e-3, cosine) learns the other chain for --steps, once per --runs entry VARIANT:SEED:
- fp32: the base in fp32, as is;
- fp8: every frozen decoder linear a `FrozenFP8Linear` (e4m3 rowwise; CPU's `_scaled_mm`
  accumulates exactly, so this is the FP8 path without Hopper's fast accumulation);
- activation_rounding, weight_rounding: `ray_app.model.fp8_ablations`.
Final eval loss on 16 held-out rows; the train loss every 20 steps. What a GPU run of the
1B shape shows is what counts (bench/results/gpu_fp8.md); this is a hint at most.

    python bench/probes/fp8_ablation_cpu.py --out bench/results/fp8_ablation_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality_tasks as qt  # after the path insert
import torch

SEQ, BATCH = 256, 8


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ))


def pretrain(work: Path, steps: int) -> tuple[dict, list[float]]:
    rows = qt.token_rows(qt.base_corpus(work, 400), SEQ)
    model = small_llama().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, qt.warmup_cosine(steps, 10))
    curve = []
    for step in range(steps):
        start = (step * BATCH) % (len(rows) - BATCH)
        x = rows[start:start + BATCH]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 20 == 0:
            curve.append(round(loss.item(), 4))
    return model.state_dict(), curve


def finetune(state: dict, work: Path, variant: str, seed: int, steps: int) -> dict:
    from ray_app.config import LoraSection
    from ray_app.model.fp8 import to_fp8_base
    from ray_app.model.fp8_ablations import ABLATION_ENV
    from ray_app.model.loading import add_lora

    base = small_llama()
    base.load_state_dict(state)
    torch.manual_seed(seed)
    model = add_lora(base.requires_grad_(False), LoraSection(
        r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    if variant != "fp32":
        os.environ.pop(ABLATION_ENV, None)
        if variant != "fp8":
            os.environ[ABLATION_ENV] = variant
        try:
            to_fp8_base(model, torch.device("cpu"), min_features=16)
        finally:
            os.environ.pop(ABLATION_ENV, None)
    qt.write_word_chain(work / "words.jsonl", 300, seed=0)
    qt.write_word_chain(work / "words_eval.jsonl", 8, seed=1)
    train = qt.token_rows(qt.read_texts(work / "words.jsonl"), SEQ)
    evals = qt.token_rows(qt.read_texts(work / "words_eval.jsonl"), SEQ)[:16]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, qt.warmup_cosine(steps, 6))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    curve, started = [], time.perf_counter()
    model.train()
    for step in range(steps):
        start = (step * BATCH) % (len(train) - BATCH)
        x = train[order[start:start + BATCH]]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            curve.append({"step": step + 1, "loss": round(loss.item(), 4)})
    model.eval()
    with torch.no_grad():
        eval_loss = sum(model(input_ids=evals[i:i + 4], labels=evals[i:i + 4]).loss.item()
                        for i in range(0, len(evals), 4)) / math.ceil(len(evals) / 4)
    return {"variant": variant, "seed": seed, "eval_loss_final": eval_loss, "curve": curve,
            "seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/fp8_ablation_cpu.json")
    parser.add_argument("--work", default="/tmp/fp8_ablation_cpu")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", default="fp32:1,fp32:2,fp8:1,fp8:2,activation_rounding:1,"
                        "weight_rounding:1")
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    state, pretrain_curve = pretrain(work, args.pretrain_steps)
    results = {"command": "python bench/probes/fp8_ablation_cpu.py " + " ".join(sys.argv[1:]),
               "torch": torch.__version__, "pretrain_curve_every_20": pretrain_curve,
               "runs": []}
    for run in args.runs.split(","):
        variant, seed = run.split(":")
        results["runs"].append(finetune(state, work, variant, int(seed), args.steps))
        print(json.dumps({k: v for k, v in results["runs"][-1].items() if k != "curve"}),
              flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
