"""Every strategy x {LoRA, QLoRA} trains inside Ray Train workers, survives a worker-group
failure by resuming from its own checkpoint, and ends with a plain PEFT adapter. For FSDP
and DeepSpeed the resume is exact: the same samples in the same steps as an uninterrupted
run, the same optimizer state at the last step, and the same eval loss within 2%."""

from __future__ import annotations

import pytest
from rich.console import Console
from safetensors.torch import load_file
from support import newest_checkpoint, optimizer_tensors, tiny_config

from ray_app.config import validate_config
from ray_app.train.faults import FAIL_AT_STEP_ENV
from ray_app.train.run import run_training
from ray_app.train.trace import committed_steps

pytestmark = pytest.mark.ray

CASES = [("fsdp", "none"), ("deepspeed", "none"), ("ddp", "nf4"), ("fsdp", "nf4"), ("deepspeed", "nf4")]
EXACT = {("fsdp", "none"), ("deepspeed", "none")}  # DDP: tests/test_recovery.py


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("strategies")  # shared: the tokenized data is reused


def _run(small_data, storage, strategy, quantization, name):
    cfg = tiny_config(small_data, storage, scaling={"strategy": strategy},
                      model={"quantization": quantization},
                      run={"name": name, "max_failures": 1, "output_dir": str(storage / name),
                           "record_samples": True})
    summary = run_training(validate_config(cfg), Console(width=120))
    assert summary["status"] == "succeeded", summary.get("error")
    run = storage / "storage" / name
    return summary, committed_steps(run / "sample_trace"), optimizer_tensors(newest_checkpoint(run))


@pytest.mark.parametrize("strategy,quantization", CASES)
def test_strategy_resumes_from_its_checkpoint_and_exports_a_peft_adapter(
        ray_cluster, small_data, storage, strategy, quantization, monkeypatch):
    name = f"{strategy}-{quantization}"
    if (strategy, quantization) in EXACT:
        straight = _run(small_data, storage, strategy, quantization, f"{name}-straight")
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "3")  # after the checkpoint at step 2
    summary, steps, optimizer = _run(small_data, storage, strategy, quantization, name)
    assert summary["train"]["restarts"] == 1 and summary["train"]["resumed_from_step"] == 2
    assert summary["train"]["steps"] == 4
    assert summary["eval"]["loss_final"] < summary["eval"]["loss_initial"]
    tensors = load_file(storage / name / "final" / "adapter_model.safetensors")
    assert tensors and all("lora_" in k and ".default." not in k for k in tensors)
    assert all("_checkpoint_wrapped" not in k and "_fsdp" not in k for k in tensors)
    if (strategy, quantization) not in EXACT:
        return
    expected_summary, expected_steps, expected_optimizer = straight
    assert steps == expected_steps and sorted(steps) == [1, 2, 3, 4]
    assert optimizer.keys() == expected_optimizer.keys() and optimizer
    for key, tensor in optimizer.items():
        assert tensor.allclose(expected_optimizer[key], rtol=1e-5, atol=1e-8), key
    assert summary["eval"]["loss_final"] == pytest.approx(expected_summary["eval"]["loss_final"],
                                                          rel=0.02)
