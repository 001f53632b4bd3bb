"""model.precision: fp8, the FP8 frozen base.

On CPU (CI): the setting is refused before Ray starts without GPUs, with nf4, with another
dtype and with DeepSpeed, and on a device without FP8 tensor cores; the module's
arithmetic (torch._scaled_mm has a CPU kernel) is checked against a float64 reference
computed here, the swap leaves LoRA, lm_head and the trainable parts alone, the fused
quantisation kernel, run by Triton's interpreter, rounds as torch does, and two gloo ranks
under the product's FSDP2 wrapping give the adapter gradients of one process.
On a GPU with FP8 tensor cores (skipped elsewhere; runs in
bench/results/gpu_tests_fp8_*.txt): a LoRA model's loss and adapter gradients against bf16,
eager and compiled, and the fused quantisation kernel against the plain torch one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from support import tiny_config

from ray_app.config import LoraSection, validate_config
from ray_app.errors import UserError
from ray_app.model.fp8 import (
    FrozenFP8Linear,
    check_fp8_device,
    fits_fp8,
    quantize_rows,
    to_fp8_base,
)
from ray_app.model.loading import add_lora

pytestmark = pytest.mark.timeout(120)
fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with FP8 tensor cores")


def _config(tmp_path, **model):
    return tiny_config(tmp_path / "data.jsonl", tmp_path, model={"precision": "fp8", **model},
                       scaling={"use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 1}})


@pytest.mark.parametrize(("change", "names"), [
    ({"scaling": {"use_gpu": False, "resources_per_worker": {"CPU": 1}}},
     ("scaling.use_gpu", "model.precision: default")),
    ({"model": {"quantization": "nf4"}}, ("model.quantization: nf4", "use one")),
    ({"model": {"dtype": "float32"}}, ("model.dtype float32", "model.dtype: auto")),
    ({"scaling": {"strategy": "deepspeed"}}, ("scaling.strategy", "fsdp")),
])
def test_fp8_is_refused_where_it_cannot_run_naming_the_setting_to_change(tmp_path, change,
                                                                         names):
    cfg = _config(tmp_path)
    for section, values in change.items():
        cfg[section] = {**cfg[section], **values}
    with pytest.raises(UserError) as err:
        validate_config(cfg)
    assert all(name in str(err.value) for name in names), str(err.value)


def test_fp8_on_a_gpu_config_validates(tmp_path):
    assert validate_config(_config(tmp_path)).model.precision == "fp8"
    assert validate_config(_config(tmp_path, dtype="bfloat16")).model.precision == "fp8"
    assert validate_config(_config(tmp_path, compile=True)).model.compile


def test_a_worker_without_fp8_tensor_cores_refuses_with_the_fix(monkeypatch):
    with pytest.raises(UserError, match="model.precision: default"):
        check_fp8_device(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(UserError, match=r"A100 has 8\.0: set model.precision: default"):
        check_fp8_device(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(torch.device("cuda", 0))  # Hopper: no error


def test_rowwise_quantisation_keeps_each_row_within_e4m3_rounding():
    torch.manual_seed(0)
    t = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different size
    q, scale = quantize_rows(t)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: relative rounding error at most 2^-4 (values near the
    # row's maximum, which is scaled to 448, are the normal range of the format)
    big = t.abs() > t.abs().amax(dim=1, keepdim=True) / 64
    assert ((back - t).abs()[big] <= t.abs()[big] * 2**-4 + 1e-12).all()
    assert (q.float().abs().amax(dim=1) == 448).all()  # each row uses the full range


def test_frozen_fp8_linear_matches_a_float64_reference_forward_and_backward():
    # On the GPU where there is one: torch's CPU kernel takes rowwise scales from 2.13 on.
    fp8_capable = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
    device = torch.device("cuda" if fp8_capable else "cpu")
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True).to(device, torch.bfloat16).requires_grad_(False)
    fp8 = FrozenFP8Linear(linear, device)
    x = torch.randn(4, 8, 128, dtype=torch.bfloat16, device=device, requires_grad=True)
    y = fp8(x)
    assert y.shape == (4, 8, 96) and y.dtype == torch.bfloat16
    grad = torch.randn_like(y)
    y.backward(grad)
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn
    w, b = linear.weight.double(), linear.bias.double()
    reference = x.detach().double() @ w.T + b
    reference_grad = grad.double() @ w
    # Two e4m3 operands: a few percent of the output's scale, far less than a wrong matmul.
    assert (y.double() - reference).norm() / reference.norm() < 0.05
    assert (x.grad.double() - reference_grad).norm() / reference_grad.norm() < 0.05
    assert not any(p.requires_grad for p in fp8.parameters())


@fp8_gpu
@pytest.mark.parametrize("cols", [1024, 4096, 5000, 14336, 28672])
def test_the_fused_quantisation_kernel_gives_what_the_torch_reference_gives(cols):
    """Every e4m3 byte and scale of the GPU's fused kernel equals plain torch's, on rows of
    very different size, an all-zero row, and a view with a row stride of its own; rows
    held whole (up to 16,384 columns) and rows read in blocks (28,672)."""
    from ray_app.model.fp8_kernels import quantize_rows_fused

    torch.manual_seed(0)
    sizes = torch.logspace(-4, 4, 96, device="cuda")[:, None]
    t = (torch.randn(96, cols + 64, device="cuda") * sizes).bfloat16()
    t[3] = 0
    for x in (t[:, :cols], t[:, :cols].contiguous()):
        expected, expected_scale = quantize_rows(x)
        got, got_scale = quantize_rows_fused(x, torch.float8_e4m3fn)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
        assert torch.equal(got_scale, expected_scale)


# Run with TRITON_INTERPRET=1 in a process of its own: Triton reads it when the kernel is
# defined. The interpreter's own e4m3 cast is wrong on ties and on carries into the exponent
# (numpy emulation), so bytes equal to torch's here mean the kernel's own rounding did it.
_INTERPRETED_KERNEL = """
import json, torch
from ray_app.model.fp8 import quantize_rows
from ray_app.model.fp8_kernels import quantize_rows_fused

e4m3 = torch.float8_e4m3fn
# Every e4m3 tie (halfway between neighbours), the fp32 values either side of it, and a
# sweep: rows whose amax is 448, so the scale is 1 and the kernel rounds these values as
# they are.
ties = torch.tensor([(m + 0.5) * 2.0 ** e for e in range(-9, 6) for m in range(8, 16)])
ties = torch.cat([ties, torch.nextafter(ties, torch.tensor(1e9)),
                  torch.nextafter(ties, torch.tensor(-1e9)), torch.linspace(-448, 448, 40001)])
values = torch.cat([ties, -ties])
values = values[values.abs() <= 448]
values = torch.cat([values, torch.zeros((-len(values)) % 255)]).view(-1, 255)
rows = torch.cat([values, torch.full((len(values), 1), 448.0)], dim=1)
q, inv_scale = quantize_rows_fused(rows, e4m3)
grid = {"values": rows.numel(), "scales_one": bool((inv_scale == 1).all()),
        "bytes_differ": int((q.view(torch.uint8) != rows.to(e4m3).view(torch.uint8)).sum())}
torch.manual_seed(0)
t = (torch.randn(48, 1064) * torch.logspace(-4, 4, 48)[:, None]).bfloat16()
t[3] = 0
t[5, :4] = torch.tensor([-1e-30, -0.0, 0.0, 1e-30])
random = []
# The whole row in one block, and blocks of 256 columns (the path of rows too long for one).
for x, block in ((t[:, :1000], None), (t[:, :1000].contiguous(), None), (t[:, :1000], 256)):
    expected, expected_scale = quantize_rows(x)
    got, got_scale = quantize_rows_fused(x, e4m3, block=block)
    random.append({"bytes_differ": int((got.view(torch.uint8) != expected.view(torch.uint8)).sum()),
                   "scales_equal": bool(torch.equal(got_scale, expected_scale))})
print(json.dumps({"grid": grid, "random": random}))
"""


def test_the_quantisation_kernel_rounds_every_value_as_torch_does_in_tritons_interpreter():
    """On CPU, through Triton's interpreter: the fused kernel's e4m3 bytes and scales equal
    torch's for every tie of the e4m3 grid and the fp32 values beside it, for a sweep of
    448 range, signed zeros and tiny values, and for bf16 rows of very different size (an
    all-zero row, a strided view), rows held whole and rows read in blocks. The GPU test
    above does the same on the hardware."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED_KERNEL], check=False, env=env,
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["grid"]["values"] > 40_000 and result["grid"]["scales_one"], result
    assert result["grid"]["bytes_differ"] == 0, result
    assert result["random"] == [{"bytes_differ": 0, "scales_equal": True}] * 3, result


def _tiny_lora(targets):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    base = LlamaForCausalLM(config).to(torch.bfloat16).requires_grad_(False)
    model = add_lora(base, LoraSection(r=4, alpha=8, dropout=0.0, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so the adapter changes the output
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_the_swap_replaces_only_frozen_decoder_linears_and_keeps_the_adapter():
    model = _tiny_lora(["q_proj", "v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # q,k,v,o, gate, up, down (these are tiny; real layers below 2048 features stay bf16)
    assert to_fp8_base(model, torch.device("cpu"), min_features=16) == 2 * 7
    layer = model.base_model.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, FrozenFP8Linear)  # under LoRA
    assert isinstance(layer.mlp.down_proj, FrozenFP8Linear)  # no adapter
    assert isinstance(layer.self_attn.q_proj.lora_A["default"], torch.nn.Linear)
    assert type(model.base_model.model.lm_head) is torch.nn.Linear
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    # The FP8 copies are not state: checkpoints and merges see no base tensors of theirs.
    assert not any("weight_fp8" in k for k in model.state_dict())


def test_flops_count_the_fp8_linears_as_the_bf16_ones():
    from ray_app.train.flops import flops_per_token

    bf16 = flops_per_token(_tiny_lora("all-linear"), 32)
    model = _tiny_lora("all-linear")
    assert to_fp8_base(model, torch.device("cpu"), min_features=16) == 2 * 7
    assert flops_per_token(model, 32) == bf16


def _loss_and_grads(model, ids):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.item(), grads


@fp8_gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_lora_loss_and_adapter_gradients_follow_bf16_on_the_gpu(compiled):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ray_app.model.loading import decoder_layers

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    base = LlamaForCausalLM(config).to(cuda, torch.bfloat16).requires_grad_(False)
    model = add_lora(base, LoraSection(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    if compiled:
        for layer in decoder_layers(model):
            layer.compile()
    ids = torch.randint(0, 32000, (4, 512), device=cuda,
                        generator=torch.Generator(cuda).manual_seed(0))
    loss16, grads16 = _loss_and_grads(model, ids)
    assert to_fp8_base(model, cuda, min_features=16) == 4 * 7
    loss8, grads8 = _loss_and_grads(model, ids)
    assert loss8 == pytest.approx(loss16, rel=0.01)
    for name, g in grads16.items():
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), grads8[name].flatten(), dim=0)
        assert cosine > 0.95, (name, cosine.item())


def test_layers_too_small_for_fp8_to_pay_stay_bf16():
    with torch.device("meta"):
        kv, q, mlp = (torch.nn.Linear(4096, 1024), torch.nn.Linear(4096, 4096),
                      torch.nn.Linear(14336, 4096))
    assert not fits_fp8(kv) and fits_fp8(q) and fits_fp8(mlp)


def _e4m3_rowwise(t: torch.Tensor) -> torch.Tensor:
    """Round-trip through e4m3 with one scale per row, written out here from the format's
    definition (largest finite 448) rather than through the module's own helper."""
    amax = t.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    scaled = (t.float() * (448.0 / amax)).clamp(-448, 448)
    return (scaled.to(torch.float8_e4m3fn).float() * (amax / 448.0)).to(t.dtype)


@pytest.mark.parametrize("ablation", ["exact_accum", "activation_rounding", "weight_rounding"])
def test_each_quality_ablation_takes_one_error_source(monkeypatch, ablation):
    """The quality benchmark's variants (RAY_APP_FP8_ABLATION): `exact_accum` keeps the FP8
    linear with the forward's fast accumulation off; the other two compute in the input's
    dtype with only the input, or only the weight, rounded to e4m3 rowwise, and pass the
    gradient straight through the rounding."""
    from ray_app.model.fp8_ablations import ABLATION_ENV

    monkeypatch.setenv(ABLATION_ENV, ablation)
    model = _tiny_lora(["q_proj", "v_proj"])
    weight = model.base_model.model.model.layers[0].mlp.down_proj.weight.detach().clone()
    assert to_fp8_base(model, torch.device("cpu"), min_features=16) == 2 * 7
    down = model.base_model.model.model.layers[0].mlp.down_proj
    if ablation == "exact_accum":
        assert isinstance(down, FrozenFP8Linear) and down.fast_accum is False
        return
    assert not isinstance(down, FrozenFP8Linear) and not list(down.parameters())
    torch.manual_seed(1)
    x = (torch.randn(3, 5, weight.shape[1]) * torch.logspace(-2, 2, 5)[:, None]).bfloat16()
    x.requires_grad_(True)
    y = down(x)
    if ablation == "activation_rounding":
        expected = torch.nn.functional.linear(_e4m3_rowwise(x.detach()), weight)
    else:
        expected = torch.nn.functional.linear(x.detach(), _e4m3_rowwise(weight))
    assert torch.equal(y.detach(), expected)
    assert not torch.equal(expected, torch.nn.functional.linear(x.detach(), weight))
    grad = torch.randn_like(y)
    y.backward(grad)
    w = weight if ablation == "activation_rounding" else _e4m3_rowwise(weight)
    assert torch.allclose(x.grad.float(), (grad @ w).float(), rtol=1e-2, atol=1e-2)


def test_an_unknown_ablation_is_refused_naming_the_variable(monkeypatch):
    from ray_app.model.fp8_ablations import ABLATION_ENV

    monkeypatch.setenv(ABLATION_ENV, "fast")
    with pytest.raises(UserError, match="RAY_APP_FP8_ABLATION='fast' is not one of exact_accum"):
        to_fp8_base(_tiny_lora(["q_proj"]), torch.device("cpu"), min_features=16)


_FSDP2_RANK = r"""
import json, sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, sys.argv[1])
from test_fp8 import _tiny_lora

from ray_app.model.fp8 import FrozenFP8Linear, to_fp8_base
from ray_app.train.engines import FSDPEngine

dist.init_process_group("gloo")
rank, cpu = dist.get_rank(), torch.device("cpu")
ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(5))


def step(model, batch):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss


reference = _tiny_lora("all-linear")
to_fp8_base(reference, cpu, min_features=16)
step(reference, ids)  # the whole batch, one process
model = _tiny_lora("all-linear")
swapped = to_fp8_base(model, cpu, min_features=16)
# The product's FSDP2 wrapping (per decoder layer, then the root), as a CPU worker sets it.
model = FSDPEngine._wrap(SimpleNamespace(device=cpu, cfg=SimpleNamespace(
    scaling=SimpleNamespace(use_gpu=False))), model)
step(model, ids[2 * rank:2 * rank + 2])  # this rank's half
fp8 = [m for m in model.modules() if isinstance(m, FrozenFP8Linear)]
grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
full = {n: (g.full_tensor() if isinstance(g, DTensor) else g).float() for n, g in grads.items()}
expected = {n: p.grad.float() for n, p in reference.named_parameters() if p.requires_grad}
if rank == 0:
    print(json.dumps({
        "swapped": swapped, "fp8_modules": len(fp8),
        "fp8_buffers_plain_e4m3": all(type(m.weight_fp8) is torch.Tensor
                                      and m.weight_fp8.dtype == torch.float8_e4m3fn
                                      for m in fp8),
        "adapter_grads_sharded": sum(isinstance(g, DTensor) for g in grads.values()),
        "adapter_grads": len(grads),
        "same_names": sorted(full) == sorted(expected),
        "max_rel_err": max(((full[n] - expected[n]).norm() / expected[n].norm()).item()
                           for n in expected),
        "min_grad_norm": min(g.norm().item() for g in expected.values())}))
dist.destroy_process_group()
"""


def test_the_fp8_base_trains_under_fsdp2_like_one_process(tmp_path):
    """Two gloo ranks, the product's FSDP2 wrapping (`FSDPEngine._wrap`) over a LoRA model
    with its frozen linears in FP8 (CPU's `_scaled_mm`): the FP8 weights stay plain e4m3
    buffers on every rank (FSDP2 shards and casts parameters only), and each rank's half of
    a batch gives, once FSDP2 has averaged them, the adapter gradients of the whole batch in
    one process without FSDP."""
    script = tmp_path / "fsdp2_rank.py"
    script.write_text(_FSDP2_RANK)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(script), os.path.dirname(__file__)],
        check=False, capture_output=True, text=True, timeout=110,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["swapped"] == result["fp8_modules"] == 2 * 7
    assert result["fp8_buffers_plain_e4m3"]
    assert result["adapter_grads"] == result["adapter_grads_sharded"] == 2 * 7 * 2  # A and B
    assert result["same_names"] and result["min_grad_norm"] > 0
    assert result["max_rel_err"] < 1e-3, result
