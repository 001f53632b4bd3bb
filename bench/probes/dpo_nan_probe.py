"""Which part of the DPO step makes NaN gradients on GPU: Liger kernels, the padding
attention mask, or neither. A 4-layer Llama with the 8B's width and vocabulary, 4-bit
base, LoRA on q,k,v,o, activation checkpointing; one DPO backward per variant."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.getcwd())
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from ray_app.config import DpoSection, LoraSection, ModelSection
from ray_app.data.collate import PackedCollate, PadCollate
from ray_app.data.tokenize import IGNORE
from ray_app.model.loading import add_lora, apply_speedups, load_base
from ray_app.train.dpo import pair_losses

folder = "/tmp/probe_model"
cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(folder)
g = torch.Generator().manual_seed(0)
def row(p, a):
    ids = torch.randint(3, 1000, (p + a,), generator=g).numpy()
    lab = ids.copy(); lab[:p] = IGNORE
    return ids, lab
rows_c = [row(100, 150), row(120, 60)]
rows_r = [row(100, 90), row(120, 200)]
pairs = {"input_ids": [r[0] for r in rows_c], "labels": [r[1] for r in rows_c],
         "rejected_input_ids": [r[0] for r in rows_r], "rejected_labels": [r[1] for r in rows_r]}
dev = torch.device("cuda")


def logps(peft, ids, labels, kw):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = peft(input_ids=ids, use_cache=False, **kw).logits
    lab = labels[:, 1:]
    lg = logits[:, :-1].float()
    t = -F.cross_entropy(lg.reshape(-1, lg.size(-1)), lab.reshape(-1), ignore_index=IGNORE,
                         reduction="none").view_as(lab)
    return t.sum(-1), (lab != IGNORE).sum(-1), logits


def probe(liger: str, mask: str) -> dict:
    mc = ModelSection(name_or_path=folder, dtype="bfloat16", quantization="nf4", liger=liger)
    base = apply_speedups(load_base(mc, True, dev), mc, "all", True)
    peft = add_lora(base, LoraSection(r=16, alpha=32, dropout=0.0,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    peft.train()
    if mask == "attention_mask":
        b = PadCollate(2)({"input_ids": pairs["input_ids"] + pairs["rejected_input_ids"],
                           "labels": pairs["labels"] + pairs["rejected_labels"]})
        kw = {"attention_mask": b["attention_mask"].to(dev)}
    else:
        b = PackedCollate(2)({"input_ids": pairs["input_ids"] + pairs["rejected_input_ids"],
                              "labels": pairs["labels"] + pairs["rejected_labels"]})
        kw = {"position_ids": b["position_ids"].to(dev)}
    ids, labels = b["input_ids"].to(dev), b["labels"].to(dev)
    with torch.no_grad(), peft.disable_adapter():
        ref, _, ref_logits = logps(peft, ids, labels, kw)
    pol, n, logits = logps(peft, ids, labels, kw)
    losses, _ = pair_losses(pol, ref, n, DpoSection())
    losses.sum().backward()
    grads = [p.grad for p in peft.parameters() if p.requires_grad and p.grad is not None]
    return {"liger": liger, "mask": mask, "loss": losses.tolist(),
            "logits_nan": bool(torch.isnan(logits).any()),
            "ref_logits_nan": bool(torch.isnan(ref_logits).any()),
            "grads_nan": sum(bool(torch.isnan(x).any()) for x in grads), "grads": len(grads)}


results = []
for liger in ("off", "on"):
    for mask in ("attention_mask", "position_ids"):
        results.append(probe(liger, mask))
        print("RESULT", json.dumps(results[-1]), flush=True)
        torch.cuda.empty_cache()
out = Path(os.environ.get("OUT", "/tmp"))
out.mkdir(parents=True, exist_ok=True)
(out / "dpo_nan_probe.json").write_text(json.dumps(results, indent=1))
