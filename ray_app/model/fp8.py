"""FP8 matmuls for the frozen base of a LoRA model (`model.precision: fp8`).

A LoRA base never changes, so its weights are quantised to FP8 once, at set-up, and each
frozen linear needs two matmuls per step: the forward (x @ W^T) and the input gradient
(dy @ W); the weight gradient is never computed. Both run on the GPU's FP8 tensor cores
through `torch._scaled_mm`, with one scale per row (torchao's float8 "rowwise" recipe,
e4m3 throughout):

- the weight, once: e4m3 with one scale per output row for the forward, and a transposed
  copy with one scale per input column for the backward (`_scaled_mm` takes its second
  operand column-major, and re-laying out the weight every step would cost what FP8 saves).
  The two copies hold what the bf16 weight held, which is freed;
- the activations and output gradients, every step: e4m3 with one scale per token, by one
  fused kernel (`fp8_kernels`) inside the op that runs the matmul (`fp8_linear`), which a
  compiled layer (`model.compile`) calls as one opaque op.

LoRA A/B, norms, attention, embeddings and lm_head stay in bf16. The FP8 weights are
non-persistent buffers, not parameters: FSDP2 would cast parameters to its bf16 gather
dtype, and checkpoints, optimizers and gradient reduction have nothing to do with them.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_app.errors import UserError
from ray_app.extras import require
from ray_app.model.loading import decoder_layers

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
# FP8 tensor cores from compute capability 8.9 (Ada); Hopper 9.0, Blackwell 10.x/12.x.
FP8_CAPABILITY = (8, 9)
# Linears with a side below this stay bf16: quantising their input costs more than the
# faster matmul saves (H200, 16,384 tokens: k/v_proj of the 8B shape, 4096 -> 1024, took
# 0.78x the bf16 time; 4096 -> 4096 1.35-1.5x less, 4096 <-> 14336 1.8x less;
# bench/results/gpu_fp8.md).
FP8_MIN_FEATURES = 2048


def check_fp8_device(device: torch.device) -> None:
    """Raises a UserError unless `device` is a GPU with FP8 tensor cores."""
    if device.type != "cuda":
        raise UserError(f"model.precision: fp8 needs a CUDA GPU with FP8 tensor cores; this "
                        f"worker's device is {device.type}: set model.precision: default.")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise UserError(
            f"model.precision: fp8 needs FP8 tensor cores (compute capability 8.9 or newer: "
            f"Ada, Hopper, Blackwell); {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}: set model.precision: default.")


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, fp32 inverse scale of shape [rows, 1]) of a 2-D tensor, one scale per
    row, so that t ~= q * scale."""
    amax = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = E4M3_MAX / amax
    q = (t.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale.reciprocal()


def quantize_activations(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` of a step's activations or output gradients: on the GPU one fused
    Triton kernel (`fp8_kernels`, imported there only: CPU installs need no Triton), in
    plain torch elsewhere."""
    if t.is_cuda:
        from ray_app.model.fp8_kernels import quantize_rows_fused

        return quantize_rows_fused(t, E4M3)
    return quantize_rows(t)


@torch.library.custom_op("ray_app::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_t: torch.Tensor,
               w_t_scale: torch.Tensor, fast_accum: bool = True) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T in FP8 into bf16 [M, N]: x quantised here, one scale per row;
    w is e4m3 with one scale per output row (`w_scale`, [1, N]). `w_t`/`w_t_scale` (the
    weight's transposed copy) serve the backward, dy @ w, which is this op again, with
    `fast_accum` off: Hopper's faster FP8 accumulation for the forward only, as in
    torchao's float8 recipes, where its rounding does not reach the gradients.

    One opaque op for torch.compile, quantisation included: with the quantisation left to
    Inductor around an opaque `_scaled_mm`, a compiled decoder layer gave wrong input
    gradients on an H200 (torch 2.11; the adapter's gradients had cosine 0.02 with bf16's)
    while the same code in eager mode gave the right ones."""
    q, scale = quantize_activations(x)
    return torch._scaled_mm(q, w.t(), scale_a=scale, scale_b=w_scale.contiguous(),
                            out_dtype=torch.bfloat16, use_fast_accum=fast_accum and q.is_cuda)


@fp8_linear.register_fake
def _(x, w, w_scale, w_t, w_t_scale, fast_accum=True):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.bfloat16)


def _fp8_linear_setup(ctx, inputs, output):
    _, _, _, w_t, w_t_scale, _ = inputs
    ctx.save_for_backward(w_t, w_t_scale)


def _fp8_linear_backward(ctx, grad):
    """dy @ W, in FP8 through the transposed copy; the frozen weight gets no gradient."""
    w_t, w_t_scale = ctx.saved_tensors
    grad_x = fp8_linear(grad.contiguous(), w_t, w_t_scale, w_t, w_t_scale, False)
    return grad_x, None, None, None, None, None


fp8_linear.register_autograd(_fp8_linear_backward, setup_context=_fp8_linear_setup)


class FrozenFP8Linear(nn.Module):
    """A frozen `nn.Linear` whose forward and input-gradient matmuls run in FP8."""

    def __init__(self, linear: nn.Linear, device: torch.device, fast_accum: bool = True):
        super().__init__()
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.fast_accum = fast_accum  # the forward's; the input gradient accumulates exactly
        weight = linear.weight.detach().to(device)
        q, scale = quantize_rows(weight)
        q_t, scale_t = quantize_rows(weight.t())
        self.register_buffer("weight_fp8", q, persistent=False)
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous(), persistent=False)
        self.register_buffer("weight_t_fp8", q_t.contiguous(), persistent=False)
        self.register_buffer("weight_t_scale", scale_t.reshape(1, -1).contiguous(),
                             persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to(device)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x.reshape(-1, x.shape[-1]).contiguous(), self.weight_fp8,
                       self.weight_scale, self.weight_t_fp8, self.weight_t_scale,
                       self.fast_accum)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 rowwise"


def fits_fp8(linear: nn.Linear, min_features: int = FP8_MIN_FEATURES) -> bool:
    """`_scaled_mm` needs both sides of the weight to be multiples of 16; below
    `min_features` FP8 does not pay."""
    return sides_fit_fp8(linear.in_features, linear.out_features, min_features)


def sides_fit_fp8(in_features: int, out_features: int,
                  min_features: int = FP8_MIN_FEATURES) -> bool:
    """`fits_fp8` of a linear known by its sides (the memory estimate's)."""
    return all(n % 16 == 0 and n >= min_features for n in (in_features, out_features))


def to_fp8_base(model: nn.Module, device: torch.device,
                min_features: int = FP8_MIN_FEATURES) -> int:
    """Replaces every frozen `nn.Linear` inside the decoder layers of `model` (a PEFT model:
    LoRA wrappers keep their `base_layer` slot, which gets the FP8 module) by a
    `FrozenFP8Linear` on `device`; returns how many. Call after the adapter is added, so
    that PEFT finds plain linears to wrap. Linears that `fits_fp8` turns down stay bf16.
    The quality benchmark's ablations (`fp8_ablations`, named in the environment) replace
    them by variants instead."""
    from ray_app.model.fp8_ablations import ablated_linear, ablation_from_env

    if device.type == "cuda":  # at set-up, not at the first step: the GPU's kernel needs it
        require("triton", "model.precision: fp8", "set model.precision: default")
    ablation = ablation_from_env()
    swapped = 0
    for layer in decoder_layers(model):
        for name, module in list(layer.named_modules()):
            if (not isinstance(module, nn.Linear) or module.weight.requires_grad
                    or "lora_" in name or not fits_fp8(module, min_features)):
                continue
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, attr, ablated_linear(module, device, ablation) if ablation
                    else FrozenFP8Linear(module, device))
            swapped += 1
    return swapped
