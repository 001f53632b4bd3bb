"""One fused kernel for the FP8 path: rowwise quantisation of a bf16 matrix to e4m3.

`fp8.quantize_rows` in plain torch runs as separate kernels (abs, amax, scale, clamp,
cast), each a pass over the activation, and inside an opaque custom op Inductor cannot
fuse them: on an H200 that made every FP8 linear of the 8B shape slower than bf16
(bench/results/gpu_fp8.md). This kernel reads each row twice (the second read mostly from
L2) and writes its e4m3 values and scale once. Triton is imported here only, on the GPU;
its results equal `fp8.quantize_rows` (tests/test_fp8.py, on the GPU)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Columns per loop iteration: rows of the shapes served (1,024-28,672 features) take 1-14
# iterations; a whole-row block would spill registers at 14,336 features. The row length
# is a compile-time constant (a model has a handful), so the loops are unrolled.
_BLOCK = 2048


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, inv_scale_ptr, x_row_stride, q_row_stride,
                          n_cols: tl.constexpr, fp8_max: tl.constexpr, block: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, block)
    x_row = x_ptr + row * x_row_stride
    amax = tl.zeros([block], dtype=tl.float32)
    for start in range(0, n_cols, block):
        cols = start + offsets
        values = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(values))
    # The same arithmetic as fp8.quantize_rows: scale = max / amax, values * scale clamped.
    # div_rn: IEEE division like torch's (Triton's `/` on fp32 is approximate).
    scale = tl.math.div_rn(fp8_max, tl.maximum(tl.max(amax, axis=0), 1e-12))
    q_row = q_ptr + row * q_row_stride
    for start in range(0, n_cols, block):
        cols = start + offsets
        mask = cols < n_cols
        values = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        scaled = tl.minimum(tl.maximum(values * scale, -fp8_max), fp8_max)
        tl.store(q_row + cols, scaled.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(inv_scale_ptr + row, tl.math.div_rn(1.0, scale))


def quantize_rows_fused(t: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """(fp8 tensor, fp32 inverse scale [rows, 1]) of a 2-D tensor with unit column stride:
    what `fp8.quantize_rows` returns, in one kernel launch."""
    rows, cols = t.shape
    q = torch.empty((rows, cols), dtype=fp8_dtype, device=t.device)
    inv_scale = torch.empty((rows, 1), dtype=torch.float32, device=t.device)
    if rows:
        _quantize_rows_kernel[(rows,)](t, q, inv_scale, t.stride(0), q.stride(0), n_cols=cols,
                                       fp8_max=torch.finfo(fp8_dtype).max,
                                       block=min(_BLOCK, triton.next_power_of_2(cols)))
    return q, inv_scale
