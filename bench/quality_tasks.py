"""Learnable synthetic corpora for the FP8 quality runs (`gpu_fp8.py quality`), and the
short full-parameter pre-training that gives their LoRA runs a base that already reads.

- `progressions`: arithmetic progressions as text ('count from 17 by 3: 17 20 23 ...');
  after the first two numbers every token follows. On a random-init base a LoRA run sits
  for 60-90 steps on a plateau at the uniform loss over the tokenizer's 1,024 ids, and
  when it leaves it decides the end: two bf16 runs of one config ended 3.6% apart
  (bench/results/gpu_fp8.md), too chaotic to show a 1% difference.
- `words`: a first-order Markov chain over the bundled tokenizer's single-token words
  (each word is one prediction), `CHAIN_SUCCESSORS` successors a word with Zipf weights;
  its entropy rate (`chain_entropy`) is the loss floor. The LoRA runs fine-tune a base
  pre-trained (`pretrain_base`) on another chain over the same words plus progressions,
  so they adapt a base that knows the tokens, as fine-tuning does. They still sit ~60
  steps near the uniform loss over the words before the new transitions take; bf16 runs
  of different train.seeds end 1.0% (two, H100) to 2.3% (three, H200) apart, so FP8 is
  judged on the mean over seeds.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any

import gpu_throughput as gt

CHAIN_SUCCESSORS = 8
TRAIN_CHAIN, BASE_CHAIN = 1, 0  # transition tables: the LoRA runs' task, the base's


def write_progressions(path: Path, records: int, seed: int) -> None:
    """Arithmetic progressions as text ('count from 17 by 3: 17 20 23 ...'): after the first
    two numbers every token is predictable, so the loss can fall far below its start."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(records):
            start, step = rng.randint(0, 999), rng.randint(1, 19)
            numbers = " ".join(str(start + i * step) for i in range(rng.randint(150, 400)))
            f.write(json.dumps({"text": f"count from {start} by {step}: {numbers}"}) + "\n")


def chain_words() -> list[str]:
    """The lower-case words that the bundled tokenizer encodes, with their leading space, as
    one token each."""
    from ray_app.data.tokenize import load_tokenizer

    tokenizer = load_tokenizer(str(gt.TOKENIZER))
    candidates = sorted({t[1:] for t in tokenizer.get_vocab()
                         if t.startswith("\u0120") and re.fullmatch(r"[a-z]{2,12}", t[1:])})
    return [w for w in candidates
            if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


def chain_weights() -> list[float]:
    harmonic = sum(1 / (i + 1) for i in range(CHAIN_SUCCESSORS))
    return [1 / (i + 1) / harmonic for i in range(CHAIN_SUCCESSORS)]


def chain_entropy() -> float:
    """Nats per word of the chain: the loss floor on its words."""
    return -sum(p * math.log(p) for p in chain_weights())


def chain_table(words: list[str], table: int) -> list[list[int]]:
    rng = random.Random(1000 + table)
    return [rng.sample(range(len(words)), CHAIN_SUCCESSORS) for _ in words]


def write_word_chain(path: Path, records: int, seed: int, table: int = TRAIN_CHAIN) -> None:
    """`records` texts of 300-900 words walked along transition table `table`."""
    words = chain_words()
    successors, weights = chain_table(words, table), chain_weights()
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(records):
            word, walk = rng.randrange(len(words)), []
            for _ in range(rng.randint(300, 900)):
                walk.append(words[word])
                word = rng.choices(successors[word], weights)[0]
            f.write(json.dumps({"text": " ".join(walk)}) + "\n")


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def base_corpus(work: Path, records: int) -> list[str]:
    """The base's pre-training texts, written to `work`: `records` in all, half walks of the
    base chain, half progressions, shuffled."""
    write_word_chain(work / "base_words.jsonl", records // 2, seed=10, table=BASE_CHAIN)
    write_progressions(work / "base_progressions.jsonl", records - records // 2, seed=11)
    texts = read_texts(work / "base_words.jsonl") + read_texts(work / "base_progressions.jsonl")
    random.Random(0).shuffle(texts)
    return texts


def token_rows(texts: list[str], seq: int):
    """The texts in the bundled tokenizer's ids, each followed by EOS, packed end to end
    into rows of `seq` tokens (a torch tensor [rows, seq]; the remainder is dropped)."""
    import torch

    from ray_app.data.tokenize import load_tokenizer

    tokenizer = load_tokenizer(str(gt.TOKENIZER))
    ids = [i for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]
           for i in encoded + [tokenizer.eos_token_id]]
    return torch.tensor(ids[:len(ids) // seq * seq]).view(-1, seq)


def warmup_cosine(steps: int, warmup: int):
    """The learning-rate factor of step s: linear warm-up over `warmup` steps, then cosine
    to zero at `steps` (for `torch.optim.lr_scheduler.LambdaLR`)."""
    return lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))


def pretrain_base(work: Path, steps: int, batch: int = 8, seq: int = 2048,
                  lr: float = 5e-4) -> tuple[str, dict[str, Any]]:
    """The random-init Llama-3.2-1B shape trained in full (fp32 weights, bf16 autocast,
    AdamW, 10 warm-up steps then cosine) for `steps` steps of `batch` x `seq` tokens on
    the base chain's words and progressions (half each, packed end to end with EOS), saved
    in bf16 to `work`; returns its folder and the run's record (loss every 10 steps)."""
    import torch

    model_dir = work / f"model_1b_pretrained_{steps}"
    record_file = model_dir / "pretrain.json"
    if record_file.exists():
        return str(model_dir), json.loads(record_file.read_text())
    rows = token_rows(base_corpus(work, steps * batch * seq // 600 + 100), seq)
    if len(rows) < steps * batch:
        raise RuntimeError(f"pre-training corpus too short: {len(rows)} rows")
    model = gt.build_model("1b").float().train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, 10))
    curve, start = [], time.perf_counter()
    for step in range(steps):
        x = rows[step * batch:(step + 1) * batch].cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            curve.append({"step": step + 1, "loss": loss.item()})
            print("PRETRAIN", json.dumps(curve[-1]), flush=True)
    record = {"steps": steps, "batch": batch, "seq": seq, "lr": lr, "curve": curve,
              "seconds": time.perf_counter() - start,
              "corpus": "base chain words and progressions, half each"}
    model.to(torch.bfloat16).save_pretrained(model_dir)
    del model, optimizer
    torch.cuda.empty_cache()
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return str(model_dir), record
