"""The run configuration: pydantic models, YAML loading, `--set` overrides.

Everything is validated here, before Ray starts, so a typo costs a second and not a
cluster start-up. Error messages name the key path, the value seen and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from typing_extensions import Self

from ray_app.errors import UserError
from ray_app.secrets import has_userinfo, redact
from ray_app.tune.space_language import Distribution, grid_problem, space_problems

BUILTIN_TINY_LLAMA = "builtin:tiny-llama"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name_or_path: str = Field(
        BUILTIN_TINY_LLAMA,
        description="Hub id (meta-llama/Llama-3.1-8B), local folder, or builtin:tiny-llama "
        "(random-init tiny Llama from the bundled config, for the quickstart).",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer hub id or folder; default: the model's own."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub.")
    quantization: Literal["none", "nf4"] = Field(
        "none", description="nf4 = QLoRA: 4-bit NF4 base, double quantization, bf16 compute."
    )
    liger: Literal["auto", "on", "off"] = Field(
        "auto", description="Liger fused kernels (fused linear cross-entropy, RMSNorm, SwiGLU, "
        "RoPE); auto = on with GPUs for supported architectures."
    )
    compile: bool = Field(False, description="torch.compile each decoder layer.")
    precision: Literal["default", "fp8"] = Field(
        "default", description="fp8 = the frozen linears of the decoder layers multiply in "
        "FP8 (weights quantised once at load, rowwise scales; LoRA and lm_head stay bf16); "
        "needs GPUs with FP8 tensor cores (Ada, Hopper, Blackwell). default = model.dtype."
    )


class LoraSection(_Section):
    r: int = Field(16, gt=0, le=1024, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear."
    )
    use_dora: bool = Field(
        False, description="DoRA: a trained magnitude per output channel on top of LoRA's "
        "direction (closer to full fine-tuning; slower steps)."
    )
    use_rslora: bool = Field(
        False, description="rsLoRA: scale = alpha / sqrt(r) instead of alpha / r, so high "
        "ranks keep learning."
    )
    init: str = Field(
        "default", pattern=r"^(default|gaussian|orthogonal|pissa|pissa_niter_[0-9]+|olora)$",
        description="Adapter init (PEFT init_lora_weights): default (B = 0), gaussian, "
        "orthogonal, pissa, pissa_niter_<n> (fast SVD), olora. pissa/olora move the base's "
        "principal part into the adapter; the exported adapter applies to the original base. "
        "Not with dpo or kto, whose reference is the model with the adapter disabled."
    )

    @property
    def mutates_base(self) -> bool:
        """PiSSA and OLoRA subtract their initial adapter from the base weights."""
        return self.init.startswith(("pissa", "olora"))


CHAT_ROLES = ("system", "user", "assistant")

# The record formats, listed once: ray_app/data/formats.py reads each of them, and the
# errors and `ray-app train --help` list them from here. `auto` detects each file's format.
RecordFormat = Literal["text", "alpaca", "messages", "preference", "unpaired"]
FormatSetting = Literal["auto", RecordFormat]
FORMAT_SETTINGS: tuple[str, ...] = get_args(FormatSetting)


STANDARD_FIELDS = ("text", "instruction", "input", "output", "system", "messages", "role",
                   "content", "prompt", "chosen", "rejected", "completion", "label")


def _check_fields(value: dict[str, str]) -> dict[str, str]:
    unknown = sorted(set(value) - set(STANDARD_FIELDS))
    if unknown:
        raise ValueError(f"unknown standard field(s) {', '.join(map(repr, unknown))}; map one "
                         f"of {', '.join(STANDARD_FIELDS)} to the key your records use")
    return value


def _check_format(value: Any) -> Any:
    if value is None or value in FORMAT_SETTINGS:
        return value
    hint = difflib.get_close_matches(str(value), FORMAT_SETTINGS, n=1)
    did = f"did you mean {hint[0]!r}? " if hint else ""
    raise ValueError(f"unknown record format; {did}Allowed: {_one_of(FORMAT_SETTINGS)} (auto "
                     "detects each file's format; preference is prompt/chosen/rejected pairs; "
                     "unpaired is prompt/completion/label records for KTO)")


HUB_PREFIX = "hf://datasets/"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id_problem(path: str) -> str:
    """Why `path` is not a usable Hub id ('' when it is one)."""
    if not path.startswith(HUB_PREFIX):
        rest = path.removeprefix("hf://")
        if rest.startswith(("models/", "spaces/", "buckets/")):
            return (f"{path!r} is not a dataset: only dataset repositories are data sources "
                    "(hf://datasets/ORG/NAME)")
        return f"write the Hub dataset {path!r} as hf://datasets/ORG/NAME (e.g. {HUB_PREFIX}{rest})"
    repo = path[len(HUB_PREFIX):].rstrip("/")
    if "@" in repo:
        name, rev = repo.split("@", 1)
        return (f"{path!r}: give the revision as its own key, not in the id: "
                f"{{path: {HUB_PREFIX}{name}, revision: {rev}}}")
    if not _HUB_ID.fullmatch(repo):
        return (f"{path!r}: a Hub id names one whole dataset, ORG/NAME (letters, digits, '-', "
                "'_', '.'); choose its files with subset: and split:, not a path inside it")
    return ""


def _check_hub_ids(paths: list[str]) -> list[str]:
    for path in paths:
        problem = hub_id_problem(path) if path.startswith("hf://") else ""
        if problem:
            raise ValueError(problem)
    return paths


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(map(repr, values[:-1])) + f" or {values[-1]!r}"


class SourceSpec(_Section):
    """One data source with its own format, field names and sampling weight."""

    path: list[str] = Field(..., min_length=1, description="Files, folders, globs or URIs.")
    format: FormatSetting | None = Field(
        None, description="Format of this source; default data.format."
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Standard field name -> this source's key; default data.fields.",
    )
    weight: float = Field(
        1.0, gt=0, le=1000,
        description="Sampling weight: 2 = every record twice per epoch, 0.5 = half of them.",
    )
    split: str | None = Field(
        None, min_length=1, description="Split of a save_to_disk DatasetDict or hf:// dataset; "
        "default train (validation, else test, in data.eval).",
    )
    subset: str | None = Field(
        None, min_length=1, description="Subset (config name) of an hf:// dataset; default its "
        "default subset.",
    )
    revision: str | None = Field(
        None, min_length=1, description="Branch, tag or commit of an hf:// dataset; default main.",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("path")
    @classmethod
    def _hub_ids_are_valid(cls, value: list[str]) -> list[str]:
        return _check_hub_ids(value)

    @field_validator("subset", "revision")
    @classmethod
    def _hub_keys_need_hub_ids(cls, value: str | None, info: ValidationInfo) -> str | None:
        others = [p for p in info.data.get("path", []) if not p.startswith("hf://")]
        if value is not None and others:
            raise ValueError(f"{info.field_name} applies to hf://datasets/ORG/NAME ids only, and "
                             f"{others[0]!r} is not one: give that path a source of its own")
        return value

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, value: Any) -> Any:
        return _check_format(value)

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_fields(value)


class DataSection(_Section):
    train: list[str | SourceSpec] = Field(
        ..., min_length=1,
        description="JSONL(.gz/.zst), Parquet or Arrow files, folders (save_to_disk too), "
        "globs, s3:// gs:// URIs, hf://datasets/ORG/NAME, or sources "
        "{path, format, fields, weight, split, subset, revision}.",
    )
    eval: list[str | SourceSpec] = Field(
        default_factory=list, description="Eval shards; empty = split off eval_fraction."
    )
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of train records held out for eval (by hash)."
    )
    format: FormatSetting = Field(
        "auto", description=f"{' | '.join(FORMAT_SETTINGS)}; auto detects per file."
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Standard field name -> key in your records, e.g. {output: answer}.",
    )
    train_on_roles: list[Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: ["assistant"], min_length=1,
        description="Chat roles whose tokens carry labels (messages format).",
    )
    max_seq_len: int = Field(2048, ge=8, le=1_048_576, description="Tokens per sequence.")
    truncation: Literal["right", "reject"] = Field(
        "right", description="Records over max_seq_len: cut at max_seq_len, or reject them."
    )
    min_tokens: int = Field(1, ge=1, description="Records with fewer tokens are rejected.")
    max_tokens: int | None = Field(
        None, ge=1, description="Records with more tokens (before truncation) are rejected."
    )
    max_record_bytes: int = Field(
        4_000_000, ge=64, description="Longer JSONL lines are rejected unparsed."
    )
    dedup: bool = Field(True, description="Drop exact duplicates (normalised content hash).")
    strict: bool = Field(False, description="Fail the run when any record is rejected.")
    packing: bool = Field(
        True, description="Pack several train records into each max_seq_len sequence."
    )
    tokenize_actors: int | None = Field(
        None, ge=1, le=1024, description="Tokenizer actor pool size; null = one per 4 CPUs of "
        "the cluster (each actor tokenizes on several threads)."
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, dict)) else value

    @field_validator("train", "eval")
    @classmethod
    def _hub_ids_are_valid(cls, value: list[str | SourceSpec]) -> list[str | SourceSpec]:
        _check_hub_ids([v for v in value if isinstance(v, str)])
        return value

    @field_validator("format", mode="before")
    @classmethod
    def _known_format(cls, value: Any) -> Any:
        return _check_format(value)

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_fields(value)

    @model_validator(mode="after")
    def _token_limits_leave_room(self) -> Self:
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"data.max_tokens={self.max_tokens} is below data.min_tokens="
                             f"{self.min_tokens}, so every record would be rejected: raise "
                             "data.max_tokens (or null for no limit), or lower data.min_tokens")
        return self

    def has_eval_source(self) -> bool:
        """Whether eval records can exist: eval shards, or a share of train held out."""
        return bool(self.eval) or self.eval_fraction > 0

    def sources(self, which: Literal["train", "eval"]) -> list[SourceSpec]:
        """The train or eval entries as `SourceSpec`s with the section-wide defaults filled in."""
        out = []
        for entry in getattr(self, which):
            spec = SourceSpec(path=[entry]) if isinstance(entry, str) else entry
            out.append(spec.model_copy(update={
                "format": spec.format or self.format,
                "fields": {**self.fields, **spec.fields},
            }))
        return out


class DpoSection(_Section):
    beta: float = Field(0.1, gt=0, le=100, description="Strength of the pull towards the "
                        "reference (the base model with the adapter disabled).")
    loss: Literal["sigmoid", "hinge", "ipo"] = Field(
        "sigmoid", description="sigmoid (DPO), hinge (SLiC) or ipo (IPO, length-normalised)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Assumed share of flipped preference labels "
        "(conservative DPO; sigmoid loss only)."
    )

    @model_validator(mode="after")
    def _smoothing_needs_sigmoid(self) -> Self:
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"train.dpo.label_smoothing={self.label_smoothing} applies to "
                             f"train.dpo.loss: sigmoid only, and {self.loss} would ignore it: "
                             "set label_smoothing: 0, or loss: sigmoid")
        return self


class OrpoSection(_Section):
    beta: float = Field(0.1, gt=0, le=100, description="Weight of the odds-ratio term "
                        "(lambda in the ORPO paper) beside the SFT loss on the chosen answer.")


class SimpoSection(_Section):
    beta: float = Field(2.0, gt=0, le=100, description="Scale of the length-normalised "
                        "reward (the mean log-probability per answer token).")
    gamma: float = Field(0.5, ge=0, le=100, description="Target reward margin between the "
                         "chosen and the rejected answer.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed share of "
                                   "flipped preference labels.")


class KtoSection(_Section):
    beta: float = Field(0.1, gt=0, le=100, description="Strength of the pull towards the "
                        "reference (the base model with the adapter disabled).")
    desirable_weight: float = Field(1.0, gt=0, le=100, description="Loss weight of "
                                    "desirable completions (label: true).")
    undesirable_weight: float = Field(1.0, gt=0, le=100, description="Loss weight of "
                                      "undesirable completions (label: false).")


class TrainSection(_Section):
    method: str = Field(
        "sft", pattern=r"^[a-z][a-z0-9_]*$",
        description="sft: next-token loss on the trained tokens; dpo, orpo, simpo: preference "
        "optimisation on prompt/chosen/rejected records; kto: on prompt/completion/label "
        "records (or pairs, split in two). Settings in train.<method>. "
        "The methods are in ray_app/train/methods/."
    )
    dpo: DpoSection = Field(default_factory=DpoSection)
    orpo: OrpoSection = Field(default_factory=OrpoSection)
    simpo: SimpoSection = Field(default_factory=SimpoSection)
    kto: KtoSection = Field(default_factory=KtoSection)
    lora_plus_ratio: float | None = Field(
        None, ge=1, le=1000, description="LoRA+: learning rate of the B matrices over that "
        "of the A matrices (the paper suggests 16); null = the same rate."
    )
    epochs: int = Field(1, ge=1, le=1000, description="Passes over the train split.")
    max_steps: int | None = Field(
        None, gt=0, description="Optimizer steps; overrides epochs when set."
    )
    lr: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate (AdamW).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Warm-up share of all steps.")
    weight_decay: float = Field(0.0, ge=0, lt=1, description="AdamW weight decay.")
    batch_size_per_worker: int = Field(4, ge=1, le=4096, description="Sequences per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, le=1024, description="Micro-batches per step.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it.")
    seed: int = Field(42, ge=0, description="Seed for init, dropout and data order.")
    log_every: int = Field(10, ge=1, description="Steps between metric reports.")
    eval_every: int = Field(
        100, ge=0, description="Steps between evals (0 = only at start and end)."
    )
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept in storage.")
    keep_best_by: Literal["latest", "eval_loss"] = Field(
        "latest", description="Which checkpoints to keep: the newest, or the lowest eval loss "
        "(evaluates at every checkpoint; the newest is always kept too, for resume)."
    )
    activation_checkpointing: Literal["none", "all"] | int = Field(
        "none", description="Recompute activations: none, all layers, or every n-th layer (n)."
    )
    optimizer: Literal["auto", "adamw", "adamw_fused", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "auto", description="auto = fused AdamW on GPU, AdamW on CPU; 8-bit ones need bitsandbytes."
    )

    @field_validator("activation_checkpointing")
    @classmethod
    def _positive_interval(cls, value: str | int) -> str | int:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be none, all, or a layer interval >= 1")
        return value


class ScalingSection(_Section):
    num_workers: int = Field(2, ge=1, le=4096, description="Training workers (one per GPU).")
    min_workers: int | None = Field(
        None, ge=1, le=4096, description="Elastic: start with at least this many workers and "
        "grow to num_workers as nodes arrive; the global batch stays that of num_workers."
    )
    use_gpu: bool = Field(False, description="One GPU per worker; CPU (gloo) when false.")
    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="ddp replicates the base; fsdp (FSDP2) and deepspeed (ZeRO) shard it."
    )
    zero_stage: Literal[2, 3] | None = Field(
        None, description="DeepSpeed ZeRO stage, 2 or 3 (deepspeed only; default 3)."
    )
    offload: Literal["none", "optimizer", "optimizer_and_params"] | None = Field(
        None, description="DeepSpeed CPU offload (deepspeed only; default none); "
        "optimizer_and_params needs ZeRO-3."
    )
    resources_per_worker: dict[str, float] | None = Field(
        None,
        description="Ray resources per worker; default {CPU: 0.5} on CPU, {CPU: 4, GPU: 1} on GPU.",
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _positive_amounts(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for name, amount in (value or {}).items():
            if amount < 0:
                raise ValueError(f"amount for {name!r} must be >= 0, got {amount}")
        return value

    @model_validator(mode="after")
    def _min_not_above_max(self) -> Self:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must not exceed num_workers "
                             f"({self.num_workers})")
        return self

    @model_validator(mode="after")
    def _deepspeed_options_need_deepspeed(self) -> Self:
        given = [f"scaling.{key}={getattr(self, key)!r}" for key in ("zero_stage", "offload")
                 if getattr(self, key) is not None]
        if given and self.strategy != "deepspeed":
            raise ValueError(f"{' and '.join(given)} only apply to strategy deepspeed, and this "
                             f"config uses {self.strategy}: remove them, or set "
                             "scaling.strategy=deepspeed")
        if self.ds_offload == "optimizer_and_params" and self.ds_stage != 3:
            raise ValueError("offload=optimizer_and_params needs zero_stage=3 (ZeRO-2 does not "
                             "partition parameters, so it cannot offload them)")
        return self

    @model_validator(mode="after")
    def _gpu_resources_match_use_gpu(self) -> Self:
        # Ray Train refuses both when it builds its ScalingConfig, after the data is prepared.
        gpus = (self.resources_per_worker or {}).get("GPU")
        if gpus and not self.use_gpu:
            raise ValueError(f"scaling.resources_per_worker asks for GPU: {gpus:g} per worker, "
                             "and scaling.use_gpu is false: set scaling.use_gpu: true to train "
                             "on GPUs, or remove GPU from scaling.resources_per_worker")
        if gpus == 0 and self.use_gpu:
            raise ValueError("scaling.resources_per_worker gives GPU: 0, and scaling.use_gpu is "
                             "true (one GPU per worker): remove GPU: 0, or set "
                             "scaling.use_gpu: false")
        return self

    @property
    def ds_stage(self) -> int:
        """The ZeRO stage DeepSpeed runs with."""
        return self.zero_stage or 3

    @property
    def ds_offload(self) -> str:
        """DeepSpeed's CPU offload: none, optimizer or optimizer_and_params."""
        return self.offload or "none"

    def worker_counts(self) -> int | tuple[int, int]:
        """Ray Train's num_workers: a fixed count, or the elastic (min, max) range."""
        if self.min_workers is None or self.min_workers == self.num_workers:
            return self.num_workers
        return (self.min_workers, self.num_workers)

    def worker_resources(self) -> dict[str, float]:
        if self.resources_per_worker is not None:
            return dict(self.resources_per_worker)
        # Fractional CPU so that Ray Data's read/tokenize tasks can still be scheduled.
        return {"CPU": 4.0, "GPU": 1.0} if self.use_gpu else {"CPU": 0.5}


class EvalSection(_Section):
    max_new_tokens: int = Field(
        32, ge=1, le=4096, description="Tokens generated per eval prompt (greedy) for ROUGE-L, "
        "BLEU and exact match."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Eval records per model call.")
    actors: int | None = Field(
        None, ge=1, le=1024, description="Model actors in the Ray Data pool; null = one per GPU "
        "with scaling.use_gpu, else one per 2 CPUs."
    )
    max_records: int | None = Field(
        None, ge=1, description="Evaluate at most this many eval records; null = all."
    )


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class RunSection(_Section):
    name: str = Field(
        "quickstart",
        description="Run name; rerunning with the same name and storage resumes it.",
    )
    storage_path: str = Field(
        "outputs/checkpoints",
        description="Checkpoint storage: local/NFS path or s3:// / gs:// URI (shared on multi-node).",
    )
    output_dir: str | None = Field(
        None, description="Adapter, rejects and run_summary.json; default outputs/<run.name>."
    )
    max_failures: int = Field(
        3, ge=-1, description="Worker-group failures to retry from checkpoint (-1 = forever)."
    )
    max_preemptions: int = Field(
        -1, ge=-1, description="Node preemptions (drained spot nodes) to recover from; "
        "-1 = no limit. Counted apart from max_failures."
    )
    preemption_grace_s: float = Field(
        60.0, gt=0, description="After SIGTERM, how long a worker waits for the next step "
        "boundary to checkpoint before it exits anyway."
    )
    preemption_check_every: int = Field(
        1, ge=0, description="Steps between checks for Ray's node-drain notice (0 = never)."
    )
    record_samples: bool = Field(
        False, description="Write the sample ids of every step to <storage>/<name>/sample_trace/ "
        "(local/NFS storage; audits exact resume)."
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if not _RUN_NAME.match(value):
            raise ValueError(
                "must be 1-63 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return value


class TrackingSection(_Section):
    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers the driver logs metrics to: any "
        "of tensorboard, mlflow, wandb (needs pip install 'ray-app[tracking]'); empty = none."
    )
    project: str = Field(
        "ray-app", min_length=1, description="W&B project and MLflow experiment name."
    )
    tensorboard_dir: str | None = Field(
        None, description="TensorBoard event files; default <output_dir>/tensorboard."
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow server or store; default env MLFLOW_TRACKING_URI, else "
        "sqlite:///<output_dir>/mlflow.db. Credentials only from the environment."
    )
    wandb_entity: str | None = Field(
        None, description="W&B team or user; default the API key's own. Key from WANDB_API_KEY."
    )

    @field_validator("backends")
    @classmethod
    def _each_once(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value is not None and has_userinfo(value):
            raise ValueError("must not hold credentials (user:password@); set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                             "MLFLOW_TRACKING_TOKEN) in the environment instead")
        return value


class TuneSection(_Section):
    space: dict[str, Distribution] = Field(
        default_factory=dict, description="Search space: dotted config key -> distribution "
        "({loguniform|uniform|randint: [low, high]} or {choice|grid: [values]}).",
    )
    metric: Literal["eval_loss", "eval_perplexity", "eval_reward_accuracy",
                    "eval_reward_margin", "loss"] = Field(
        "eval_loss", description="Reported metric that ranks and stops trials "
        "(eval_perplexity: sft; eval_reward_*: the preference methods, with mode: max)."
    )
    mode: Literal["min", "max"] = Field("min", description="Whether lower or higher is better.")
    num_samples: int = Field(
        8, ge=1, le=100_000, description="Trials to sample (times every grid combination)."
    )
    search: Literal["random", "optuna"] = Field(
        "random", description="random (and grid) search, or Optuna TPE (needs optuna)."
    )
    scheduler: Literal["asha", "none"] = Field(
        "asha", description="asha stops trials whose metric lags at a rung; none runs all to the end."
    )
    grace_period: int | None = Field(
        None, ge=1, description="ASHA: steps before a trial can be stopped; null = train.eval_every."
    )
    reduction_factor: float = Field(
        3.0, gt=1, le=100, description="ASHA: keep 1/reduction_factor of the trials at each rung."
    )
    workers_per_trial: int | None = Field(
        None, ge=1, le=4096, description="Training workers per trial; null = scaling.num_workers."
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, le=10_000, description="Trials at once; null = as many as the cluster's "
        "CPUs/GPUs hold (one CPU kept for Ray Data)."
    )
    driver_resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources for each trial's driver, e.g. "
        "{driver: 0.01} to keep drivers on on-demand nodes that offer that resource.",
    )

    @field_validator("driver_resources")
    @classmethod
    def _positive_amounts(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if amount <= 0:
                raise ValueError(f"amount for {name!r} must be > 0, got {amount}")
        return value

    @model_validator(mode="after")
    def _grid_needs_random_search(self) -> Self:
        problem = grid_problem(self.space, self.search)
        if problem:
            raise ValueError(problem)
        return self


class Config(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    tune: TuneSection = Field(default_factory=TuneSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _sections_agree(self) -> Self:
        """The rules between sections, all reported at once; then the search space, whose
        values are checked against the rest of this config (ray_app.tune.space_language)."""
        problems = [p for rule in _CROSS_SECTION_RULES if (p := rule(self))]
        problems += space_problems(self)
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self

    def output_path(self) -> Path:
        """run.output_dir (default outputs/<run.name>) as an absolute local path."""
        path = self.run.output_dir or f"outputs/{self.run.name}"
        resolved = resolve_run_path(path, "run.output_dir", os.environ.get(STORAGE_ENV))
        if "://" in resolved:
            raise UserError(
                f"run.output_dir {path!r} would be under {STORAGE_ENV}={resolved.rsplit('/', 1)[0]}"
                ", an object-storage URI; the adapter, rejects and run_summary.json are written "
                "to a file system. Set run.output_dir to a path on the cluster's shared file "
                "system (e.g. /mnt/shared/outputs/<name>).")
        return Path(resolved)

    def storage_uri(self) -> str:
        """Absolute local path or an unchanged URI (Ray needs absolute local paths)."""
        return resolve_run_path(self.run.storage_path, "run.storage_path",
                                os.environ.get(STORAGE_ENV))


# Where relative run.storage_path / run.output_dir go on a cluster: its shared storage (a
# path every node mounts, or an object-storage URI), set on the cluster's pods by the chart.
STORAGE_ENV = "RAY_APP_STORAGE"


def resolve_run_path(path: str, key: str, base: str | None) -> str:
    """An absolute path or URI for a run's storage or output path: relative ones go under
    `base` when given, else under the current folder, unless that is a Ray job's temporary
    working_dir (then a UserError says what to set)."""
    if "://" in path:
        return path
    expanded = Path(path).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    if base:
        return f"{base.rstrip('/')}/{path}" if "://" in base else str(
            (Path(base).expanduser() / path).resolve())
    if _in_runtime_working_dir():
        raise UserError(
            f"{key} {path!r} is relative, and this process runs in a Ray job's temporary "
            "working_dir, which Ray deletes when the job ends: checkpoints, adapter and "
            f"summary would be lost. Make {key} absolute (a path every node mounts, or s3:// "
            f"for run.storage_path), or set {STORAGE_ENV} on the cluster to its shared storage.")
    return str(expanded.resolve())


def _in_runtime_working_dir() -> bool:
    """Ray unpacks a job's working_dir into <session>/runtime_resources/working_dir_files/
    _ray_pkg_<hash>/ and runs the job there."""
    return any(part.startswith("_ray_pkg_") for part in Path.cwd().parts)


def _no_eval_data(cfg: Config) -> str:
    return (f"data.eval is empty and data.eval_fraction is {cfg.data.eval_fraction:g}, so there "
            "are no eval records: set data.eval (eval shards) or data.eval_fraction > 0 "
            "(e.g. 0.05)")


def _keep_best_needs_eval(cfg: Config) -> str | None:
    if cfg.train.keep_best_by == "eval_loss" and not cfg.data.has_eval_source():
        return (f"train.keep_best_by: eval_loss ranks checkpoints by eval loss, but "
                f"{_no_eval_data(cfg)}, or use train.keep_best_by: latest.")
    return None


def _tune_metric_needs_eval(cfg: Config) -> str | None:
    metric = cfg.tune.metric
    if cfg.tune.space and metric.startswith("eval") and not cfg.data.has_eval_source():
        return (f"tune.metric: {metric} ranks trials by an eval metric, but "
                f"{_no_eval_data(cfg)}, or use tune.metric: loss.")
    return None


def _gpu_only_kernels(cfg: Config) -> str | None:
    if cfg.scaling.use_gpu:
        return None
    if cfg.model.attn_implementation == "flash_attention_2":
        return ("model.attn_implementation: flash_attention_2 needs scaling.use_gpu: true "
                "(flash-attn runs on CUDA GPUs only): set scaling.use_gpu: true, or use "
                "model.attn_implementation: sdpa on CPU.")
    if cfg.model.liger == "on":
        return ("model.liger: on needs scaling.use_gpu: true (Liger's kernels are Triton GPU "
                "kernels): set scaling.use_gpu: true, or use model.liger: auto (on with GPUs "
                "only) or off.")
    return None


def _fp8_problem(cfg: Config) -> str | None:
    """FP8 matmuls need a GPU, a bf16 base of plain linears, and an engine that keeps the
    FP8 weights as they are (DeepSpeed casts every floating buffer to bf16)."""
    m = cfg.model
    if m.precision != "fp8":
        return None
    if not cfg.scaling.use_gpu:
        return ("model.precision: fp8 needs scaling.use_gpu: true (FP8 matmuls run on GPU "
                "tensor cores only): set scaling.use_gpu: true, or model.precision: default.")
    if m.quantization != "none":
        return (f"model.precision: fp8 and model.quantization: {m.quantization} both replace "
                "the base's linears: use one (fp8 for speed, nf4 for memory).")
    if m.dtype not in ("auto", "bfloat16"):
        return (f"model.precision: fp8 computes in bf16 around the FP8 matmuls, so model.dtype "
                f"{m.dtype} does not apply: set model.dtype: auto (or bfloat16).")
    if cfg.scaling.strategy == "deepspeed":
        return ("model.precision: fp8 works with scaling.strategy ddp or fsdp; DeepSpeed casts "
                "the FP8 weights back to bf16: use scaling.strategy: fsdp (or ddp).")
    return None


def _sample_trace_needs_a_file_system(cfg: Config) -> str | None:
    storage = cfg.run.storage_path
    if cfg.run.record_samples and "://" in storage:
        return (f"run.record_samples: true appends to trace files under run.storage_path, "
                f"and {storage.split('://')[0]}:// object storage cannot be appended to: use a "
                "local or NFS run.storage_path, or set run.record_samples: false.")
    return None


# Each takes the validated sections and returns the problem, or None.
def _lora_variant_problem(cfg: Config) -> str | None:
    """The LoRA variants PEFT cannot combine with the rest of the run."""
    lora = cfg.lora
    if lora.mutates_base and cfg.model.quantization != "none":
        return (f"lora.init: {lora.init} subtracts the adapter's initial value from the base "
                "weights, which a 4-bit base cannot hold exactly (PEFT refuses PiSSA on it; "
                "OLoRA re-quantizes, so the exported adapter would not match the trained "
                "model): use lora.init: default or gaussian with QLoRA, or "
                "model.quantization: none.")
    if lora.mutates_base and cfg.train.method in ("dpo", "kto"):
        return (f"lora.init: {lora.init} with train.method: {cfg.train.method}: the method's "
                "reference is the model with the adapter disabled, which after "
                f"{lora.init} is the base minus its principal part, not the original model, so "
                "the rewards would be measured against the wrong reference: use lora.init: "
                "default, gaussian or orthogonal with dpo and kto, or a reference-free method "
                "(train.method: orpo or simpo) with pissa/olora.")
    if lora.mutates_base and lora.use_dora:
        return (f"lora.init: {lora.init} with lora.use_dora: the adapter is exported for the "
                "original base by PEFT's PiSSA/OLoRA conversion, which keeps only the LoRA "
                "matrices and would drop DoRA's magnitudes: use one of the two.")
    return None


_CROSS_SECTION_RULES = (_keep_best_needs_eval, _tune_metric_needs_eval, _gpu_only_kernels,
                        _fp8_problem, _sample_trace_needs_a_file_system, _lora_variant_problem)


def section_names() -> list[str]:
    return list(Config.model_fields)


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Reads YAML (or the built-in quickstart when `path` is None) and applies `--set`s."""
    if path is None:
        from ray_app.quickstart import quickstart_config_dict

        raw = quickstart_config_dict()
    else:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    return validate_config(raw, source=str(path) if path else "the built-in quickstart")


def validate_config(raw: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(e) for e in _as_written(err.errors())]
        raise UserError(
            f"Invalid configuration in {source}:\n  - " + "\n  - ".join(lines)
            + "\nSee jobs/configs/example.yaml or `ray-app train --help` for every key."
        ) from None


def _as_written(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A data source is a path or a mapping (`str | SourceSpec`), and pydantic reports a bad
    one against both: keep the errors of the form it was written in, at the entry's key."""
    out = []
    for error in errors:
        loc = error["loc"]
        if "str" in loc and isinstance(error.get("input"), dict):
            continue
        out.append({**error, "loc": tuple(p for p in loc if p not in ("str", "SourceSpec"))})
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"Config file {str(path)!r} does not exist. Pass the path of a YAML file.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"Config file {str(path)!r} is not valid YAML{where}: "
                        f"{getattr(err, 'problem', err)}.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"Config file {str(path)!r} must hold a mapping of sections "
                        f"({', '.join(section_names())}), got {type(raw).__name__}.")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r} must look like key.path=value, e.g. train.lr=1e-4.")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {item!r}: {part!r} is not a section.")
        node = child
    node[parts[-1]] = value


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent, _, name = loc.rpartition(".")
        allowed = _allowed_keys(parent)
        hint = difflib.get_close_matches(name, allowed, n=1)
        did = f"; did you mean {hint[0]!r}?" if hint else ""
        where = f"in section {parent!r}" if parent else "at the top level"
        return f"{loc}: unknown key {where}{did} Allowed: {', '.join(allowed)}."
    if kind == "missing":
        return f"{loc}: required key is missing."
    if not loc:  # a check across sections words its own message
        return error["msg"].removeprefix("Value error, ")
    if kind == "value_error" and _allowed_keys(loc):
        # A rule between keys of one section names them; its input is the whole section.
        return f"{loc}: {error['msg'].removeprefix('Value error, ')}."
    value = redact(error.get("input"))  # a rejected URI may hold a password
    return f"{loc}: got {value!r}; {error['msg'][0].lower()}{error['msg'][1:]}."


def _allowed_keys(section: str) -> list[str]:
    """The keys of the section at dotted `section` (list positions skipped), or []."""
    model: type[BaseModel] | None = Config
    for part in filter(None, section.split(".")):
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        model = _model_in(getattr(field, "annotation", None))
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds: itself, or inside a list or union (data.train)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is dict:
        return None
    return next(filter(None, map(_model_in, get_args(annotation))), None)


def describe_keys() -> str:
    """Every key with its default and meaning, for `ray-app train --help`."""
    lines = []
    for section, field in Config.model_fields.items():
        lines.append(f"{section}:")
        sub: type[BaseModel] = field.annotation  # type: ignore[assignment]
        for name, info in sub.model_fields.items():
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            lines.append(f"  {name} ({default}): {info.description}")
    return "\n".join(lines)
