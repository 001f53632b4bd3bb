"""Model FLOPs utilisation (MFU), counting useful work only.

Per token: 4 * N_matmul (frozen base: forward 2N + activation gradients 2N, lm_head
included) + 3 * (2 * layers * seq * hidden) (causal attention, forward + backward)
+ 3 * 2 * N_lora (adapter forward and both gradients). Recomputation is not counted.
"""

from __future__ import annotations

import torch

from ray_app.model.fp8 import FrozenFP8Linear

# Dense bf16 peak TFLOP/s by device name (datasheet values, no sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "B200": 2250.0}


def flops_per_token(model, seq_len: int) -> float:
    base, lora = 0, 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, FrozenFP8Linear):
            base += module.in_features * module.out_features
            continue
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


def peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, where it comes from): the datasheet value of a known GPU,
    else the rate of a bf16 matmul measured here; (None, "") on CPU. The MFU of an FP8 run
    is still taken against the bf16 peak, so it shows the gain over bf16 directly."""
    if device.type != "cuda":
        return None, ""
    name = torch.cuda.get_device_name(device)
    known = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    if known:
        return known, f"datasheet bf16 {known:g} TFLOP/s ({name})"
    measured = measured_matmul_tflops(device)
    return measured, f"measured bf16 matmul {measured:.0f} TFLOP/s ({name})"


def measured_matmul_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """The median rate of n x n x n bf16 matmuls on `device`."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / sorted(times)[reps // 2] / 1e12
