"""Per-GPU memory of a training run, part by part, and the settings that make it fit.

All figures are bytes per GPU at the training peak (the start of the backward pass).
The arithmetic follows what PyTorch autograd actually keeps for a Llama-style decoder
(attention + gated MLP: Llama, Qwen, Mistral, Gemma); other architectures get the same
arithmetic on their config fields, so treat their figure as rough.

- weights: bf16, 2 B/param. QLoRA: the decoder's linear layers in NF4, 0.5 B/param plus
  1/64 B of double-quantized block scales; embeddings, lm_head and norms stay bf16. FSDP
  and ZeRO-3 divide them by the GPU count and hold two gathered layers (current + prefetch).
  The FP8 base (model.precision: fp8): the decoder linears it converts hold an e4m3 copy
  and a transposed e4m3 copy, 2 B/param as in bf16, but as buffers FSDP leaves whole on
  every GPU.
- adapter: LoRA's r*(in+out) params per adapted linear, fp32; gradients fp32; AdamW two
  fp32 states (8-bit AdamW: 2 B). FSDP and ZeRO-2/3 shard all three. Full fine-tuning
  (a what-if: the project trains adapters) keeps fp32 master weights, grads and states.
- activations, bf16, per token and layer: a frozen linear saves no input (autograd keeps
  only what a gradient needs), so what stays is the two RMSNorm inputs (fp32 without
  Liger), the rotated q and k, v and the attention output (SDPA/FlashAttention keep no
  score matrix; eager keeps heads*seq per token), the MLP's gate and up outputs (plus the
  SiLU output without Liger), and per adapted linear a bf16 copy of its input (dropout's
  output) plus LoRA dropout's mask. A checkpointed layer keeps only its
  input; the backward pass recomputes one layer at a time.
- logits: without Liger's fused linear cross-entropy, tokens*vocab*(2 bf16 + 4 fp32 copy +
  4 log-softmax + 2 gradient) B (evaluation, without gradient: 10 B); with it, one chunk
  of rows at a time.
- buffers: autocast's bf16 copies of the adapter, QLoRA's dequantized weight of the
  largest layer, DDP's gradient buckets, the packed-sequence attention mask, plus 5% for
  allocator rounding and temporaries.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

GIB = 2**30
OVERHEAD = 0.05
# Share of the GPU the recommendation fills: the rest is the CUDA context, NCCL buffers
# and allocator fragmentation, none of which PyTorch's peak-allocated figure counts.
USABLE_SHARE = 0.9

Method = Literal["full", "lora", "qlora"]
Strategy = Literal["ddp", "fsdp", "deepspeed"]


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know of a model."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    # (module name, in_features, out_features) of one decoder layer's linear layers.
    layer_linears: tuple[tuple[str, int, int], ...]
    other_params: int  # embeddings, lm_head (if untied), norms

    @property
    def layer_linear_params(self) -> int:
        return sum(i * o for _, i, o in self.layer_linears)

    @property
    def params(self) -> int:
        return self.layers * self.layer_linear_params + self.other_params


@dataclass(frozen=True)
class Plan:
    """The settings of one run that move its memory."""

    method: Method = "lora"
    strategy: Strategy = "ddp"
    zero_stage: int = 3
    offload: str = "none"  # DeepSpeed: none | optimizer | optimizer_and_params
    gpus: int = 1
    batch: int = 4  # sequences per micro-batch and GPU
    seq_len: int = 2048
    lora_r: int = 16
    lora_targets: tuple[str, ...] | Literal["all-linear"] = "all-linear"
    lora_dropout: float = 0.05
    liger: bool = True
    checkpointing: str | int = "none"  # none | all | every n-th layer
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit
    attention: str = "sdpa"  # sdpa | flash_attention_2 | eager
    packed_mask: bool = False  # packed rows of several documents carry a 4D mask
    # Rows of max_seq_len per record in the forward pass that keeps activations: 2 for
    # DPO, ORPO and SimPO (chosen + rejected), 1 for SFT and KTO (whose reference and KL
    # passes keep nothing).
    rows: int = 1
    # The method computes answer log-probs from the logits, Liger or not (the preference
    # methods: a chunk of answer tokens at a time, `answers.answer_logps`); SFT with Liger
    # never holds them.
    full_logits: bool = False
    fused_eval: bool = True  # evaluation through Liger's fused loss (no full logits)
    dora: bool = False  # lora.use_dora
    fp8: bool = False  # model.precision: fp8

    @property
    def sequences(self) -> int:
        return self.batch * self.rows

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len


@dataclass
class Estimate:
    parts: dict[str, float]  # bytes per GPU, by part
    eval_peak: float  # bytes per GPU while evaluating
    notes: list[str] = field(default_factory=list)

    @property
    def train_peak(self) -> float:
        return sum(self.parts.values())

    @property
    def peak(self) -> float:
        return max(self.train_peak, self.eval_peak)

    def as_gib(self) -> dict[str, float]:
        out = {name: round(value / GIB, 3) for name, value in self.parts.items()}
        out.update(train_peak=round(self.train_peak / GIB, 3),
                   eval_peak=round(self.eval_peak / GIB, 3), peak=round(self.peak / GIB, 3))
        return out


def shape_of(config, name: str = "") -> Shape:
    """Reads a transformers config by building the model on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    from ray_app.model.loading import decoder_layers

    layers = decoder_layers(model)
    linears = tuple((n, m.in_features, m.out_features) for n, m in layers[0].named_modules()
                    if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    linear_params = sum(i * o for _, i, o in linears)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return Shape(
        name=name or getattr(config, "_name_or_path", "") or config.model_type,
        model_type=config.model_type,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        layers=len(layers), heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim,
        vocab=text.vocab_size,
        layer_linears=linears,
        other_params=total - len(layers) * linear_params,
    )


def _adapted(shape: Shape, plan: Plan) -> list[tuple[str, int, int]]:
    if plan.method == "full":
        return []
    if plan.lora_targets == "all-linear":
        return list(shape.layer_linears)
    return [lin for lin in shape.layer_linears if lin[0].rsplit(".", 1)[-1] in plan.lora_targets]


def adapter_params(shape: Shape, plan: Plan) -> int:
    return shape.layers * sum(plan.lora_r * (i + o) for _, i, o in _adapted(shape, plan))


def _weights(shape: Shape, plan: Plan) -> tuple[float, float, float]:
    """(bytes of the base that sharding divides, the same of one decoder layer, bytes held
    whole on every GPU: the FP8 base's two e4m3 copies) as stored on the GPU."""
    fp8 = 0
    if plan.fp8:
        from ray_app.model.fp8 import sides_fit_fp8

        fp8 = sum(i * o for _, i, o in shape.layer_linears if sides_fit_fp8(i, o))
    per_param = 0.5 + 1 / 64 if plan.method == "qlora" else 2.0
    layer = (shape.layer_linear_params - fp8) * per_param
    return shape.layers * layer + shape.other_params * 2.0, layer, shape.layers * fp8 * 2.0


def _layer_activations(shape: Shape, plan: Plan) -> float:
    """Bytes one decoder layer keeps per token when it is not checkpointed."""
    h, i = shape.hidden, shape.intermediate
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * ((2 * h if plan.liger else 4 * h) + 4)  # input (fp32 without Liger), rstd
    # q, k rotated, v, output, fp32 log-sum-exp per head
    attention = 2 * q_dim + 2 * kv_dim + 2 * kv_dim + 2 * q_dim + 4 * shape.heads
    if plan.attention == "eager":
        attention += shape.heads * plan.seq_len * 6  # softmax output fp32 + its bf16 copy
    mlp = 4 * i if plan.liger else 6 * i
    if plan.method == "full":
        inputs = 2 * (h + h + i)  # inputs of q/k/v, gate/up, down (o: the attention output)
    else:
        # Each adapted linear saves its own bf16 copy of its input for lora_A's gradient
        # (dropout's output; with DoRA, autocast's copy of PEFT's fp32 cast), plus LoRA
        # dropout's mask. Without dropout, plain LoRA adapters of one input share it
        # (`add_lora` under autocast); counted here as copies: an over-estimate.
        # lora_A's output (bf16, r wide) is kept for lora_B.
        per_element = 3 if plan.lora_dropout > 0 else 2
        # DoRA (PEFT) also keeps the base output and the scaled LoRA output of each adapted
        # linear for its magnitude's gradient: two bf16 tensors of the output's width (8B
        # shape, q,k,v,o, 8,192 tokens: 10.0 GiB measured, bench/results/gpu_methods.md).
        dora = 4 if plan.dora else 0
        inputs = sum(per_element * in_features + 2 * plan.lora_r + dora * out_features
                     for _, in_features, out_features in _adapted(shape, plan))
    return norms + attention + mlp + inputs


def _checkpointed_layers(shape: Shape, plan: Plan) -> int:
    if plan.checkpointing == "none":
        return 0
    every = 1 if plan.checkpointing == "all" else int(plan.checkpointing)
    return len(range(0, shape.layers, every))


def _logits(shape: Shape, plan: Plan, tokens: int, fused: bool, grad: bool = True,
            answers: bool = False) -> float:
    if fused:  # Liger: rows in chunks of ~tokens*hidden/vocab, bf16 logits + fp32 grad
        rows = math.ceil(tokens / math.ceil(shape.vocab / shape.hidden))
        chunk = 2 ** math.ceil(math.log2(max(1, rows)))
        return min(chunk, tokens) * shape.vocab * 6 + tokens * shape.hidden * 2
    if answers:  # the preference methods: one chunk of answer tokens at a time, plus their
        # gathered final hidden states (bf16)
        from ray_app.train.methods.answers import LOGITS_BUDGET_BYTES

        per_token = shape.vocab * (12 if grad else 10)
        chunk = max(1, LOGITS_BUDGET_BYTES // (10 * shape.vocab))
        return min(chunk, tokens) * per_token + tokens * shape.hidden * 2
    # bf16 logits, their fp32 copy, the fp32 log-softmax output, and in training its gradient.
    return tokens * shape.vocab * (12 if grad else 10)


def estimate(shape: Shape, plan: Plan) -> Estimate:
    notes = []
    sharded = plan.strategy == "fsdp" or (plan.strategy == "deepspeed" and plan.zero_stage == 3)
    state_sharded = plan.strategy in ("fsdp", "deepspeed")
    n = plan.gpus
    base, layer, whole = _weights(shape, plan)
    if sharded:
        on_cpu = plan.strategy == "deepspeed" and plan.offload == "optimizer_and_params"
        weights = whole + (0.0 if on_cpu else base / n) + 2 * layer * (n > 1 or on_cpu)
        if whole and n > 1:
            notes.append(f"FP8 base: its e4m3 weights ({whole / GIB:.1f} GiB) are held whole "
                         f"on every GPU; FSDP shards the rest")
    else:
        weights = base + whole

    trainable = shape.params if plan.method == "full" else adapter_params(shape, plan)
    state_bytes = 2.0 if plan.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8.0
    divide = n if state_sharded else 1
    offloaded = plan.strategy == "deepspeed" and plan.offload != "none"
    if plan.method == "full":
        adapter = trainable * 4.0 / divide  # fp32 master weights
    else:
        adapter = trainable * 4.0 / (n if sharded else 1)
    gradients = trainable * 4.0 / divide
    optimizer = 0.0 if offloaded else trainable * state_bytes / divide
    if offloaded:
        notes.append("optimizer states in CPU memory (DeepSpeed offload)")

    tokens = plan.tokens
    per_layer = _layer_activations(shape, plan)
    kept = _checkpointed_layers(shape, plan)
    activations = tokens * (kept * 2 * shape.hidden + (shape.layers - kept) * per_layer)
    if kept:
        activations += tokens * per_layer  # the layer being recomputed
    if plan.rows > 1:
        notes.append("preference pairs: chosen and rejected count as two sequences per record")
    if plan.full_logits:
        notes.append("preference methods compute the answer tokens' logits a chunk at a time "
                     "(at most 1 GiB of them at once; with ZeRO-3 all at once)")

    # ZeRO-3 keeps whole answer logits (`answers.answer_logps`).
    chunked = plan.full_logits and not (plan.strategy == "deepspeed" and plan.zero_stage == 3)
    logits = _logits(shape, plan, tokens, plan.liger and not plan.full_logits, answers=chunked)
    # Autocast's bf16 copies of the fp32 adapter weights, kept for the backward pass.
    buffers = 0.0 if plan.method == "full" else trainable * 2.0
    if plan.method == "qlora":
        buffers += max(i * o for _, i, o in shape.layer_linears) * 2  # one dequantized weight
    if plan.dora and plan.method != "full":
        # DoRA's weight norm: W + scale * B @ A of one adapted linear at a time, in fp32.
        buffers += max(i * o for _, i, o in _adapted(shape, plan)) * 4
    if plan.strategy == "ddp" and n > 1:
        buffers += trainable * 4.0  # gradient buckets
    if plan.packed_mask and plan.attention != "flash_attention_2":
        buffers += plan.sequences * plan.seq_len**2 * 2
    parts = {"weights": weights, "adapter": adapter, "gradients": gradients,
             "optimizer": optimizer, "activations": activations, "logits": logits,
             "buffers": buffers}
    parts["buffers"] += OVERHEAD * sum(parts.values())
    eval_tokens = plan.sequences * plan.seq_len  # the same rows, without gradients
    eval_logits = _logits(shape, plan, eval_tokens,
                          plan.liger and plan.fused_eval and not plan.full_logits, grad=False,
                          answers=chunked)
    eval_peak = (weights + adapter + eval_logits + eval_tokens * shape.hidden * 8) * (1 + OVERHEAD)
    return Estimate(parts=parts, eval_peak=eval_peak, notes=notes)


@dataclass
class Recommendation:
    plan: Plan
    estimate: Estimate
    fits: bool
    changes: dict[str, object]  # config key -> value, against the given plan
    why: str


# Config keys of the fields a recommendation may change.
CONFIG_KEYS = {"checkpointing": "train.activation_checkpointing",
               "batch": "train.batch_size_per_worker", "strategy": "scaling.strategy",
               "method": "model.quantization", "liger": "model.liger",
               "optimizer": "train.optimizer", "fp8": "model.precision"}


def _config_value(name: str, plan: Plan) -> object:
    value = getattr(plan, name)
    if name == "method":
        return "nf4" if value == "qlora" else "none"
    if name == "liger":
        return "on" if value else "off"
    if name == "fp8":
        return "fp8" if value else "default"
    return value


def _candidates(plan: Plan):
    """Plans to try, fastest first: Liger on, no recomputation at the largest batch, then
    cheaper memory at growing cost (every 2nd layer, every layer, smaller micro-batches,
    sharding, with the FP8 base turned back to bf16 so that FSDP shards it, a 4-bit base)."""
    bases = [replace(plan, liger=True)]
    if plan.gpus > 1 and plan.strategy == "ddp":
        bases.append(replace(bases[-1], strategy="fsdp"))
    if plan.gpus > 1 and plan.fp8:
        bases.append(replace(bases[-1], fp8=False))
    if plan.method == "lora":
        bases.append(replace(bases[-1], method="qlora", fp8=False))  # NF4 replaces FP8
    for base in bases:
        batch = base.batch
        while batch >= 1:
            for ckpt in ("none", 2, "all"):
                yield replace(base, batch=batch, checkpointing=ckpt)
            batch //= 2


def recommend(shape: Shape, plan: Plan, gpu_gib: float) -> Recommendation:
    budget = gpu_gib * GIB * USABLE_SHARE
    for candidate in _candidates(plan):
        est = estimate(shape, candidate)
        if est.peak <= budget:
            break
    else:
        return Recommendation(plan, estimate(shape, plan), False, {},
                              f"nothing tried fits in {gpu_gib:g} GiB per GPU: use more GPUs "
                              "with fsdp, or shorter sequences")
    changes = {CONFIG_KEYS[name]: _config_value(name, candidate) for name in CONFIG_KEYS
               if getattr(candidate, name) != getattr(plan, name)}
    if candidate.batch < plan.batch:
        accum = math.ceil(plan.batch / candidate.batch)
        changes["train.grad_accum_steps"] = f"x{accum} (keeps the global batch)"
    usage = f"{est.peak / GIB:.1f} of {budget / GIB:.1f} GiB usable"
    if not changes:
        why = f"the given settings fit and are the fastest tried: {usage}"
    elif estimate(shape, plan).peak <= budget:
        why = f"the given settings fit; these are faster and fit too: {usage}"
    else:
        why = f"the given settings do not fit; the fastest tried that fits: {usage}"
    return Recommendation(candidate, est, True, changes, why)


def plan_from_config(cfg, liger_auto: bool, **overrides) -> Plan:
    """The Plan of a project config on GPUs, with command-line overrides (None = keep);
    liger_auto: whether model.liger=auto turns Liger on for this architecture."""
    from ray_app.train.methods import method_for

    training = method_for(cfg)
    liger = cfg.model.liger == "on" or (cfg.model.liger == "auto" and liger_auto)
    method = "qlora" if cfg.model.quantization == "nf4" else "lora"
    targets = cfg.lora.target_modules
    plan = Plan(
        method=method, strategy=cfg.scaling.strategy, zero_stage=cfg.scaling.ds_stage,
        offload=cfg.scaling.ds_offload, gpus=cfg.scaling.num_workers,
        batch=cfg.train.batch_size_per_worker, seq_len=cfg.data.max_seq_len, lora_r=cfg.lora.r,
        lora_targets=targets if targets == "all-linear" else tuple(targets),
        lora_dropout=cfg.lora.dropout, liger=liger,
        checkpointing=cfg.train.activation_checkpointing,
        optimizer=cfg.train.optimizer if "8bit" in cfg.train.optimizer else "adamw",
        attention=cfg.model.attn_implementation, packed_mask=cfg.data.packing,
        rows=training.TRAINED_ROWS, full_logits=training.record_kind != "sequences",
        fused_eval=liger, dora=cfg.lora.use_dora, fp8=cfg.model.precision == "fp8",
    )
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    # --method qlora on an FP8 config: the 4-bit base replaces the FP8 one (never both).
    return replace(plan, fp8=False) if plan.method == "qlora" else plan


def to_json(shape: Shape, plan: Plan, est: Estimate, rec: Recommendation | None) -> dict:
    plan_dict = asdict(plan)
    out = {"model": shape.name, "params": shape.params,
           "adapter_params": adapter_params(shape, plan), "plan": plan_dict,
           "gib_per_gpu": est.as_gib(), "notes": est.notes}
    if rec is not None:
        out["recommendation"] = {"fits": rec.fits, "changes": rec.changes, "why": rec.why,
                                 "gib_per_gpu": rec.estimate.as_gib()}
    return out
