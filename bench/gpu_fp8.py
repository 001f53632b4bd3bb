"""FP8 frozen base (`model.precision: fp8`) on one GPU: matmul speed, quality, 1B speed,
and the time a restart costs.

1. `micro`: a frozen linear's forward + input-gradient pass (the work of a LoRA base layer)
   at the Llama-3.1-8B layer shapes, 16,384 tokens, both compiled: bf16 `nn.Linear` against
   `ray_app.model.fp8.FrozenFP8Linear`; median of 20 after warm-up, CUDA events. Then the
   activation quantisation kernel alone (`quantise_kernel`): GB/s, rows read whole against
   rows read in blocks.
2. `quality`: the Llama-3.2-1B shape, LoRA r16 on q,k,v,o, Liger + compile, batch 16 x
   2048, trained by `ray_app.train.run.run_training` for --steps steps on a learnable
   synthetic corpus (`quality_tasks`; --task): `words` (the default), a word chain
   fine-tuned on a base first pre-trained in full for --pretrain-steps steps on another
   chain and progressions; or `progressions`, arithmetic progressions on the random-init
   base. Once in bf16 and once with model.precision fp8 (--precisions; default,fp8,default
   adds a second bf16 run: the run-to-run spread), with the product's cosine schedule
   (--schedule). The loss curves, the final eval loss (16
   held-out records) and the wall-clock tokens/s of each run (`gpu_throughput.ray_app_run`:
   between the reports of step 10 and the last before the final step, as the driver
   received them) are kept. In the same process:
   the common recipe (`gpu_throughput.common_recipe`, HF + PEFT, gradient checkpointing, at
   --common-batch) and, with --plain, the plain loop of ray_app's model stack without Ray
   (`gpu_throughput.plain_loop_run`, random ids, timed between CUDA synchronisations) in
   bf16 and FP8. Each ray_app run also keeps the loop's own step-time figure
   (`tokens_per_s_loop`), which its wall-clock figure is compared with.
3. `restart`: an FP8 run (`--restart-model`: the 1B shape at batch 16 or the 8B shape at
   batch 4, which fits 80 GB) with a worker failure injected after step 15 (checkpoint
   every 10 steps); the run summary's restart record gives the time from the failure to
   the end of the first step after it (`next_step_s`), with the compile caches kept by
   the run.

With RAY_APP_FP8_ABLATION set (`ray_app.model.fp8_ablations`: exact_accum,
activation_rounding, weight_rounding) the fp8 runs take one source of FP8 error at a time,
named `fp8_<ablation>`; one process per ablation (Ray's workers inherit the variable when
the process starts Ray).

`quality --seeds 42,7` runs every precision once per train.seed; `quality_summary` in the
results gives each precision's mean final eval loss against bf16's, the bf16 runs' own
spread, and each run against the bf16 run of its own seed (`--summarise STEM ...`: the same
over the runs of several results files).

Everything lands in <out>/gpu_fp8.json as it finishes; `--plot` draws
<out>/gpu_fp8_loss.png from that file (`--plot STEM`: <out>/STEM.json; needs matplotlib).

    python bench/gpu_fp8.py --out OUT --work /tmp/fp8 micro quality restart
    python bench/gpu_fp8.py --out bench/results --plot
    python bench/gpu_fp8.py --out bench/results --plot gpu_fp8_240
    python bench/gpu_fp8.py --out OUT --work .bench_work/words --steps 200 quality \
        --precisions default,fp8 --seeds 42,7 --common-batch 0
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_throughput as gt  # the bench's shared helpers (after the path insert)
import quality_tasks as qt

from ray_app.config import TrainSection
from ray_app.model.fp8_ablations import ABLATION_ENV

DEFAULT_SEED = TrainSection.model_fields["seed"].default

SHAPES_8B = [("q_proj", 4096, 4096), ("k/v_proj", 4096, 1024), ("o_proj", 4096, 4096),
             ("gate/up_proj", 4096, 14336), ("down_proj", 14336, 4096)]


def micro(tokens: int = 16384, reps: int = 20) -> list[dict[str, Any]]:
    import torch

    from ray_app.model.fp8 import FrozenFP8Linear

    rows = []
    for name, k, n in SHAPES_8B:
        linear = torch.nn.Linear(k, n, bias=False, device="cuda",
                                 dtype=torch.bfloat16).requires_grad_(False)
        fp8 = FrozenFP8Linear(linear, torch.device("cuda"))
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
        times = {}
        for label, module in (("bf16", linear), ("fp8", fp8)):
            fn = torch.compile(lambda x, m=module: m(x))

            def once(fn=fn, x=x, grad=grad):
                fn(x).backward(grad)
                x.grad = None

            for _ in range(3):
                once()
            samples = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                once()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            times[label] = sorted(samples)[reps // 2]
        flops = 2 * 2 * tokens * k * n  # forward + input gradient
        rows.append({"layer": name, "in": k, "out": n, "tokens": tokens,
                     "bf16_ms": times["bf16"] * 1e3, "fp8_ms": times["fp8"] * 1e3,
                     "bf16_tflops": flops / times["bf16"] / 1e12,
                     "fp8_tflops": flops / times["fp8"] / 1e12,
                     "speedup": times["bf16"] / times["fp8"]})
        print("MICRO", json.dumps(rows[-1]), flush=True)
    return rows


QUANTISE_SHAPES = [(32768, 2048), (32768, 8192), (16384, 4096), (16384, 14336)]


def quantise_kernel(reps: int = 50) -> list[dict[str, Any]]:
    """The activation quantisation kernel alone, at the 1B (2,048 / 8,192 features, 32,768
    tokens) and 8B (4,096 / 14,336, 16,384 tokens) shapes: the default (each row read once,
    whole) against 2,048-column blocks (two reads of each row, the kernel of 2026-12-05's
    profile); GB/s counts one bf16 read and one e4m3 write of every value."""
    import torch

    from ray_app.model.fp8_kernels import quantize_rows_fused

    rows = []
    for tokens, features in QUANTISE_SHAPES:
        x = torch.randn(tokens, features, device="cuda", dtype=torch.bfloat16)
        row: dict[str, Any] = {"tokens": tokens, "features": features}
        for label, block in (("whole_row", None), ("blocks_2048", 2048)):
            for _ in range(3):
                quantize_rows_fused(x, torch.float8_e4m3fn, block=block)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                quantize_rows_fused(x, torch.float8_e4m3fn, block=block)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / reps
            row[f"{label}_us"] = seconds * 1e6
            row[f"{label}_gb_s"] = x.numel() * 3 / seconds / 1e9
        rows.append(row)
        print("QUANTISE", json.dumps(row), flush=True)
    return rows


def corpus_records(steps: int, batch: int, seq: int = 2048) -> int:
    """Records of `quality_tasks` corpora for `steps` steps of `batch` x `seq` tokens in one
    epoch, with a margin (about 670 tokens a record with the bundled tokenizer)."""
    return int(steps * batch * seq / 600) + 400


def quality(args, work: Path, save) -> None:
    import gc

    import torch

    # Enough records for --steps at batch 16 x 2048 in one epoch (a record is 600-670 tokens
    # with the bundled tokenizer; progressions packed 5,115 records into 1,754 sequences at
    # 95.5%), so that no epoch boundary (where the data pipeline starts its next pass) falls
    # in the timed window.
    records = corpus_records(args.steps, 16)
    train, evals = work / f"{args.task}.jsonl", work / f"{args.task}_eval.jsonl"
    if args.task == "words":
        model_dir, pretrain = qt.pretrain_base(work, args.pretrain_steps)
        save("pretrain", pretrain)
        qt.write_word_chain(train, records=records, seed=0)
        qt.write_word_chain(evals, records=16, seed=1)
        save("task", {"name": "words", "words": len(qt.chain_words()),
                      "successors": qt.CHAIN_SUCCESSORS, "entropy_floor": qt.chain_entropy(),
                      "base": f"pre-trained {args.pretrain_steps} steps (pretrain)"})
    else:
        model_dir = str(work / "model_1b")
        if not (Path(model_dir) / "config.json").exists():
            gt.build_model("1b").save_pretrained(model_dir)
        qt.write_progressions(train, records=records, seed=0)
        qt.write_progressions(evals, records=16, seed=1)
        save("task", {"name": "progressions", "base": "random init"})
    if args.common_batch:
        common = gt.common_recipe(gt.build_model("1b"), args.common_batch, 2048, warmup=3,
                                  steps=15)
        save("common_recipe", {"batch": args.common_batch, **common})
        gc.collect()
        torch.cuda.empty_cache()
    for precision in ("default", "fp8") if args.plain else ():
        plain = gt.plain_loop_run(model_dir, work, batch=16, seq=2048, warmup=5, steps=15,
                                  compile_=True, liger="on", quantization="none",
                                  checkpointing="none", precision=precision)
        save(f"plain_loop_{precision}", {"batch": 16, **plain})
        gc.collect()
        torch.cuda.empty_cache()
    seen: dict[str, int] = {}
    runs: dict[str, Any] = {}
    seeds = [int(s) for s in args.seeds.split(",")]
    # An FP8 ablation named in this process's environment (ray_app.model.fp8_ablations; the
    # Ray workers started here inherit it) changes what the fp8 runs are: named apart.
    ablation = args.ablation  # read once by main()
    for seed, precision in ((s, p) for s in seeds for p in args.precisions.split(",")):
        precision_label = f"fp8_{ablation}" if precision == "fp8" and ablation else precision
        # A precision named twice is a repeat (run-to-run spread): its own run name and key;
        # a seed other than the product's default (42) is part of both.
        label = precision_label if seed == DEFAULT_SEED else f"{precision_label}_s{seed}"
        seen[label] = seen.get(label, 0) + 1
        label = label if seen[label] == 1 else f"{label}_{seen[label]}"
        m = gt.ray_app_run(f"quality-{label}", model_dir, train, evals, work, batch=16,
                           seq=2048, steps=args.steps, warmup_steps=10, log_every=5,
                           compile_=True, liger="on", quantization="none",
                           checkpointing="none", precision=precision, lr=args.lr,
                           schedule=args.schedule, seed=seed)
        runs[f"ray_app_{label}"] = {"batch": 16, "schedule": args.schedule, "seed": seed,
                                    "precision": precision_label, "task": args.task, **m}
        save(f"ray_app_{label}", runs[f"ray_app_{label}"])
    save("quality_summary", quality_summary(runs))


def quality_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Final eval loss of every quality run by precision (a run saved without its precision
    is named by its key), the mean of each, and each precision's mean against bf16's
    ("default") mean, next to the spread of the bf16 runs themselves. Runs that share a
    train.seed with a bf16 run (the same adapter init, dropout and data order) are also
    compared with it alone (`vs_bf16_same_seed`; within one results file when several are
    merged, since each file's runs share a base): seed-to-seed spread cancels there."""
    finals: dict[str, list[float]] = {}
    seeded: list[tuple[str, str, float]] = []  # (precision, "[STEM ]seed N", final eval loss)
    for key, run in results.items():
        stem, _, name = key.rpartition("/")  # "STEM/ray_app_..." when several files are merged
        if name.startswith("ray_app_") and run.get("eval_loss_final") is not None:
            precision = run.get("precision") or name.removeprefix("ray_app_").split("_")[0]
            finals.setdefault(precision, []).append(run["eval_loss_final"])
            if run.get("seed") is not None:
                seeded.append((precision, f"{stem} seed {run['seed']}".lstrip(),
                               run["eval_loss_final"]))
    mean = {p: sum(v) / len(v) for p, v in finals.items()}
    summary: dict[str, Any] = {"eval_loss_final": finals, "mean": mean}
    if "default" in mean:
        bf16 = finals["default"]
        summary["bf16_spread"] = (max(bf16) - min(bf16)) / min(bf16)
        summary["mean_vs_bf16"] = {p: m / mean["default"] - 1 for p, m in mean.items()
                                   if p != "default"}
        # One bf16 run per seed to pair with (the first, when a seed ran twice).
        bf16_of: dict[str, float] = {}
        for precision, seed_key, loss in seeded:
            if precision == "default":
                bf16_of.setdefault(seed_key, loss)
        paired: dict[str, dict[str, float]] = {}
        for precision, seed_key, loss in seeded:
            if precision != "default" and seed_key in bf16_of:
                paired.setdefault(precision, {})[seed_key] = loss / bf16_of[seed_key] - 1
        if paired:
            summary["vs_bf16_same_seed"] = paired
    return summary


def restart(args, work: Path, save) -> None:
    from ray_app.train.faults import FAIL_AT_STEP_ENV

    key = args.restart_model
    model_dir = str(work / f"model_{key}")
    if not (Path(model_dir) / "config.json").exists():
        gt.build_model(key).save_pretrained(model_dir)
    train, evals = work / "progressions.jsonl", work / "progressions_eval.jsonl"
    if not train.exists():
        qt.write_progressions(train, records=corpus_records(30, 16), seed=0)
        qt.write_progressions(evals, records=16, seed=1)
    batch = 16 if key == "1b" else 4  # 8B at batch 4: fits an 80 GB GPU
    os.environ[FAIL_AT_STEP_ENV] = "15"
    try:
        m = gt.ray_app_run(f"restart-fp8-{key}", model_dir, train, evals, work, batch=batch,
                           seq=2048, steps=30, warmup_steps=20, log_every=5, compile_=True,
                           liger="on", quantization="none", checkpointing="none",
                           precision="fp8", checkpoint_every=10, max_failures=1, lr=args.lr)
    finally:
        os.environ.pop(FAIL_AT_STEP_ENV, None)
    save(f"restart_fp8_{key}", {"model": gt.SHAPES[key]["name"], "batch": batch, **{
        k: m.get(k) for k in ("restarts", "restart_history", "final_step",
                              "summary_time_to_first_step_s", "summary_warmup_s",
                              "tokens_per_s")}})


def plot(out: Path, stem: str) -> None:
    """The train-loss curves of `<out>/<stem>.json` -> `<out>/<stem>_loss.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads((out / f"{stem}.json").read_text())
    keys = [k for k in results if k.startswith("ray_app_")]
    fig, ax = plt.subplots(figsize=(7, 4.2 + 0.22 * len(keys)))
    # One colour per train.seed, one line style per precision: a seed's runs side by side.
    seeds = list(dict.fromkeys(results[k].get("seed") for k in keys))
    precisions = sorted({results[k].get("precision", k) for k in keys},
                        key=lambda p: (p != "default", p != "fp8", p))  # bf16 solid, FP8 dashed
    styles = ["-", "--", ":", "-."]
    for key in keys:
        run = results[key]
        # ray_app_default_s7 -> "bf16 s7", ray_app_fp8_exact_accum -> "fp8 base exact accum"
        label = (key.removeprefix("ray_app_").replace("default", "bf16")
                 .replace("fp8", "fp8 base", 1).replace("_", " "))
        curve = [p for p in run["curve"] if p.get("loss") is not None]
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve],
                color=f"C{seeds.index(run.get('seed')) % 10}",
                linestyle=styles[precisions.index(run.get("precision", key)) % len(styles)],
                label=f"{label} (final eval loss {run['eval_loss_final']:.4f})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    task = results.get("task", {}).get("name", "progressions")
    ax.set_title("Llama-3.2-1B shape, LoRA r16 q,k,v,o, " + {
        "progressions": "arithmetic progressions, random-init base",
        "words": "word chain, pre-trained base"}[task])
    floor = results.get("task", {}).get("entropy_floor")
    if floor:
        ax.axhline(floor, color="grey", linestyle=":", label=f"chain entropy {floor:.3f}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small")
    fig.tight_layout()
    fig.savefig(out / f"{stem}_loss.png", dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", help="micro, quality and/or restart")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--work", default="/tmp/gpu_fp8")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--task", default="words", choices=["words", "progressions"],
                        help="quality: the corpus (words: a word chain fine-tuned on a "
                        "pre-trained base; progressions: on the random-init base)")
    parser.add_argument("--pretrain-steps", type=int, default=150,
                        help="quality, words: full-parameter steps of the base's pre-training")
    parser.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"],
                        help="quality: the learning-rate schedule (cosine, the product's "
                        "default, ends both runs at a plateau rather than mid-descent)")
    parser.add_argument("--common-batch", type=int, default=16,
                        help="quality: the common recipe's batch (0: not run)")
    parser.add_argument("--precisions", default="default,fp8",
                        help="quality: the ray_app runs (model.precision values; one named "
                        "twice runs again, e.g. default,fp8,default for the bf16 run-to-run "
                        "spread)")
    parser.add_argument("--seeds", default=str(DEFAULT_SEED),
                        help="quality: train.seed of the runs, comma-separated; every precision "
                        "runs once per seed (adapter init, dropout and data order differ)")
    parser.add_argument("--plain", action="store_true",
                        help="quality: also time the plain loop (no Ray) in bf16 and FP8")
    parser.add_argument("--restart-model", choices=["1b", "8b"], default="1b",
                        help="the shape of the restart part (8b: batch 4, fits 80 GB)")
    parser.add_argument("--summarise", nargs="+", metavar="STEM",
                        help="only print the quality summary of the runs in OUT/STEM.json "
                        "files taken together (runs of several calls)")
    parser.add_argument("--plot", nargs="?", const="gpu_fp8", metavar="STEM",
                        help="only draw the loss curves of OUT/STEM.json (default gpu_fp8) "
                        "into OUT/STEM_loss.png")
    args = parser.parse_args()
    if set(args.parts) - {"micro", "quality", "restart"}:
        parser.error(f"parts: micro, quality and/or restart, got {args.parts}")
    out, work = Path(args.out), Path(args.work).resolve()  # workers run elsewhere
    out.mkdir(parents=True, exist_ok=True)
    if args.plot:
        plot(out, args.plot)
        return 0
    if args.summarise:
        runs = {f"{stem}/{key}": run for stem in args.summarise
                for key, run in json.loads((out / f"{stem}.json").read_text()).items()
                if key.startswith("ray_app_")}
        print(json.dumps(quality_summary(runs), indent=2))
        return 0
    import torch

    file = out / "gpu_fp8.json"
    args.ablation = os.environ.get(ABLATION_ENV)  # part of the command that made the results
    env_prefix = f"{ABLATION_ENV}={args.ablation} " if args.ablation else ""
    results: dict[str, Any] = {
        "command": env_prefix + "python bench/gpu_fp8.py " + shlex.join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "matmul_tflops": round(gt.matmul_tflops(), 1)}

    def save(key: str, value: Any) -> None:
        results[key] = value
        file.write_text(json.dumps(results, indent=2) + "\n")
        print("SAVED", key, json.dumps(value)[:600], flush=True)

    t0 = time.perf_counter()
    failed = False
    for part in args.parts:
        try:
            if part == "micro":
                save("micro", micro())
                save("quantise_kernel", quantise_kernel())
            elif part == "quality":
                quality(args, work, save)
            elif part == "restart":
                restart(args, work, save)
        except Exception:  # noqa: BLE001 - keep the other parts
            import traceback

            traceback.print_exc()
            failed = True
        print(f"{part} done at {time.perf_counter() - t0:.0f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
