"""GPU training throughput: a common HF + PEFT recipe against ray_app's own trainer.

One invocation, one GPU. First the bf16 matmul rate (8192^3 products, median of 50 after
10 warm-up products): `matmul_tflops`, the MFU denominator. Then, for every model shape
(`--models`: random-init Llama-3.2-1B and Llama-3.1-8B shapes in bf16, no weights
downloaded) and every data kind (`--data`):

1. Common recipe, in this process: PEFT LoRA r=16 alpha=32 dropout 0.05 on q,k,v,o,
   gradient checkpointing, AdamW, autocast bf16, clipping at 1.0; 3 warm-up steps, then
   15 (1B) or 10 (8B) steps timed between `torch.cuda.synchronize()` calls; peak from
   `torch.cuda.max_memory_allocated` (model included). `--common-qlora` repeats it on a
   4-bit NF4 base (double quantization; 2 warm-up and 8 timed steps).
2. Plain loop (`--plain-variants`, fixed data only): ray_app's model stack without Ray.
   The package's `load_base`, `apply_speedups`, `add_lora` and `make_optimizer`; each step
   is `ray_app.train.steps.optimizer_step` with the SFT method and its training collate on
   random ids, through ray_app's DDP `Engine` on one process (its backward,
   clipping, optimizer and scheduler step). 5 warm-up and 15 timed steps between CUDA
   synchronisations, no Ray Train, Ray Data, reports or checkpoints: the baseline that the
   Ray overhead of a ray_app run with the same settings and batch is measured against.
3. ray_app (`--ray-variants`): the same random weights saved with `save_pretrained` and a
   JSONL file of `{"text"}` records, trained by `ray_app.train.run.run_training` (Ray Data
   and Ray Train, one GPU worker, SFT, constant learning rate) for `--ray-steps` (1B) or
   30 (8B) steps with a report every 5 steps. Every report of rank 0 is collected through
   `run_training(..., on_metrics=...)`. Throughput is wall clock: the real (non-pad)
   tokens trained between the report of step 10 and the last report before the final
   step (the loop's `tokens_seen`), over the time between those reports as the driver's
   progress hub received them (their `time`), so data loading, reporting and everything
   else the loop does is counted. The final step's report, which also evaluates and
   writes the final checkpoint, is left out. Each run gets an 8-record eval file,
   evaluated before the first step and with the final checkpoint (outside the timed
   window); `noeval` leaves it out. A run that runs out of GPU memory is repeated at half
   the batch.

Memory: the common recipe and the plain loop read `torch.cuda.max_memory_allocated` of
this process. ray_app rows take the peaks that the worker reports itself
(`ray_app.train.reporting.Reporter.memory`, the maximum over the run's reports of rank 0):
`peak_gib` the whole worker (loading included), `train_peak_gib` without the eval passes
(the worker resets CUDA's peak counters around every eval pass) and `eval_peak_gib` the
eval passes alone. Evaluation uses Liger's fused loss when Liger is on (`fused_eval` in
the row), so it computes no full logits then. The peak reserved by CUDA's caching
allocator (`reserved_gib` in rows before 2026-12-04) is not reported by the workers and
is no longer measured.

Data (`--data`, one or both):
- fixed: every sequence is exactly `--seq` tokens. Common recipe and plain loop: random
  ids [batch, seq]; ray_app: records all longer than `data.max_seq_len`, truncated to it.
- variable: record lengths drawn from a seeded log-normal (median `--len-median`, sigma
  `--len-sigma`), capped at `--seq`, at least 16. Common recipe: every record padded to
  `--seq` (`padding="max_length"`, as the popular guides do), attention mask on the real
  tokens, labels -100 on pad. ray_app: records with lengths from the same distribution
  (random-word text cut to the token count, EOS included, with the bundled tokenizer),
  packed by `data.packing` into `--seq`-token sequences. Both count real tokens only.

MFU = tokens_per_s * flops_per_token / (matmul_tflops * 1e12). `flops_per_token` is
`ray_app.train.flops.flops_per_token`, the function the workers compute their own MFU
with (useful work only: frozen base, attention and LoRA; recomputation not counted), of
the shape with the bench's LoRA adapter built on the meta device (no weights), the same
for every row of a shape. Its sequence length is the attention length: `--seq` on fixed
data; on variable data a token attends within its own record only, so it is the
token-weighted record length sum(L^2) / sum(L) of the run's records (`attn_len`), as
attention over pad or across packed records is not useful work. The worker's own MFU
(against the datasheet peak of `ray_app.train.flops.peak_tflops`, over
`data.max_seq_len`, from the loop's step times) is kept as `worker_mfu`.

Run on a GPU machine (Ray, Liger and bitsandbytes importable):
    python bench/gpu_throughput.py --models 1b --out bench/results
    python bench/gpu_throughput.py --models 8b --data variable \\
        --ray-variants liger:4,qlora:1,qlora+paged8bit:1
Results are appended to <out>/gpu_throughput.json after every measurement; `--table`
rebuilds <out>/gpu_throughput.md from that file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import math
import random
import shlex
import shutil
import statistics
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
LORA_TARGETS: list[str] | str = ["q_proj", "k_proj", "v_proj", "o_proj"]  # --targets
TARGET_SETS = {"qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear": "all-linear"}
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32, 0.05
LEN_MIN = 16  # shortest variable-data record: a few tokens of text still train something


# --------------------------------------------------------------------------- flops


def llama_config(shape: dict[str, Any], **special_ids):
    """The LlamaConfig of a shape from SHAPES (Llama-3 rope and context length)."""
    from transformers import LlamaConfig

    fields = {k: v for k, v in shape.items() if k != "name"}
    return LlamaConfig(**fields, max_position_embeddings=131072, rope_theta=500000.0,
                       **{"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
                          **special_ids})


def lora_section():
    """The bench's adapter, as ray_app's config states it."""
    from ray_app.config import LoraSection

    return LoraSection(r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT,
                       target_modules=LORA_TARGETS)


_META_MODELS: dict[str, Any] = {}


def shape_flops_per_token(shape: dict[str, Any], seq_len: int) -> float:
    """`ray_app.train.flops.flops_per_token` of `shape` with the bench's LoRA adapter, built
    on the meta device (no weights, no memory) and kept per shape. `seq_len` is the
    attention length: the sequence length, or on variable data the token-weighted record
    length (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ray_app.model.loading import add_lora
    from ray_app.train.flops import flops_per_token

    if shape["name"] not in _META_MODELS:
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(llama_config(shape))
        _META_MODELS[shape["name"]] = add_lora(base, lora_section())
    return flops_per_token(_META_MODELS[shape["name"]], seq_len)


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


# --------------------------------------------------------------------------- data


def sample_lengths(n: int, median: float, sigma: float, cap: int, seed: int = 0) -> list[int]:
    """`n` record lengths, log-normal around `median`, clipped to [LEN_MIN, cap], shuffled.
    One draw from each of the n quantile strata, so that the mean of even the few dozen
    records of a common-recipe run is that of the distribution (real tokens/s of padded
    batches is proportional to it)."""
    rng = random.Random(seed)
    normal = statistics.NormalDist(math.log(median), sigma)
    out = []
    for i in range(n):
        q = min(max((i + rng.random()) / n, 1e-12), 1 - 1e-12)
        out.append(min(cap, max(LEN_MIN, round(math.exp(normal.inv_cdf(q))))))
    rng.shuffle(out)
    return out


def lengths_for(tokens: int, median: float, sigma: float, cap: int, seed: int = 0) -> list[int]:
    """Record lengths adding up to about `tokens`."""
    mean = sum(sample_lengths(10_000, median, sigma, cap, seed)) / 10_000
    return sample_lengths(math.ceil(tokens / mean), median, sigma, cap, seed)


def length_stats(lengths: list[int]) -> dict[str, float]:
    """Mean record length, and the token-weighted one that attention work scales with."""
    return {"mean_real_len": round(sum(lengths) / len(lengths), 1),
            "attn_len": round(sum(n * n for n in lengths) / sum(lengths), 1)}


def padded_batch(lengths: list[int], seq: int, vocab: int, pad_id: int, generator,
                 device: str = "cpu"):
    """(input_ids, attention_mask, labels) of shape [len(lengths), seq]: random real tokens
    first, `pad_id` after, as `padding="max_length"` gives; labels -100 on pad."""
    import torch

    ids = torch.randint(3, vocab, (len(lengths), seq), device=device, generator=generator)
    real = (torch.arange(seq, device=device)[None, :]
            < torch.tensor(lengths, device=device)[:, None])
    return ids.masked_fill(~real, pad_id), real.long(), ids.masked_fill(~real, -100)


# --------------------------------------------------------------------------- models


def build_model(key: str, **special_ids):
    """A random-init model of shape `key` in bf16 on the GPU (seed 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(llama_config(SHAPES[key], **special_ids),
                                                dtype=torch.bfloat16,
                                                attn_implementation="sdpa")


def common_recipe(model, batch: int, seq: int, warmup: int, steps: int,
                  lengths: list[int] | None = None) -> dict[str, Any]:
    """The usual LoRA loop: PEFT, gradient checkpointing, autocast bf16, AdamW. With
    `lengths` (variable data), batch i holds records lengths[i*batch:(i+1)*batch], each
    padded to `seq`."""
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
    vocab, pad_id = model.config.vocab_size, model.config.pad_token_id
    gen = torch.Generator(device="cuda").manual_seed(1)

    def step(i: int) -> None:
        if lengths is None:
            ids = torch.randint(3, vocab, (batch, seq), device="cuda", generator=gen)
            inputs = {"input_ids": ids, "labels": ids}
        else:
            ids, mask, labels = padded_batch(lengths[i * batch:(i + 1) * batch], seq, vocab,
                                             pad_id, gen, device="cuda")
            inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = peft_model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    out = {"timed_steps": steps, "seconds": seconds, "peak_gib": peak}
    if lengths is None:
        return {**out, "tokens_per_s": batch * seq * steps / seconds}
    timed = lengths[warmup * batch:(warmup + steps) * batch]
    return {**out, "tokens_per_s": sum(timed) / seconds,
            "padded_tokens_per_s": batch * seq * steps / seconds, **length_stats(timed)}


def common_recipe_qlora(folder: str, batch: int, seq: int, warmup: int, steps: int,
                        lengths: list[int] | None = None) -> dict[str, Any]:
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
    out = common_recipe(model, batch, seq, warmup, steps, lengths)
    del model
    return out


# --------------------------------------------------------------------------- ray_app


def random_words(rng: random.Random, chars: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words, n = [], 0
    while n < chars:
        w = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
        words.append(w)
        n += len(w) + 1
    return " ".join(words)


def write_fixed_jsonl(path: Path, records: int, chars: int, seed: int = 0) -> None:
    """Unique random-word texts, each far longer than max_seq_len tokens (about 1.2
    characters per token with the bundled 1,024-token tokenizer)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(records):
            f.write(json.dumps({"text": random_words(rng, chars)}) + "\n")


def write_variable_jsonl(path: Path, lengths: list[int], seed: int = 0) -> list[int]:
    """One random-word text per length, cut so that ray_app's tokenization of the record
    (text + EOS, bundled tokenizer) has that many tokens; returns the counts it has."""
    from ray_app.data.formats import Turn
    from ray_app.data.tokenize import load_tokenizer, segments

    tokenizer = load_tokenizer(str(TOKENIZER))

    def counts(texts: list[str]) -> list[int]:
        # As ray_app's tokenize stage: the record's pieces, encoded together.
        views = [segments([Turn("text", text, True)], tokenizer) for text in texts]
        encoded = iter(tokenizer([piece for view in views for piece, _ in view],
                                 add_special_tokens=False)["input_ids"])
        return [sum(len(next(encoded)) for _ in view) for view in views]

    extra = counts([""])[0]  # BOS / EOS the record gets around its text
    rng = random.Random(seed)
    words = [random_words(rng, int((n - extra) * 1.5) + 16) for n in lengths]  # ~1.2 chars/token
    ends = [[end for _, end in offsets] for offsets in tokenizer(
        words, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    cut = [n - extra for n in lengths]
    texts = [w[:e[min(k, len(e)) - 1]] for w, e, k in zip(words, ends, cut)]
    got = counts(texts)
    for i, target in enumerate(lengths):
        # A cut inside a word can merge differently: step the cut until the count fits.
        for _ in range(8):
            if got[i] == target or not 0 < cut[i] + target - got[i] <= len(ends[i]):
                break
            cut[i] += target - got[i]
            texts[i] = words[i][:ends[i][cut[i] - 1]]
            got[i] = counts([texts[i]])[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in texts)
    return got


def bench_config(name: str, model_dir: str, data_file: Path, eval_file: Path | None,
                 work: Path, *, batch: int, seq: int, steps: int, log_every: int,
                 compile_: bool, liger: str, quantization: str, checkpointing: str | int,
                 optimizer: str = "auto", attn: str = "sdpa", use_gpu: bool = True,
                 num_workers: int = 1, strategy: str = "ddp", worker_cpus: float | None = None,
                 checkpoint_every: int = 10_000, max_failures: int = 0,
                 precision: str = "default", lr: float | None = None,
                 schedule: str = "constant", seed: int | None = None):
    """The ray_app config of a measurement (also the plain loop's model settings); speed
    runs keep the learning rate constant, quality runs pass the product's default schedule
    (cosine). `seed`: train.seed (the product's default when None)."""
    from ray_app.config import validate_config

    raw = {
        "model": {"name_or_path": model_dir, "tokenizer": str(TOKENIZER), "dtype": "bfloat16",
                  "attn_implementation": attn, "quantization": quantization,
                  "liger": liger, "compile": compile_, "precision": precision},
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT,
                 "target_modules": LORA_TARGETS},
        "data": {"train": [str(data_file)], "eval": [str(eval_file)] if eval_file else [],
                 "eval_fraction": 0.0, "format": "text",
                 "max_seq_len": seq, "truncation": "right", "packing": True},
        "train": {"max_steps": steps, "batch_size_per_worker": batch, "grad_accum_steps": 1,
                  "log_every": log_every, "eval_every": 0, "checkpoint_every": checkpoint_every,
                  "activation_checkpointing": checkpointing, "optimizer": optimizer,
                  "warmup_ratio": 0.0 if schedule == "constant" else 0.03,
                  "schedule": schedule,
                  **({"lr": lr} if lr else {}), **({"seed": seed} if seed is not None else {})},
        "scaling": {"num_workers": num_workers, "use_gpu": use_gpu, "strategy": strategy,
                    "resources_per_worker": ({"CPU": worker_cpus or 4, "GPU": 1} if use_gpu
                                             else {"CPU": worker_cpus or 1})},
        "run": {"name": name, "storage_path": str(work / "storage"),
                "output_dir": str(work / "outputs" / name), "max_failures": max_failures},
    }
    return validate_config(raw, source=f"bench {name}")


def plain_loop_step(model_dir: str, work: Path, *, batch: int, seq: int, compile_: bool,
                    liger: str, quantization: str, checkpointing: str | int,
                    optimizer: str = "auto", attn: str = "sdpa", precision: str = "default"):
    """A function that runs one training step of ray_app's own model stack on random ids
    and returns its `StepResult`, without Ray Train, Ray Data, progress reports or
    checkpoints: the package's `load_base`, `apply_speedups`, `add_lora` and
    `make_optimizer`, and its step (`optimizer_step` with the SFT method and its training
    collate, so the loss is the loop's) through ray_app's DDP engine on one process
    (`Engine` with the layout `Layout(device, 0, 1)`: no Ray Train context needed)."""
    import torch

    from ray_app.data.collate import REAL_TOKENS
    from ray_app.model.loading import add_lora, apply_speedups, load_base
    from ray_app.train.engines import Engine, Layout
    from ray_app.train.methods.sft import SFT
    from ray_app.train.plan import StepPlan
    from ray_app.train.steps import MicroBatch, optimizer_step

    cfg = bench_config("plain", model_dir, work / "unused.jsonl", None, work, batch=batch,
                       seq=seq, steps=1, log_every=1, compile_=compile_, liger=liger,
                       quantization=quantization, checkpointing=checkpointing,
                       optimizer=optimizer, attn=attn, precision=precision)
    device = torch.device("cuda")
    base = load_base(cfg.model, True, device)
    if quantization != "nf4":  # the 4-bit base is loaded onto the device already
        base = base.to(device)
    base = apply_speedups(base, cfg.model, cfg.train.activation_checkpointing, True)
    plan = StepPlan(micro_batches_per_epoch=1, steps_per_epoch=1, total_steps=1 << 30,
                    warmup_steps=0, has_eval=False)  # the bench config's constant schedule
    model = add_lora(base, cfg.lora, autocast=True)  # the loop's GPU set-up
    if precision == "fp8":
        from ray_app.model.fp8 import to_fp8_base

        to_fp8_base(model, device)
    engine = Engine(model, cfg, plan, Layout(device, 0, 1))
    engine.model.train()  # from_pretrained returns eval mode, as in the loop's set-up
    method = SFT(cfg)
    # Every row is a full --seq tokens, so the pad id is never used.
    collate, _ = method.collates(base.config.pad_token_id, attn == "flash_attention_2")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(1)

    def step():
        # Rows as a packed text record gives them (labels = ids), weighed on the host and
        # copied to the device as the loop does.
        rows = list(torch.randint(3, vocab, (batch, seq), generator=gen).numpy())
        inputs = collate({"input_ids": rows, "labels": rows})
        real = int(inputs.pop(REAL_TOKENS))
        units = method.units(inputs)
        micro = MicroBatch({k: v.to(device, non_blocking=True) for k, v in inputs.items()},
                           units, real)
        return optimizer_step(engine, method, [micro], autocast)

    return step


def plain_loop_run(model_dir: str, work: Path, *, batch: int, seq: int, warmup: int,
                   steps: int, **settings) -> dict[str, Any]:
    """`plain_loop_step` timed: the baseline that the Ray overhead of the same settings is
    measured against. `settings` as for plain_loop_step."""
    import torch

    torch.cuda.reset_peak_memory_stats()
    step = plain_loop_step(model_dir, work, batch=batch, seq=seq, **settings)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": batch * seq * steps / seconds, "timed_steps": steps,
            "seconds": seconds, "step_s": seconds / steps,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


PEAK_KEYS = ("peak_gib", "train_peak_gib", "eval_peak_gib")


def worker_peaks(reports: list[dict[str, Any]]) -> dict[str, float | None]:
    """The largest of each GPU memory peak in the reports of rank 0 (see
    `ray_app.train.reporting.Reporter.memory`); None where none was reported (not on
    CUDA). The maximum over all reports, so a restarted worker's peaks count as well."""
    return {key: max((m[key] for m in reports if m.get(key) is not None), default=None)
            for key in PEAK_KEYS}


def ray_app_run(name: str, model_dir: str, data_file: Path, eval_file: Path | None,
                work: Path, *, batch: int,
                seq: int, steps: int, warmup_steps: int, log_every: int, compile_: bool,
                liger: str, quantization: str, checkpointing: str | int,
                optimizer: str = "auto", attn: str = "sdpa",
                use_gpu: bool = True, num_workers: int = 1, strategy: str = "ddp",
                worker_cpus: float | None = None, checkpoint_every: int = 10_000,
                max_failures: int = 0, precision: str = "default",
                lr: float | None = None, schedule: str = "constant",
                seed: int | None = None) -> dict[str, Any]:
    """One `run_training` of the bench's config; its reports, collected through
    `on_metrics`, give the wall-clock tokens/s between the reports of steps `warmup_steps`
    and the last before the final step, and the worker's memory peaks."""
    import ray
    import ray.data
    from rich.console import Console

    import ray_app.ray_session  # noqa: F401 - sets Ray Train's environment defaults
    from ray_app.train.run import run_training

    if not ray.is_initialized():
        for logger in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(logger).setLevel(logging.WARNING)
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = bench_config(name, model_dir, data_file, eval_file, work, batch=batch, seq=seq,
                       steps=steps, log_every=log_every, compile_=compile_, liger=liger,
                       quantization=quantization, checkpointing=checkpointing,
                       optimizer=optimizer, attn=attn, use_gpu=use_gpu, num_workers=num_workers,
                       strategy=strategy, worker_cpus=worker_cpus,
                       checkpoint_every=checkpoint_every, max_failures=max_failures,
                       precision=precision, lr=lr, schedule=schedule, seed=seed)
    reports: list[dict[str, Any]] = []
    started = time.perf_counter()
    summary = run_training(cfg, Console(file=sys.stderr, width=120), on_metrics=reports.append)
    wall = time.perf_counter() - started
    if summary.get("status") != "succeeded":
        raise RuntimeError(f"ray_app run {name} failed: {summary.get('error')!r}")
    step_reports = [m for m in reports if m.get("tokens_per_s") is not None]
    # The report of the last step also evaluates and writes the final checkpoint: left out.
    window = [m for m in step_reports if warmup_steps <= m["step"] < steps]
    if len(window) < 2:
        raise RuntimeError(f"ray_app run {name}: too few progress reports after warm-up "
                           f"({[m['step'] for m in step_reports]})")
    first, last = window[0], window[-1]
    tokens = last["tokens_seen"] - first["tokens_seen"]
    seconds = last["time"] - first["time"]
    steps_timed = last["step"] - first["step"]
    return {
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_loop": sum(m["tokens_per_s"] for m in window[1:]) / len(window[1:]),
        "tokens_per_step": tokens / steps_timed,
        "timed_steps": steps_timed, "seconds": seconds, **worker_peaks(reports),
        "worker_mfu": last.get("mfu"),
        "run_wall_s": wall, "summary_tokens_per_s": summary["train"]["tokens_per_s"],
        # The summary's own speed figures (ray_app.summary.speed), for the bench to check.
        **{f"summary_{k}": summary["train"].get(k) for k in (
            "tokens_per_s_whole_run", "warmup_s", "time_to_first_step_s", "train_seconds",
            "tokens_seen", "mfu_peak")},
        "eval_loss_initial": summary["eval"].get("loss_initial"),
        "eval_loss_final": summary["eval"].get("loss_final"),
        "curve": [{"step": m["step"], "loss": m.get("loss"), "eval_loss": m.get("eval_loss")}
                  for m in reports if m.get("loss") is not None
                  or m.get("eval_loss") is not None],
        "data_sequences": summary["data"].get("train_sequences")
        or summary["data"].get("train_records"),
        "packing_efficiency": summary["data"].get("packing_efficiency"),
        "restarts": summary["train"].get("restarts", 0),
        "restart_history": summary["train"].get("restart_history"),
        "final_step": summary["train"].get("steps"),
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
        keys = ("model", "data", "variant", "method", "batch", "tokens_per_s", "mfu",
                "peak_gib", "train_peak_gib")
        print("RESULT", json.dumps({k: row.get(k) for k in keys}), flush=True)


def _ratio_key(r: dict[str, Any]) -> tuple:
    # GPUs differ (an H200's common recipe ran 5% faster than an H100's): ratios stay per device.
    return (r["model"], r.get("data", "fixed"), r["method"], r["device"],
            r.get("targets", "qkvo"))


def _ratio_baseline(rows: list[dict[str, Any]], r: dict[str, Any]) -> dict[str, Any] | None:
    """The common-recipe row a ray_app row is compared with: the fastest one of the same
    day (a session's runs, at the recipe's best batch) with the same model, data, method,
    GPU and targets; without one that day, the latest earlier one."""
    same = [c for c in rows if c["variant"] == "common_recipe" and _ratio_key(c) == _ratio_key(r)]
    today = [c for c in same if c.get("date") == r.get("date")]
    if today:
        return max(today, key=lambda c: c["tokens_per_s"])
    return same[-1] if same else None


def _model_cell(r: dict[str, Any]) -> str:
    """The shape, and its LoRA targets when they are not q,k,v,o."""
    targets = r.get("targets", "qkvo")
    return r["model"] if targets == "qkvo" else f"{r['model']}, {targets}"


def _data_cell(r: dict[str, Any]) -> str:
    if r.get("data", "fixed") == "fixed":
        return "fixed"
    return f"variable, mean {r['mean_real_len']:.0f}"


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    def num(v, spec):
        return "-" if v is None else format(v, spec)

    def vs_common(r):
        base = _ratio_baseline(rows, r)
        if r["variant"] == "common_recipe" or base is None:
            return None
        return r["tokens_per_s"] / base["tokens_per_s"]

    def train_peak(r):
        # The common recipe has no eval pass: its peak is the training peak.
        return r["peak_gib"] if r["variant"] == "common_recipe" else r.get("train_peak_gib")

    lines = [
        "# GPU training throughput",
        "",
        ("Tokens/s are real (non-pad) training tokens per second after warm-up, one GPU, "
         "sequence length 2048, LoRA r=16 alpha=32 on q,k,v,o (or on every linear layer where "
         "the model says all-linear), bf16 ('fp8 base': model.precision fp8). MFU = tokens/s x useful "
         "flops per token (`ray_app.train.flops.flops_per_token` of the shape with its "
         "adapter; recomputation not counted) / the bf16 matmul rate measured in the same "
         "run (see `bench/gpu_throughput.py`). 'x common' is tokens/s over that of the common "
         "recipe with the same model, data and method. Peak is "
         "`torch.cuda.max_memory_allocated`: of the bench process for the common recipe and "
         "the plain loop, of the training worker for ray_app (as the worker reports it); "
         "'train peak' leaves out ray_app's eval passes (not measured in older rows). Eval "
         "passes computed full logits until evaluation used Liger's fused loss whenever "
         "Liger is on (rows marked 'fused-loss eval', or `fused_eval` in the JSON). ray_app "
         "runs get an 8-record eval file; 'no eval data' is the same run without it, where "
         "the trainer then stayed in eval mode (no dropout, no activation checkpointing, "
         "Liger's fused linear cross-entropy fell back to full logits). That row documents "
         "the defect; the loop now switches to train mode before the first step, whether or "
         "not there is eval data."),
    ]
    variable = sorted({(r["len_median"], r["len_sigma"], r["len_cap"])
                       for r in rows if r.get("data") == "variable"})
    for median, sigma, cap in variable:
        lines += ["", (f"Variable data: record lengths log-normal with median {median:g} and "
                       f"sigma {sigma:g}, capped at {cap} tokens (at least {LEN_MIN}); 'mean' is "
                       "the mean real record length of the run. The common recipe pads every "
                       f"record to {cap} (`padding=\"max_length\"`); ray_app packs records "
                       f"into {cap}-token sequences (`data.packing`).")]
    lines += [
        "",
        ("| model | data | variant | method | settings | device | batch | tokens/s | x common "
         "| MFU | peak GiB | train peak GiB | matmul TFLOP/s |"),
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {_model_cell(r)} | {_data_cell(r)} | {r['variant']} | {r['method']} "
            f"| {r.get('settings', '')} | {r['device']} | {r['batch']} "
            f"| {num(r['tokens_per_s'], ',.0f')} | {num(vs_common(r), '.2f')} "
            f"| {num(r['mfu'] * 100 if r.get('mfu') is not None else None, '.1f')}% "
            f"| {num(r['peak_gib'], '.1f')} | {num(train_peak(r), '.1f')} "
            f"| {num(r['matmul_tflops'], '.0f')} |")
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = _ratio_key(r)
        if r["variant"] == "ray_app" and _ratio_baseline(rows, r) and (
                key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]):
            best[key] = r
    if best:
        lines += ["", ("ray_app / common recipe (the fastest ray_app run per model, data, "
                       "method, GPU and targets, against the fastest common recipe of the "
                       "same day on that GPU):"),
                  "", ("| model | data | method | device | common recipe tokens/s "
                       "| ray_app tokens/s | ray_app run | ratio |"),
                  "|---|---|---|---|---:|---:|---|---:|"]
        for key, r in best.items():
            base = _ratio_baseline(rows, r)
            lines.append(
                f"| {_model_cell(r)} | {key[1]} | {key[2]} | {key[3]} | {base['tokens_per_s']:,.0f} "
                f"| {r['tokens_per_s']:,.0f} | batch {r['batch']}, {r.get('settings', '')} "
                f"| {r['tokens_per_s'] / base['tokens_per_s']:.2f} |")
    lines += ray_overhead_lines(rows)
    commands = sorted({r["command"] for r in rows})
    lines += ["", "Command:" if len(commands) == 1 else "Commands:", ""]
    lines += [f"    {c}" for c in commands]
    path.write_text("\n".join(lines) + "\n")


def ray_overhead_lines(rows: list[dict[str, Any]]) -> list[str]:
    """ray_app against the plain loop of its own model stack, same settings, same run."""
    pairs = []
    for plain in (r for r in rows if r["variant"] == "plain_loop"):
        settings = plain["settings"].replace("no Ray", "Ray Train ddp")
        same = [r for r in rows if r["variant"] == "ray_app" and r["command"] == plain["command"]
                and _ratio_key(r) == _ratio_key(plain) and r["batch"] == plain["batch"]
                and r.get("settings") == settings and r.get("data", "fixed") == "fixed"]
        pairs += [(plain, r) for r in same]
    if not pairs:
        return []
    lines = ["", ("Ray overhead: ray_app's tokens/s (Ray Train worker, Ray Data pipeline, "
                  "progress reports, wall-clock between reports) against a plain loop of its "
                  "own model stack without Ray (same settings and batch, random ids, timed "
                  "between CUDA synchronisations), in the same run:"), "",
             "| model | settings | batch | plain loop tokens/s | ray_app tokens/s | overhead |",
             "|---|---|---:|---:|---:|---:|"]
    for plain, r in pairs:
        lines.append(f"| {_model_cell(r)} | {plain['settings']} | {r['batch']} "
                     f"| {plain['tokens_per_s']:,.0f} | {r['tokens_per_s']:,.0f} "
                     f"| {(1 - r['tokens_per_s'] / plain['tokens_per_s']) * 100:.1f}% |")
    return lines


VARIANT_OPTIONS = ("liger", "noliger", "compile", "qlora", "noeval", "ckpt", "nockpt",
                   "adam8bit", "paged8bit", "fa2", "fp8")
OPTIMIZERS = {"adam8bit": "adamw_8bit", "paged8bit": "paged_adamw_8bit"}


def variant_settings(opts: str) -> dict[str, Any]:
    """ray_app settings of a variant's options, e.g. 'qlora+paged8bit'."""
    given = set(opts.split("+"))
    unknown = given - set(VARIANT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown variant option(s) {sorted(unknown)} in {opts!r}; "
                         f"known: {', '.join(VARIANT_OPTIONS)}")
    qlora = "qlora" in given
    # QLoRA is run to fit small GPUs: checkpointing on unless asked off.
    ckpt = "all" if "ckpt" in given or (qlora and "nockpt" not in given) else "none"
    optimizer = next((OPTIMIZERS[o] for o in OPTIMIZERS if o in given), "auto")
    return {"qlora": qlora, "compile_": "compile" in given,
            "liger": "off" if "noliger" in given else "on",
            "with_eval": "noeval" not in given, "checkpointing": ckpt,
            "optimizer": optimizer, "attn": "flash_attention_2" if "fa2" in given else "sdpa",
            "precision": "fp8" if "fp8" in given else "default"}


def settings_text(v: dict[str, Any]) -> str:
    return (f"Ray Train ddp, liger {v['liger']}, compile {str(v['compile_']).lower()}, "
            f"act. ckpt {v['checkpointing']}" + (", NF4 double quant" if v["qlora"] else "")
            + ("" if v["optimizer"] == "auto" else f", {v['optimizer']}")
            + ("" if v["attn"] == "sdpa" else f", {v['attn']}")
            + (", fp8 base" if v.get("precision") == "fp8" else "")
            + ("" if v["with_eval"] else ", no eval data"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1b", help="comma list of: " + ", ".join(SHAPES))
    parser.add_argument("--data", default="fixed",
                        help="comma list of: fixed (every sequence --seq tokens), variable "
                        "(log-normal record lengths; padded by the common recipe, packed by "
                        "ray_app)")
    parser.add_argument("--len-median", type=float, default=300,
                        help="variable data: median record length in tokens")
    parser.add_argument("--len-sigma", type=float, default=1.0,
                        help="variable data: sigma of the log-normal (cap: --seq)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="/tmp/gpu_throughput")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--common-batch", type=int, default=4)
    parser.add_argument("--ray-batch", default="1b:8,8b:4",
                        help="ray_app batch per model, e.g. 1b:8,8b:4")
    parser.add_argument("--ray-variants", default="liger,liger+compile,qlora",
                        help="comma list of ray_app variants, each options joined by '+' "
                        f"({' | '.join(VARIANT_OPTIONS)}) and an optional ':BATCH', "
                        "e.g. liger+compile:16,qlora:8,qlora+paged8bit:1")
    parser.add_argument("--plain-variants", default="",
                        help="variants (same syntax as --ray-variants) also run as a plain "
                        "loop of ray_app's model stack without Ray: the Ray overhead baseline")
    parser.add_argument("--common-qlora", action="store_true",
                        help="also time the common recipe on a 4-bit NF4 base")
    parser.add_argument("--ray-steps", type=int, default=40)
    parser.add_argument("--targets", default="qkvo", choices=sorted(TARGET_SETS),
                        help="LoRA target modules of every run: q,k,v,o or all linear layers")
    parser.add_argument("--deadline-s", type=float, default=1e9,
                        help="skip measurements that would start after this many seconds")
    parser.add_argument("--keep-model", action="store_true",
                        help="keep the saved model under --work (and reuse one saved there)")
    parser.add_argument("--table", action="store_true", help="only rebuild the markdown table")
    args = parser.parse_args()
    out = Path(args.out)
    if args.table:
        write_table(json.loads((out / "gpu_throughput.json").read_text()),
                    out / "gpu_throughput.md")
        return 0
    kinds = args.data.split(",")
    if set(kinds) - {"fixed", "variable"}:
        parser.error(f"--data: fixed and/or variable, got {args.data!r}")
    ray_batch = dict(item.split(":") for item in args.ray_batch.split(","))
    variants, plain_variants = [], []
    for flag, specs, into in (("--ray-variants", args.ray_variants, variants),
                              ("--plain-variants", args.plain_variants, plain_variants)):
        for spec in filter(None, specs.split(",")):
            opts, _, batch_text = spec.partition(":")
            try:
                into.append((spec, opts, batch_text, variant_settings(opts)))
            except ValueError as err:
                parser.error(f"{flag}: {err}")

    global LORA_TARGETS
    LORA_TARGETS = TARGET_SETS[args.targets]

    import torch

    t0 = time.perf_counter()
    command = "python bench/gpu_throughput.py " + shlex.join(sys.argv[1:])
    results = Results(out, command)
    device = torch.cuda.get_device_name(0)
    tflops = matmul_tflops()
    print(f"bf16 matmul 8192^3: {tflops:.1f} TFLOP/s on {device}", flush=True)
    work = Path(args.work)
    failures = []
    files: dict[str, tuple[Path, Path, dict[str, Any]]] = {}

    def data_files(kind: str) -> tuple[Path, Path, dict[str, Any]]:
        """(train file, eval file, fields for the result rows) of a data kind, written once."""
        if kind in files:
            return files[kind]
        train, evals = work / f"{kind}.jsonl", work / f"{kind}_eval.jsonl"
        if kind == "fixed":
            if not train.exists():
                chars = int(args.seq * 1.6) + 400
                write_fixed_jsonl(train, records=1000, chars=chars)
                write_fixed_jsonl(evals, records=8, chars=chars, seed=1)
            files[kind] = train, evals, {}
            return files[kind]
        # Enough records for the longest run at the largest batch without a second epoch.
        batches = [int(b or ray_batch[k]) for k in args.models.split(",")
                   for _, _, b, _ in variants]
        need = int(1.3 * max(batches) * max(args.ray_steps, 30) * args.seq)
        dist_args = (args.len_median, args.len_sigma, args.seq)
        lengths = write_variable_jsonl(train, lengths_for(need, *dist_args, seed=0), seed=0)
        write_variable_jsonl(evals, sample_lengths(8, *dist_args, seed=1), seed=1)
        files[kind] = train, evals, {"len_median": args.len_median, "len_sigma": args.len_sigma,
                                     "len_cap": args.seq, **length_stats(lengths)}
        print(f"variable data: {len(lengths)} records, {length_stats(lengths)}", flush=True)
        return files[kind]

    for key in args.models.split(","):
        shape = SHAPES[key]
        model_dir = str(work / f"model_{key}")
        model = build_model(key)
        if not (args.keep_model and (Path(model_dir) / "config.json").exists()):
            model.save_pretrained(model_dir)  # the same seed: the same weights as a kept one
            print(f"{shape['name']}: saved random-init bf16 model to {model_dir} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
        common_steps = 15 if key == "1b" else 10
        for kind in kinds:
            data_file, eval_file, data_fields = data_files(kind)
            base = {"model": shape["name"], "gpus": 1, "device": device, "seq_len": args.seq,
                    "data": kind, "matmul_tflops": round(tflops, 1), "targets": args.targets,
                    **data_fields}

            def add(variant, method, strategy, batch, settings, m, base=base, shape=shape):
                row = {**base, **{k: v for k, v in m.items() if k in ("mean_real_len",
                                                                        "attn_len")}}
                # Useful attention work follows the record length, not the padded or packed one.
                fpt = shape_flops_per_token(shape, round(row.get("attn_len", args.seq)))
                results.add({**row, "flops_per_token": round(fpt), "variant": variant,
                             "method": method, "strategy": strategy, "batch": batch,
                             "settings": settings, "tokens_per_s": round(m["tokens_per_s"], 1),
                             "mfu": round(m["tokens_per_s"] * fpt / (tflops * 1e12), 4),
                             **{k: None if v is None else round(v, 2)
                                for k, v in m.items() if k.endswith("_gib")},
                             **{k: v for k, v in m.items() if k not in row
                                and k != "tokens_per_s" and not k.endswith("_gib")}})

            def common_lengths(steps, warmup, batch=args.common_batch, kind=kind):
                # Warm-up and timed records drawn apart, so that the timed ones are stratified.
                if kind == "fixed":
                    return None
                dist_args = (args.len_median, args.len_sigma, args.seq)
                return (sample_lengths(warmup * batch, *dist_args, seed=1)
                        + sample_lengths(steps * batch, *dist_args, seed=2))

            if model is None:
                model = build_model(key)
            try:
                m = common_recipe(model, args.common_batch, args.seq, warmup=3,
                                  steps=common_steps, lengths=common_lengths(common_steps, 3))
                add("common_recipe", "lora", "single-gpu", args.common_batch,
                    "HF+PEFT, grad ckpt, autocast bf16, AdamW"
                    + (", padded to max_length" if kind == "variable" else ""), m)
            except Exception as err:  # noqa: BLE001 - keep measuring the rest
                failures.append(f"common_recipe lora {key} {kind}: {err!r}")
                traceback.print_exc()
            model = None  # PEFT wrapped it in place: the next data kind builds it afresh
            gc.collect()
            torch.cuda.empty_cache()
            if args.common_qlora and time.perf_counter() - t0 < args.deadline_s:
                try:
                    m = common_recipe_qlora(model_dir, args.common_batch, args.seq, warmup=2,
                                            steps=8, lengths=common_lengths(8, 2))
                    add("common_recipe", "qlora", "single-gpu", args.common_batch,
                        "HF+PEFT, NF4 double quant, grad ckpt, autocast bf16, AdamW"
                        + (", padded to max_length" if kind == "variable" else ""), m)
                except Exception as err:  # noqa: BLE001
                    failures.append(f"common_recipe qlora {key} {kind}: {err!r}")
                    traceback.print_exc()
                gc.collect()
                torch.cuda.empty_cache()

            # After the common recipe: Liger patches some functions of this process.
            for spec, opts, batch_text, v in plain_variants:
                batch = int(batch_text or ray_batch[key])
                if kind != "fixed" or time.perf_counter() - t0 > args.deadline_s:
                    continue
                try:
                    m = plain_loop_run(model_dir, work, batch=batch, seq=args.seq, warmup=5,
                                       steps=15, compile_=v["compile_"], liger=v["liger"],
                                       quantization="nf4" if v["qlora"] else "none",
                                       checkpointing=v["checkpointing"],
                                       optimizer=v["optimizer"], attn=v["attn"],
                                       precision=v["precision"])
                    add("plain_loop", "qlora" if v["qlora"] else "lora", "single-gpu", batch,
                        settings_text(v).replace("Ray Train ddp", "no Ray"), m)
                except Exception as err:  # noqa: BLE001
                    failures.append(f"plain_loop {spec} {key}: {type(err).__name__}: {err}")
                    traceback.print_exc()
                gc.collect()
                torch.cuda.empty_cache()

            for spec, opts, batch_text, v in variants:
                if time.perf_counter() - t0 > args.deadline_s:
                    print(f"deadline: skipping ray_app {spec} {key} {kind}", flush=True)
                    continue
                batch = int(batch_text or ray_batch[key])
                while True:
                    name = f"{key}-{kind}-{args.targets}-{opts.replace('+', '-')}-b{batch}"
                    # A rerun of a name would resume its finished run instead of training.
                    for folder in (work / "storage" / name, work / "outputs" / name):
                        shutil.rmtree(folder, ignore_errors=True)
                    try:
                        m = ray_app_run(
                            name, model_dir, data_file, eval_file if v["with_eval"] else None,
                            work, batch=batch, seq=args.seq,
                            steps=args.ray_steps if key == "1b" else 30, warmup_steps=10,
                            log_every=5, compile_=v["compile_"], liger=v["liger"],
                            quantization="nf4" if v["qlora"] else "none",
                            checkpointing=v["checkpointing"], optimizer=v["optimizer"],
                            attn=v["attn"], precision=v["precision"])
                        if kind == "variable":
                            m["seq_fill"] = m["tokens_per_step"] / (batch * args.seq)
                        # SFT evaluation skips full logits when Liger's fused loss is on.
                        m["fused_eval"] = v["liger"] == "on"
                        add("ray_app", "qlora" if v["qlora"] else "lora", "ddp", batch,
                            settings_text(v), m)
                    except Exception as err:  # noqa: BLE001
                        failures.append(f"ray_app {name}: {type(err).__name__}: {err}")
                        traceback.print_exc()
                        if "out of memory" in str(err).lower() and batch > 1:
                            batch //= 2  # the worker ran out of GPU memory: try half the batch
                            continue
                    break
        del model
        if not args.keep_model:
            shutil.rmtree(model_dir, ignore_errors=True)

    print("\n| model | data | variant | method | batch | tokens/s | MFU | peak GiB | train peak |")
    for r in results.rows:
        print(f"| {r['model']} | {_data_cell(r)} | {r['variant']} {r.get('settings', '')} "
              f"| {r['method']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} "
              f"| {r['peak_gib']} | {r.get('train_peak_gib', '-')} |")
    for f in failures:
        print("FAILED:", f)
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
