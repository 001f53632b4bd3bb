"""Second DPO NaN probe: the full-depth Llama-3.1-8B shape of `gpu_dpo_merge.py` (same
config, saved the same way), 4-bit base, LoRA on q,k,v,o, the batch laid out by the
training loop's own `PairCollate`, one DPO step as `ray_app.train.dpo` does it (reference
under no_grad with the adapter disabled, policy, loss over pairs, backward, clip). Variants:
Liger on/off, activation checkpointing all/none. Reports per variant: the policy-reference
log-ratio at step 0 (zero if the adapter-enabled and -disabled passes agree), whether logits
hold inf/NaN, and which decoder layers got NaN/inf gradients.

    python bench/probes/dpo_nan_probe2.py   # writes $OUT/dpo_nan_probe2.json
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, str(Path(__file__).parents[1]))
from gpu_throughput import build_model

from ray_app.config import DpoSection, LoraSection, ModelSection
from ray_app.data.tokenize import IGNORE
from ray_app.model.loading import add_lora, apply_speedups, load_base
from ray_app.train import dpo

folder = "/tmp/probe2_model"
if not Path(folder, "config.json").exists():
    model = build_model("8b")
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
g = torch.Generator().manual_seed(0)


def row(p, a):
    ids = torch.randint(3, 1024, (p + a,), generator=g).numpy()
    lab = ids.copy()
    lab[:p] = IGNORE
    return ids, lab


chosen, rejected = [row(90, 140), row(110, 70)], [row(90, 120), row(110, 160)]
batch_np = {"input_ids": [r[0] for r in chosen], "labels": [r[1] for r in chosen],
            "rejected_input_ids": [r[0] for r in rejected],
            "rejected_labels": [r[1] for r in rejected]}
dev = torch.device("cuda")


class Eng:  # what dpo._pair_forward needs of an Engine
    def __init__(self, peft):
        self.model = self.peft_model = peft


def probe(liger: str, ckpt: str) -> dict:
    mc = ModelSection(name_or_path=folder, dtype="bfloat16", quantization="nf4", liger=liger)
    base = apply_speedups(load_base(mc, True, dev), mc, ckpt, True)
    peft = add_lora(base, LoraSection(r=16, alpha=32, dropout=0.0,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    eng = Eng(peft)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    batch = {k: v.to(dev) for k, v in dpo.PairCollate(2)(batch_np).items()}
    batch.pop("num_real_tokens", None)
    out: dict = {"liger": liger, "ckpt": ckpt}
    peft.eval()
    with torch.no_grad():
        with peft.disable_adapter():
            ref, _ = dpo.answer_logps(peft, batch, autocast)
        pol, _ = dpo.answer_logps(peft, batch, autocast)
    out["eval_delta"] = (pol - ref).tolist()
    peft.train()
    with autocast, torch.no_grad():
        logits = peft(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      use_cache=False).logits
    out["logits_nonfinite"] = int((~torch.isfinite(logits)).sum())
    out["logits_absmax"] = float(logits.abs().max())
    del logits
    losses, _ = dpo._pair_forward(eng, batch, autocast, DpoSection())
    out["loss"] = losses.tolist()
    (losses.sum() / 2).backward()
    bad = []
    for name, p in peft.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            bad.append(name.split("layers.")[-1][:40])
    out["nonfinite_grads"] = bad[:12]
    out["nonfinite_grad_count"] = len(bad)
    params = [p for p in peft.parameters() if p.requires_grad]
    out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    del peft, base, eng
    torch.cuda.empty_cache()
    return out


results = []
# Liger patches some functions module-wide: the variants without it come first.
for liger, ckpt in (("off", "all"), ("off", "none"), ("on", "all"), ("on", "none")):
    try:
        results.append(probe(liger, ckpt))
    except Exception as err:  # noqa: BLE001 - a failing variant is a result too
        results.append({"liger": liger, "ckpt": ckpt, "error": f"{type(err).__name__}: {err}"})
    print("RESULT", json.dumps(results[-1]), flush=True)
out_dir = Path(os.environ.get("OUT", "/tmp"))
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "dpo_nan_probe2.json").write_text(json.dumps(results, indent=1))
