"""Model FLOPs utilisation (MFU), counting useful work only.

Per token: 4 * N_matmul (frozen base: forward 2N + activation gradients 2N, lm_head
included) + 3 * (2 * layers * seq * hidden) (causal attention, forward + backward)
+ 3 * 2 * N_lora (adapter forward and both gradients). Recomputation is not counted.
"""

from __future__ import annotations

import torch

# Dense bf16 peak TFLOP/s by device name (datasheet values, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "B200": 2250.0}


def flops_per_token(model, seq_len: int) -> float:
    base, lora = 0, 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or weight is None:
            continue
        n = module.in_features * module.out_features  # packed 4-bit weights count unpacked
        if "lora_" in name:
            lora += n
        else:
            base += n
    config = model.config
    attention = 2 * config.num_hidden_layers * seq_len * config.hidden_size
    return 4.0 * base + 3.0 * attention + 6.0 * lora


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
