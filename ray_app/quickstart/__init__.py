"""The built-in quickstart: bundled sample data, tokenizer and a tiny Llama config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DATA_DIR = HERE / "data"
TOKENIZER_DIR = HERE / "tokenizer"

# A Llama-architecture model small enough to train on two CPU cores in minutes. The
# larger initializer range gives the frozen random base a usable logit scale, so that a
# LoRA adapter alone can fit the task.
TINY_LLAMA = {
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.1,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
}


def quickstart_config_dict() -> dict[str, Any]:
    """The config `ray-app train` runs when given none (also jobs/configs/quickstart.yaml)."""
    return {
        "model": {"name_or_path": "builtin:tiny-llama"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": [str(DATA_DIR)], "eval_fraction": 0.05, "max_seq_len": 128},
        "train": {
            "max_steps": 80, "lr": 3e-3, "warmup_ratio": 0.05, "batch_size_per_worker": 16,
            "log_every": 5, "eval_every": 40, "checkpoint_every": 40, "seed": 0,
        },
        "scaling": {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 0.5}},
        "run": {"name": "quickstart", "storage_path": "outputs/checkpoints"},
    }
