"""Variants of the FP8 base that take one source of FP8 error at a time, for the quality
benchmark (bench/gpu_fp8.py), not a setting: the product runs `fp8.FrozenFP8Linear`.

Named in the worker's environment (`ABLATION_ENV`, read where the base is converted, as
`ray_app.train.faults` reads its injected failures), each replaces the FP8 linear by:
- `exact_accum`: the same FP8 matmuls, the forward without Hopper's fast accumulation;
- `activation_rounding`: bf16 matmuls on the bf16 weight, the forward's input rounded to
  e4m3 with one scale per row as the FP8 path rounds it (the gradient passes straight
  through the rounding);
- `weight_rounding`: bf16 matmuls on the weight rounded to e4m3 with one scale per output
  row, as the FP8 path stores it.
The last two run at bf16 speed: they measure quality, not speed.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ray_app.errors import UserError
from ray_app.model.fp8 import FrozenFP8Linear, quantize_rows

ABLATION_ENV = "RAY_APP_FP8_ABLATION"
ABLATIONS = ("exact_accum", "activation_rounding", "weight_rounding")


def ablation_from_env() -> str | None:
    name = os.environ.get(ABLATION_ENV) or None
    if name is not None and name not in ABLATIONS:
        raise UserError(f"{ABLATION_ENV}={name!r} is not one of {', '.join(ABLATIONS)}: "
                        f"unset it for the FP8 base itself.")
    return name


def _rounded(t: torch.Tensor) -> torch.Tensor:
    """`t` through rowwise e4m3 and back, in its own dtype."""
    q, inv_scale = quantize_rows(t)
    return (q.float() * inv_scale).to(t.dtype)


class _RoundedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, device: torch.device, round_input: bool):
        super().__init__()
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.round_input = round_input
        weight = linear.weight.detach().to(device)
        self.register_buffer("weight", weight if round_input else _rounded(weight),
                             persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.round_input:
            # The rounded values, and x's gradient unchanged: x - x.detach() is exactly 0.
            x = _rounded(x.detach().reshape(-1, x.shape[-1])).reshape(x.shape) + (x - x.detach())
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        what = "input" if self.round_input else "weight"
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bf16 with its {what} rounded to e4m3 rowwise"


def ablated_linear(linear: nn.Linear, device: torch.device, ablation: str) -> nn.Module:
    if ablation == "exact_accum":
        return FrozenFP8Linear(linear, device, fast_accum=False)
    return _RoundedLinear(linear, device, round_input=ablation == "activation_rounding")
