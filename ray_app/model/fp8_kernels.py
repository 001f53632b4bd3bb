"""One fused kernel for the FP8 path: rowwise quantisation of a bf16 matrix to e4m3.

`fp8.quantize_rows` in plain torch runs as separate kernels (abs, amax, scale, clamp,
cast), each a pass over the activation, and inside an opaque custom op Inductor cannot
fuse them: on an H200 that made every FP8 linear of the 8B shape slower than bf16
(bench/results/gpu_fp8.md). This kernel reads each row once into registers (rows up to
`_WHOLE_ROW` columns; longer rows twice, the second read mostly from L2) and writes its
e4m3 values and scale once. Triton is imported here only (the training path imports this
module on GPUs only); its results equal `fp8.quantize_rows`, byte for byte
(tests/test_fp8.py: on the GPU, and on CPU through Triton's interpreter)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows up to this many columns are held in registers whole (up to 32 fp32 values a thread
# at 16 warps): one read of the activation. Longer rows (28,672 features of a 70B MLP)
# loop over `_BLOCK` columns at a time, twice. The row length is a compile-time constant (a
# model has a handful), so the loops are unrolled.
_WHOLE_ROW = 16384
_BLOCK = 4096


@triton.jit
def _round_to_e4m3_grid(v):
    """`v` (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, still in fp32.
    Triton's fp32 -> e4m3 cast rounds twice on the GPU (Triton 3.6 on an H100: 10.500001
    became 10, where one rounding, torch's, gives 11). On this grid the cast has
    nothing left to round. One e4m3 step is 2^(e - 3) for a value of exponent e, and 2^-9
    below the smallest normal (2^-6, biased fp32 exponent 121)."""
    bits = v.to(tl.uint32, bitcast=True)
    exponent = (bits >> 23) & 0xFF
    step_exponent = tl.maximum(exponent, 121) - 3
    inv_step = ((254 - step_exponent) << 23).to(tl.float32, bitcast=True)
    step = (step_exponent << 23).to(tl.float32, bitcast=True)
    steps = tl.abs(v) * inv_step  # <= 16; times a power of two: exact
    # Adding and taking away 1.5 * 2^23 rounds to an integer, ties to even (fp32 keeps no
    # fraction at that size); exact again once multiplied by the power of two `step`.
    magnitude = ((steps + 12582912.0) - 12582912.0) * step
    # The sign bit put back as it was: -0.0001 rounds to -0, as torch's cast gives.
    return (magnitude.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32,
                                                                               bitcast=True)


@triton.jit
def _scale_of(amax, fp8_max: tl.constexpr):
    """fp8_max * (1 / amax), as torch evaluates `fp8_max / amax_tensor` in the reference."""
    return tl.math.div_rn(1.0, tl.maximum(amax, 1e-12)) * fp8_max


@triton.jit
def _to_e4m3(values, scale, fp8_max: tl.constexpr):
    scaled = tl.minimum(tl.maximum(values * scale, -fp8_max), fp8_max)
    return _round_to_e4m3_grid(scaled)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, inv_scale_ptr, x_row_stride, q_row_stride,
                          n_cols: tl.constexpr, fp8_max: tl.constexpr, block: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, block)
    x_row = x_ptr + row * x_row_stride
    q_row = q_ptr + row * q_row_stride
    if n_cols <= block:  # the whole row in registers: one read
        mask = offsets < n_cols
        values = tl.load(x_row + offsets, mask=mask, other=0.0).to(tl.float32)
        scale = _scale_of(tl.max(tl.abs(values), axis=0), fp8_max)
        tl.store(q_row + offsets, _to_e4m3(values, scale, fp8_max).to(q_ptr.dtype.element_ty),
                 mask=mask)
    else:
        amax = tl.zeros([block], dtype=tl.float32)
        for start in range(0, n_cols, block):
            cols = start + offsets
            values = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(values))
        scale = _scale_of(tl.max(amax, axis=0), fp8_max)
        for start in range(0, n_cols, block):
            cols = start + offsets
            mask = cols < n_cols
            values = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + cols, _to_e4m3(values, scale, fp8_max).to(q_ptr.dtype.element_ty),
                     mask=mask)
    tl.store(inv_scale_ptr + row, tl.math.div_rn(1.0, scale))


def quantize_rows_fused(t: torch.Tensor, fp8_dtype: torch.dtype,
                        block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 tensor, fp32 inverse scale [rows, 1]) of a 2-D tensor with unit column stride:
    what `fp8.quantize_rows` returns, in one kernel launch. `block` (a power of two) is the
    columns a program holds at once; by default the whole row up to `_WHOLE_ROW` columns."""
    if fp8_dtype != torch.float8_e4m3fn:
        raise ValueError(f"the kernel rounds to e4m3 only, not {fp8_dtype}")
    rows, cols = t.shape
    q = torch.empty((rows, cols), dtype=fp8_dtype, device=t.device)
    inv_scale = torch.empty((rows, 1), dtype=torch.float32, device=t.device)
    if block is None:
        whole = triton.next_power_of_2(cols)
        block = whole if whole <= _WHOLE_ROW else _BLOCK
    if rows:
        # 16 to 32 values a thread: 4 warps for 2,048 columns, 16 from 16,384.
        warps = max(4, min(16, block // 1024))
        _quantize_rows_kernel[(rows,)](t, q, inv_scale, t.stride(0), q.stride(0), n_cols=cols,
                                       fp8_max=torch.finfo(fp8_dtype).max, block=block,
                                       num_warps=warps)
    return q, inv_scale
