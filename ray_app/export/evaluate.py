"""`ray-app eval`: the base model and base + adapter, side by side, on the eval split.

    eval split (Ray Data, the same tokenized records training evaluated on)
      -> ScoreRecords actor pool: per-record loss sums and greedy generations, both sides
      -> driver: perplexity, ROUGE-L, BLEU, exact match -> table, eval_results.json,
         generations.jsonl

Perplexity is exp(mean loss over the trained (unmasked) tokens), as in training's eval.
Generation metrics cover the records with a prompt and a reference answer (chat and
instruction records): the prompt is everything before the first trained span, the
reference is that span.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

from ray_app.config import BUILTIN_TINY_LLAMA, Config
from ray_app.display import status
from ray_app.errors import UserError
from ray_app.export.adapter import Adapter, check_fits, load_base_config, read_adapter
from ray_app.export.metrics import generation_scores, rouge_l
from ray_app.export.scoring import SIDES, ScoreRecords
from ray_app.extras import check_installed, check_packages
from ray_app.model.prepare import check_tokenizer, materialise_builtin

RESULTS_FILE = "eval_results.json"
GENERATIONS_FILE = "generations.jsonl"
NO_EVAL_RECORDS = ("There are no eval records to evaluate on: set data.eval (eval shards) or "
                   "data.eval_fraction > 0.")


def prepare_eval(cfg: Config, adapter_dir: str) -> tuple[Config, Adapter]:
    """Checks the adapter against the config's base before Ray starts; returns the config
    with the built-in base written to `<output>/base_model` (as training does)."""
    if not cfg.data.has_eval_source():
        raise UserError(NO_EVAL_RECORDS)
    adapter = read_adapter(adapter_dir)
    check_packages(cfg)
    check_installed("rouge_score", "ray-app eval (ROUGE-L)")
    check_installed("sacrebleu", "ray-app eval (BLEU)")
    tokenizer = check_tokenizer(cfg)
    if cfg.model.name_or_path == BUILTIN_TINY_LLAMA:
        cfg = materialise_builtin(cfg, tokenizer, cfg.output_path())
    base = cfg.model.name_or_path
    check_fits(adapter, base, load_base_config(base, cfg.model.trust_remote_code))
    return cfg, adapter


def run_eval(cfg: Config, adapter: Adapter, console: Console) -> dict[str, Any]:
    """Scores the eval split with both sides and writes `<output>/eval/`. Call with Ray
    initialised and `cfg` from `prepare_eval`."""
    from ray_app.data.pipeline import prepare, tokenizer_path

    started = time.perf_counter()
    output = cfg.output_path()
    with status(console, "Reading, validating and tokenizing the data with Ray Data..."):
        # Sequences whatever train.method is: a preference record is scored on its prompt
        # and chosen answer (its supervised view), like every other record.
        data = prepare(cfg, cfg.storage_uri(), output / "rejects")
    if data.report.eval_records == 0:  # the split can come out empty on little data
        raise UserError(NO_EVAL_RECORDS)
    records = data.split("eval")
    if cfg.eval.max_records:
        records = records.limit(cfg.eval.max_records)
    use_gpu = cfg.scaling.use_gpu
    scored = records.map_batches(
        ScoreRecords,
        fn_constructor_kwargs={"model_config": cfg.model.model_dump(mode="json"),
                               "adapter": str(adapter.path), "tokenizer_path": tokenizer_path(cfg),
                               "max_new_tokens": cfg.eval.max_new_tokens, "use_gpu": use_gpu},
        compute=ray.data.ActorPoolStrategy(size=actor_count(cfg)),
        batch_size=cfg.eval.batch_size, batch_format="numpy",
        # Fractional CPUs leave room for Ray Data's read tasks on small machines.
        **({"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 0.5}),
    )
    with status(console, f"Scoring eval records with the base and the adapter on "
                        f"{actor_count(cfg)} {'GPU' if use_gpu else 'CPU'} actor(s)..."):
        rows = scored.take_all()
    results = summarise(rows, cfg, adapter)
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(results, rows, output / "eval")
    return results


def actor_count(cfg: Config) -> int:
    """eval.actors, or one per GPU (use_gpu) or per 2 CPUs of the cluster."""
    if cfg.eval.actors:
        return cfg.eval.actors
    resources = ray.cluster_resources()
    if cfg.scaling.use_gpu:
        return max(1, int(resources.get("GPU", 1)))
    return max(1, int(resources.get("CPU", 1)) // 2)


def summarise(rows: list[dict[str, Any]], cfg: Config, adapter: Adapter) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in rows)
    with_reference = [r for r in rows if r["reference"]]
    models = {}
    for side in SIDES:
        loss = math.fsum(r[f"loss_{side}"] for r in rows) / max(tokens, 1)
        models[side] = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                        **generation_scores([r[f"generated_{side}"] for r in with_reference],
                                            [r["reference"] for r in with_reference])}
    return {
        "adapter": str(adapter.path),
        "base": cfg.model.name_or_path,
        "quantization": cfg.model.quantization,
        "records": len(rows),
        "tokens": tokens,
        "generated": len(with_reference),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "models": models,
    }


def write_outputs(results: dict[str, Any], rows: list[dict[str, Any]], folder: Path) -> None:
    """eval_results.json (with versions), and every generation as one JSON line, ordered by
    prompt so that reruns diff cleanly."""
    from ray_app.summary import write_summary

    folder.mkdir(parents=True, exist_ok=True)
    write_summary(folder / RESULTS_FILE, results)
    lines = []
    for r in sorted((r for r in rows if r["reference"]), key=lambda r: (r["prompt"], r["reference"])):
        line = {"prompt": r["prompt"], "reference": r["reference"]}
        for side in SIDES:
            line[side] = r[f"generated_{side}"]
            line[f"rouge_l_{side}"] = round(rouge_l(r[f"generated_{side}"], r["reference"]), 2)
        lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    (folder / GENERATIONS_FILE).write_text("".join(lines))


def render_results(results: dict[str, Any], console: Console, folder: Path) -> None:
    base, tuned = results["models"]["base"], results["models"]["adapter"]
    table = Table(title=f"Eval: {results['records']} records, {results['tokens']:,} tokens; "
                        f"{results['generated']} generations of up to "
                        f"{results['max_new_tokens']} tokens")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("base + adapter", justify="right")
    table.add_column("change", justify="right")
    for key, label, lower_is_better in (("perplexity", "perplexity", True),
                                        ("loss", "loss", True),
                                        ("rouge_l", "ROUGE-L F1 (0-100)", False),
                                        ("bleu", "BLEU (0-100)", False),
                                        ("exact_match", "exact match (%)", False)):
        a, b = base[key], tuned[key]
        if a is None:
            table.add_row(label, "-", "-", "-")
            continue
        better = b < a if lower_is_better else b > a
        colour = "green" if better else ("red" if b != a else "")
        change = f"[{colour}]{b - a:+.2f}[/{colour}]" if colour else f"{b - a:+.2f}"
        table.add_row(label, f"{a:.2f}", f"{b:.2f}", change)
    console.print(table)
    if not results["generated"]:
        console.print("No eval record has a prompt and a reference answer (plain text records "
                      "only), so there are no generation metrics.")
    console.print(f"Results: {folder / RESULTS_FILE}\nGenerations: {folder / GENERATIONS_FILE}")
