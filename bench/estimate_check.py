"""`ray-app estimate` against the peak memory measured on the GPU machine.

Reads the ray_app rows of bench/results/gpu_throughput.json, rebuilds each run's settings
as an estimate Plan and compares:
- `train_peak_gib` (eval passes left out) with the estimate's training peak and
  `eval_peak_gib` with its evaluation peak, where measured;
- otherwise `peak_gib` (the whole worker) with the larger of the estimated training and
  evaluation peaks: those older runs evaluated with full logits.
The row marked 'no eval data' documents a defect since fixed (the trainer stayed in eval
mode: full logits and no dropout in training) and is not a setting anyone can choose, so
it is listed but not scored.

    python bench/estimate_check.py            # writes bench/results/estimate_check.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_throughput import LORA_DROPOUT, LORA_R, SHAPES, TARGET_SETS

from ray_app.estimate import GIB, Plan, estimate, shape_of

TARGET = 0.15  # allowed |estimate / measured - 1|


def shape(key: str):
    from transformers import LlamaConfig

    fields = {k: v for k, v in SHAPES[key].items() if k != "name"}
    return shape_of(LlamaConfig(**fields), SHAPES[key]["name"])


def _targets(row: dict) -> tuple[str, ...] | str:
    """The run's LoRA targets (rows before `targets` was recorded ran q,k,v,o)."""
    targets = TARGET_SETS[row.get("targets") or "qkvo"]
    return targets if targets == "all-linear" else tuple(targets)


def plan_of(row: dict) -> Plan:
    settings = row["settings"]
    ckpt = "all" if "act. ckpt all" in settings else "none"
    optimizer = next((o for o in ("paged_adamw_8bit", "adamw_8bit") if o in settings), "adamw")
    return Plan(
        method=row["method"], strategy="ddp", gpus=row.get("gpus", 1), batch=row["batch"],
        seq_len=row["seq_len"], lora_r=LORA_R, lora_targets=_targets(row),
        lora_dropout=LORA_DROPOUT, liger="liger on" in settings, checkpointing=ckpt,
        optimizer=optimizer, packed_mask=row["data"] == "variable",
        # Newer rows say so in `fused_eval`; older ones in their settings text.
        fused_eval=row.get("fused_eval", "fused-loss eval" in settings),
    )


def check(rows: list[dict]) -> list[dict]:
    shapes = {SHAPES[k]["name"]: shape(k) for k in SHAPES}
    out = []
    for row in rows:
        if row.get("variant") != "ray_app" or row["model"] not in shapes:
            continue
        est = estimate(shapes[row["model"]], plan_of(row))
        if row.get("train_peak_gib") is not None:
            pairs = [("train peak", row["train_peak_gib"], est.train_peak),
                     ("eval peak", row.get("eval_peak_gib"), est.eval_peak)]
        else:
            pairs = [("whole run (train and full-logit eval)", row["peak_gib"], est.peak)]
        scored = "no eval data" not in row["settings"]
        for against, measured, predicted in pairs:
            if not measured:
                continue
            error = predicted / GIB / measured - 1
            out.append({
                "model": row["model"], "targets": row.get("targets") or "qkvo",
                "device": row.get("device"), "method": row["method"], "batch": row["batch"],
                "data": row["data"], "settings": row["settings"], "compared": against,
                "measured_gib": round(measured, 2), "estimate_gib": round(predicted / GIB, 2),
                "error": round(error, 4), "scored": scored,
                "within_target": abs(error) <= TARGET if scored else None,
                "estimate_parts_gib": est.as_gib(), "measured_date": row.get("date"),
            })
    return out


def markdown(results: list[dict]) -> str:
    scored = [r for r in results if r["scored"]]
    hits = sum(r["within_target"] for r in scored)
    worst = max(abs(r["error"]) for r in scored)
    lines = [
        "# `ray-app estimate` against measured peak GPU memory", "",
        (f"{hits} of {len(scored)} scored runs within ±{TARGET:.0%}; largest error "
        f"{worst:.1%}. Measured: `torch.cuda.max_memory_allocated` of the Ray Train worker on "
        "one GPU (`bench/results/gpu_throughput.json`). Estimate: `ray_app/estimate.py` "
        "with each run's settings. Made by `python bench/estimate_check.py`."), "",
        ("| model | LoRA targets | GPU | method | batch | data | settings | compared "
         "| measured GiB | estimate GiB | error |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        error = f"{r['error']:+.1%}" + ("" if r["scored"] else " (not scored: defect row)")
        lines.append(f"| {r['model']} | {r['targets']} | {r['device']} | {r['method']} "
                     f"| {r['batch']} | {r['data']} | "
                     f"{r['settings']} | {r['compared']} | {r['measured_gib']:.2f} | "
                     f"{r['estimate_gib']:.2f} | {error} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(REPO / "bench/results/gpu_throughput.json"))
    parser.add_argument("--out", default=str(REPO / "bench/results"))
    args = parser.parse_args()
    results = check(json.loads(Path(args.results).read_text()))
    out = Path(args.out)
    (out / "estimate_check.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "estimate_check.md").write_text(markdown(results))
    print(markdown(results))
    return 0 if all(r["within_target"] for r in results if r["scored"]) else 1


if __name__ == "__main__":
    sys.exit(main())
