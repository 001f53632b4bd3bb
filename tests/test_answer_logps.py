"""Per-answer log-probs computed in chunks (the preference methods' memory bound) equal
the model's own whole logits: values and gradients, for plain, soft-capped and scaled
output layers, under a LoRA adapter and with it disabled."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from ray_app.data.tokenize import IGNORE
from ray_app.train.methods import answers
from ray_app.train.methods.answers import PairCollate, answer_logps

SHAPE = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
# Each architecture's own way with its logits: none (Llama), tanh soft-capping (Gemma 2),
# a division that this module does not know (Granite), which its probe must detect.
MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               {"final_logit_softcapping": 0.5, "attn_logit_softcapping": None}),
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM,
                {"logits_scaling": 4.0}),
}


def _model(kind: str):
    config_cls, model_cls, extra = MODELS[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**SHAPE, **extra))
    with torch.no_grad():  # logits far from 0, so that a missing transform shows
        model.get_output_embeddings().weight.mul_(40)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    return get_peft_model(model, lora).eval()


def _batch(seed: int, flatten: bool = False):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(3, SHAPE["vocab_size"], n) for n in rng.integers(4, 14, 6)]
    labels = [np.where(np.arange(len(r)) < rng.integers(1, 4), IGNORE, r) for r in rows]
    return PairCollate(pad_id=0, flatten=flatten)(
        {"input_ids": rows[:3], "labels": labels[:3],
         "rejected_input_ids": rows[3:], "rejected_labels": labels[3:]}), rows, labels


def _one_by_one(model, rows, labels) -> torch.Tensor:
    """Each answer's log p from the model's full logits, one answer per forward."""
    sums = []
    for ids, lab in zip(rows, labels):
        logp = torch.log_softmax(model(input_ids=torch.as_tensor(ids)[None]).logits[0, :-1]
                                 .float(), -1)
        picked = [logp[t - 1, ids[t]] for t in range(1, len(ids)) if lab[t] != IGNORE]
        sums.append(torch.stack(picked).sum())
    return torch.stack(sums)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("chunk_tokens", [1, 7, None])
def test_chunked_answer_logps_equal_the_models_own_logits(kind, chunk_tokens):
    model = _model(kind)
    batch, rows, labels = _batch(seed=len(kind))
    params = [p for p in model.parameters() if p.requires_grad]

    sums, counts = answer_logps(model, batch, contextlib.nullcontext(), chunk_tokens)
    got = torch.autograd.grad(sums.sum(), params)
    want_sums = _one_by_one(model, rows, labels)
    want = torch.autograd.grad(want_sums.sum(), params)

    torch.testing.assert_close(sums, want_sums, rtol=1e-4, atol=1e-3)
    assert counts.tolist() == [int((lab[1:] != IGNORE).sum()) for lab in labels]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)
    # Only Granite's division is unknown here: its output layer is marked for whole logits.
    whole = getattr(model.get_output_embeddings(), answers._WHOLE_LOGITS, False)
    assert whole == (kind == "granite")


def test_the_reference_pass_and_a_flattened_batch_agree_too():
    model = _model("llama")
    batch, rows, labels = _batch(seed=5)
    flat, _, _ = _batch(seed=5, flatten=True)
    with torch.no_grad(), model.disable_adapter():
        ref, _ = answer_logps(model, batch, contextlib.nullcontext(), chunk_tokens=4)
        ref_flat, _ = answer_logps(model, flat, contextlib.nullcontext(), chunk_tokens=4)
        want = _one_by_one(model, rows, labels)
    torch.testing.assert_close(ref, want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(ref_flat, want, rtol=1e-4, atol=1e-3)


def test_the_logits_of_one_chunk_at_a_time_fit_the_budget(monkeypatch):
    """With a budget of 5 tokens' logits, no cross-entropy sees more than 5 tokens."""
    seen = []
    cross_entropy = torch.nn.functional.cross_entropy

    def spy(logits, *args, **kwargs):
        seen.append(logits.shape[0])
        return cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(answers.F, "cross_entropy", spy)
    monkeypatch.setattr(answers, "LOGITS_BUDGET_BYTES", 5 * 10 * SHAPE["vocab_size"])
    model = _model("llama")
    batch, _, labels = _batch(seed=2)
    sums, _ = answer_logps(model, batch, contextlib.nullcontext())
    sums.sum().backward()  # recomputes each chunk
    trained = sum(int((lab[1:] != IGNORE).sum()) for lab in labels)
    assert max(seen) <= 5 and sum(seen) == 2 * trained  # forward + recompute, every token once
