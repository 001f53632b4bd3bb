"""Peak memory and time of the preference methods' per-answer log-probs: in chunks under
activation checkpointing (`answers.answer_logps`, what DPO, ORPO, SimPO and KTO use)
against the whole answer logits in one piece (the baseline), forward + backward, each in
a fresh process, on a Llama-3 vocabulary (128,256) with a narrow body, so that the
logits dominate as they do at 8B. Checks that both give the same log-probs and gradients.

    python bench/answer_logps_memory.py --out bench/results/answer_logps_memory.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("whole", "chunked")


def _measure(variant: str, pairs: int, prompt: int, answer: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ray_app.data.tokenize import IGNORE
    from ray_app.train.methods import answers

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128_256, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False))
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, config.vocab_size, prompt + answer) for _ in range(2 * pairs)]
    labels = [np.where(np.arange(len(r)) < prompt, IGNORE, r) for r in rows]
    batch = answers.PairCollate(pad_id=0)({
        "input_ids": rows[:pairs], "labels": labels[:pairs],
        "rejected_input_ids": rows[pairs:], "rejected_labels": labels[pairs:]})
    if variant == "whole":
        answers.LOGITS_BUDGET_BYTES = 1 << 62  # one chunk: the logits in one piece
    params = [p for p in model.parameters() if p.requires_grad]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, sums = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        sums, _ = answers.answer_logps(model, batch, contextlib.nullcontext())
        grads = torch.autograd.grad(sums.sum(), params)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "peak_rss_above_model_mb": round((peak - base_rss) / 1024),
            "first_s": round(times[0], 3), "steady_s": round(statistics.median(times[1:]), 3),
            "logps": sums.tolist(), "grad_norm": float(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g) for g in grads])))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--answer", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/answer_logps_memory.json"))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_measure(args.variant, args.pairs, args.prompt, args.answer,
                                  args.repeats)))
        return
    shape = ["--pairs", str(args.pairs), "--prompt", str(args.prompt), "--answer",
             str(args.answer), "--repeats", str(args.repeats)]
    results = {}
    for variant in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--variant", variant, *shape],
                              capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    whole, chunked = results["whole"], results["chunked"]
    drift = max(abs(a - b) for a, b in zip(whole["logps"], chunked["logps"]))
    report = {
        "command": "python bench/answer_logps_memory.py " + " ".join(shape),
        "shape": {"pairs": args.pairs, "prompt_tokens": args.prompt,
                  "answer_tokens": args.answer, "vocab": 128_256},
        "whole_logits": {k: v for k, v in whole.items() if k != "logps"},
        "chunked": {k: v for k, v in chunked.items() if k != "logps"},
        "max_abs_logp_difference": drift,
        "grad_norm_relative_difference": abs(whole["grad_norm"] - chunked["grad_norm"])
        / whole["grad_norm"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
