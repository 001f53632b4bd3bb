"""Scoring eval records with the base model and with base + adapter, in a Ray Data actor pool.

Each actor loads the base once with the adapter on top; the base's own numbers come from
the same weights with the adapter switched off (`disable_adapter`), so one copy of the
model serves both sides. Per record it returns the summed token loss of each side and,
where the record has a prompt and a reference answer, each side's greedy generation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ray_app.data.collate import REAL_TOKENS, PadCollate
from ray_app.data.tokenize import IGNORE

SIDES = ("base", "adapter")
OUTPUT_SCHEMA = pa.schema([
    ("tokens", pa.int64()), ("loss_base", pa.float64()), ("loss_adapter", pa.float64()),
    ("prompt", pa.string()), ("reference", pa.string()),
    ("generated_base", pa.string()), ("generated_adapter", pa.string()),
])


def prompt_and_reference(input_ids, labels) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference answer ids): the tokens before the first trained span, and
    that span. None when nothing but the first token precedes it: plain text records have
    no prompt (their first label is masked only because nothing predicts a first token)."""
    trained = np.flatnonzero(np.asarray(labels) != IGNORE)
    if len(trained) == 0 or trained[0] <= 1:
        return None
    start = int(trained[0])
    gaps = np.flatnonzero(np.diff(trained) > 1)
    end = int(trained[gaps[0]]) + 1 if len(gaps) else int(trained[-1]) + 1
    ids = [int(i) for i in input_ids]
    return ids[:start], ids[start:end]


class ScoreRecords:
    """Ray Data callable class: (input_ids, labels) rows -> one row of OUTPUT_SCHEMA each."""

    def __init__(self, model_config: dict[str, Any], adapter: str, tokenizer_path: str,
                 max_new_tokens: int, use_gpu: bool):
        from peft import PeftModel

        from ray_app.config import ModelSection
        from ray_app.data.tokenize import load_tokenizer
        from ray_app.model.loading import load_base

        model_cfg = ModelSection.model_validate(model_config)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(tokenizer_path, model_cfg.trust_remote_code)
        base = load_base(model_cfg, use_gpu, self.device)
        if model_cfg.quantization == "none":
            base.to(self.device)
        self.model = PeftModel.from_pretrained(base, adapter).eval()
        self.collate = PadCollate(self.tokenizer.pad_token_id)
        self.max_new_tokens = max_new_tokens
        self.special = set(self.tokenizer.all_special_ids)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["input_ids"])
        out: dict[str, list] = {name: [""] * n for name in OUTPUT_SCHEMA.names
                                if OUTPUT_SCHEMA.field(name).type == pa.string()}
        inputs = {k: v.to(self.device) for k, v in self.collate(batch).items() if k != REAL_TOKENS}
        out["tokens"] = (inputs["labels"][:, 1:] != IGNORE).sum(1).tolist()
        pairs = {i: pair for i in range(n)
                 if (pair := prompt_and_reference(batch["input_ids"][i], batch["labels"][i]))}
        for side in SIDES:
            with self._side(side):
                out[f"loss_{side}"] = self._loss_sums(inputs)
                if pairs:
                    for i, text in zip(pairs, self._generate([p for p, _ in pairs.values()],
                                                            self._stop_ids(pairs.values()))):
                        out[f"generated_{side}"][i] = text
        for i, (prompt, reference) in pairs.items():
            out["prompt"][i] = self.tokenizer.decode(prompt)
            out["reference"][i] = self.tokenizer.decode(reference, skip_special_tokens=True).strip()
        return pa.Table.from_pydict(out, schema=OUTPUT_SCHEMA)

    def _side(self, side: str):
        from contextlib import nullcontext

        return self.model.disable_adapter() if side == "base" else nullcontext()

    def _loss_sums(self, inputs: dict[str, torch.Tensor]) -> list[float]:
        logits = self.model(input_ids=inputs["input_ids"],
                            attention_mask=inputs["attention_mask"]).logits[:, :-1].float()
        labels = inputs["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        return losses.sum(1).double().tolist()

    def _stop_ids(self, pairs) -> list[int]:
        """EOS, and the token that ends each reference when it is a special one (a chat
        template's end-of-turn token need not be the tokenizer's EOS)."""
        stops = {self.tokenizer.eos_token_id} | {ref[-1] for _, ref in pairs
                                                  if ref[-1] in self.special}
        return sorted(s for s in stops if s is not None)

    def _generate(self, prompts: list[list[int]], stop_ids: list[int]) -> list[str]:
        from transformers import GenerationConfig

        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        # Left padding: every prompt ends where generation starts.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=self.device)
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False,
                                  eos_token_id=stop_ids, pad_token_id=pad)
        generated = self.model.generate(input_ids=ids, attention_mask=mask,
                                        generation_config=config)
        return [text.strip() for text in self.tokenizer.batch_decode(
            generated[:, width:], skip_special_tokens=True)]
