"""GPU-only paths: Liger's fused loss (training and evaluation), per-layer torch.compile,
FlashAttention on packed rows, 4-bit QLoRA in a Ray Train GPU worker, FSDP2 over NCCL.

Skipped without a CUDA GPU (so in CI); the last run on a GPU machine is in
bench/results/gpu_tests.txt, with the command that produced it."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ray_app.config import LoraSection, ModelSection

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    """A random-init Llama of a real vocabulary size (the logits are what Liger saves)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=32000,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("gpu_model"))
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def _batch(rows: int = 4, length: int = 1024) -> torch.Tensor:
    return torch.randint(3, 32000, (rows, length), device=CUDA,
                         generator=torch.Generator(CUDA).manual_seed(0))


def _loss_and_peak(model, ids: torch.Tensor, **kwargs) -> tuple[float, float, object]:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids, **kwargs)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    return float(out.loss), peak, out


def test_liger_fused_loss_matches_the_plain_loss_without_the_logits(model_folder):
    from ray_app.model.loading import apply_speedups, load_base

    ids = _batch()
    plain_cfg = ModelSection(name_or_path=model_folder, dtype="bfloat16", liger="off")
    plain = apply_speedups(load_base(plain_cfg, True).to(CUDA), plain_cfg, "none", True).train()
    plain_loss, plain_peak, _ = _loss_and_peak(plain, ids)
    assert not getattr(plain, "fused_linear_loss", False)
    del plain
    # Liger patches some functions module-wide: the plain model is measured first.
    fused_cfg = ModelSection(name_or_path=model_folder, dtype="bfloat16", liger="on")
    fused = apply_speedups(load_base(fused_cfg, True).to(CUDA), fused_cfg, "none", True).train()
    assert fused.fused_linear_loss  # what evaluation reads to skip the logits as well
    fused_loss, fused_peak, _ = _loss_and_peak(fused, ids)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-2)
    logits_gib = ids.numel() * 32000 * (2 + 4) / 2**30  # bf16 logits + their fp32 upcast
    assert fused_peak < plain_peak - logits_gib / 2, (fused_peak, plain_peak)
    # Evaluation runs in eval mode, where Liger computes the logits unless told not to.
    fused.eval()
    eval_loss, eval_peak, out = _loss_and_peak(fused, ids, skip_logits=True)
    assert out.logits is None and eval_loss == pytest.approx(plain_loss, rel=1e-2)
    assert eval_peak < plain_peak - logits_gib / 2


def test_per_layer_compile_trains_like_eager(model_folder):
    from ray_app.model.loading import add_lora, apply_speedups, load_base

    ids = _batch(2, 512)
    results = []
    for compiled in (False, True):
        cfg = ModelSection(name_or_path=model_folder, dtype="bfloat16", liger="off",
                           compile=compiled)
        base = apply_speedups(load_base(cfg, True).to(CUDA), cfg, "none", True)
        torch.manual_seed(0)  # the same LoRA init for both
        model = add_lora(base, LoraSection(r=8, alpha=16, dropout=0.0)).train()
        for _ in range(2):  # the second pass runs the compiled graphs, not the first trace
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters()
                           if p.requires_grad])
        results.append((float(loss), grads))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-2)
    cosine = torch.nn.functional.cosine_similarity(eager_grads, compiled_grads, dim=0)
    assert cosine > 0.99


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                    reason="flash-attn is not installed")
def test_flash_attention_on_a_flattened_packed_batch_matches_sdpa_per_document(model_folder):
    import numpy as np

    from ray_app.data.collate import REAL_TOKENS, PackedCollate
    from ray_app.model.loading import load_base

    docs = [np.arange(3, 300), np.arange(500, 620), np.arange(900, 1400)]
    batch = {"input_ids": docs, "labels": docs}
    logits = {}
    for attn, flatten in (("sdpa", False), ("flash_attention_2", True)):
        cfg = ModelSection(name_or_path=model_folder, dtype="bfloat16", liger="off",
                           attn_implementation=attn)
        model = load_base(cfg, True).to(CUDA)
        inputs = PackedCollate(0, flatten=flatten)(batch)
        inputs.pop(REAL_TOKENS)
        inputs.pop("labels")
        with torch.no_grad():
            out = model(**{k: v.to(CUDA) for k, v in inputs.items()}, use_cache=False).logits
        rows = ([out[0, s:s + len(d)] for s, d in zip(np.cumsum([0] + [len(d) for d in docs]),
                                                        docs)] if flatten
                else [out[i, :len(d)] for i, d in enumerate(docs)])
        logits[attn] = rows
    for sdpa_doc, flash_doc in zip(logits["sdpa"], logits["flash_attention_2"]):
        torch.testing.assert_close(flash_doc.float(), sdpa_doc.float(), atol=2e-2, rtol=2e-2)


def _gpu_run(small_data, tmp_path, **sections):
    from rich.console import Console
    from support import tiny_config

    from ray_app.config import validate_config
    from ray_app.train.run import run_training

    cfg = tiny_config(small_data, tmp_path, **sections)
    cfg["train"] = {**cfg["train"], "eval_every": 2}
    return run_training(validate_config(cfg), Console(width=120))


@pytest.mark.ray
def test_qlora_trains_in_a_ray_train_gpu_worker(ray_cluster, small_data, tmp_path):
    from peft import AutoPeftModelForCausalLM

    summary = _gpu_run(small_data, tmp_path, model={"quantization": "nf4"},
                       scaling={"num_workers": 1, "use_gpu": True,
                                "resources_per_worker": {"CPU": 1, "GPU": 1}},
                       run={"name": "qlora-gpu"})
    assert summary["status"] == "succeeded", summary.get("error")
    assert summary["eval"]["loss_final"] < summary["eval"]["loss_initial"]
    assert 0 < summary["train"]["peak_gpu_gib"] < 2  # reported from the worker's GPU
    AutoPeftModelForCausalLM.from_pretrained(summary["adapter_path"])  # a plain PEFT adapter


@pytest.mark.ray
@two_gpus
def test_fsdp2_over_nccl_on_two_gpus(ray_cluster, small_data, tmp_path):
    summary = _gpu_run(small_data, tmp_path, scaling={
        "num_workers": 2, "use_gpu": True, "strategy": "fsdp",
        "resources_per_worker": {"CPU": 0.5, "GPU": 1}}, run={"name": "fsdp-nccl"})
    assert summary["status"] == "succeeded", summary.get("error")
    assert summary["eval"]["loss_final"] < summary["eval"]["loss_initial"]
