"""Every strategy x {LoRA, QLoRA} trains inside Ray Train workers, survives a worker-group
failure by resuming from its own checkpoint, and ends with a plain PEFT adapter."""

from __future__ import annotations

import pytest
from rich.console import Console
from safetensors.torch import load_file
from support import tiny_config

from ray_app.config import validate_config
from ray_app.train.faults import FAIL_AT_STEP_ENV
from ray_app.train.run import run_training

pytestmark = pytest.mark.ray

CASES = [("fsdp", "none"), ("deepspeed", "none"), ("ddp", "nf4"), ("fsdp", "nf4"), ("deepspeed", "nf4")]


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    return tmp_path_factory.mktemp("strategies")  # shared: the tokenized data is reused


@pytest.mark.parametrize("strategy,quantization", CASES)
def test_strategy_resumes_from_its_checkpoint_and_exports_a_peft_adapter(
        ray_cluster, small_data, storage, strategy, quantization, monkeypatch):
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "3")  # after the checkpoint at step 2
    name = f"{strategy}-{quantization}"
    cfg = tiny_config(small_data, storage, scaling={"strategy": strategy},
                      model={"quantization": quantization},
                      run={"name": name, "max_failures": 1, "output_dir": str(storage / name)})
    summary = run_training(validate_config(cfg), Console(width=120))
    assert summary["status"] == "succeeded", summary.get("error")
    assert summary["train"]["restarts"] == 1 and summary["train"]["resumed_from_step"] == 2
    assert summary["train"]["steps"] == 4
    assert summary["eval"]["loss_final"] < summary["eval"]["loss_initial"]
    tensors = load_file(storage / name / "final" / "adapter_model.safetensors")
    assert tensors and all("lora_" in k and ".default." not in k for k in tensors)
    assert all("_checkpoint_wrapped" not in k and "_fsdp" not in k for k in tensors)
