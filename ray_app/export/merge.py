"""`ray-app merge`: the adapter folded into the base weights, as a plain transformers model.

    base (unquantized; a 4-bit checkpoint is dequantized) + adapter
      -> reference logits on sample inputs (adapter unmerged)
      -> merge_and_unload -> safetensors shards + config + tokenizer in a staging folder
      -> reload the staging folder with from_pretrained, compare logits -> rename to --out

The comparison runs on what was written, so a passing merge is known to load and to
compute what base + adapter computes. A failed one is left in `<out>.unverified`.

QLoRA adapters are trained on a 4-bit base, but the merge goes into the full-precision
weights: 4-bit weights plus a LoRA delta cannot be stored as 4-bit again without another
rounding, and serving stacks expect plain weights. The merged model therefore differs
from what training saw by the 4-bit quantization error of the base, as with every
QLoRA merge.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from ray_app.display import status
from ray_app.errors import UserError
from ray_app.export.adapter import Adapter, check_fits, load_base_config, read_adapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Allowed max |logit difference| as a share of the largest |logit| of base + adapter:
# float32 leaves only summation-order noise; 16-bit weights round at about 2^-8.
DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is the capital of France?\nAnswer:",
    "def add(a, b):\n    return a + b\n",
    "1 2 3 5 8 13 21",
)


@dataclass
class MergeResult:
    out: Path
    base: str
    dtype: str
    max_abs_diff: float
    allowed: float
    files: list[str]


def merge_adapter(adapter_dir: str, out: str, base: str | None, dtype: str,
                  max_shard_size: str, tolerance: float | None, console: Console) -> MergeResult:
    """Merges, writes and verifies; raises UserError on bad inputs or a failed check."""
    adapter = read_adapter(adapter_dir)
    base = base or adapter.base_model
    if not base:
        raise UserError(f"{adapter.path}/adapter_config.json names no base model; pass --base.")
    out_path = Path(out).expanduser().resolve()
    if out_path.exists() and any(out_path.iterdir()):
        raise UserError(f"--out {out!r} exists and is not empty. Choose a new folder or "
                        "delete it first.")
    config = load_base_config(base)
    check_fits(adapter, base, config)
    torch_dtype = _merge_dtype(dtype, config)
    allowed_share = tolerance if tolerance is not None else DEFAULT_TOLERANCE[torch_dtype]
    _note_quantization(adapter, config, torch_dtype, console)

    tokenizer = _tokenizer(adapter, base)
    inputs = tokenizer(list(SAMPLE_TEXTS), return_tensors="pt", padding=True,
                       add_special_tokens=False)
    model = _attach(_load_unquantized(base, config, torch_dtype), adapter)
    expected = _logits(model, inputs)
    staging = out_path.with_name(out_path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with status(console, f"Merging into {base} ({str(torch_dtype).removeprefix('torch.')})..."):
        merged = model.merge_and_unload()
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
    del model, merged

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch_dtype)
    diff = float((_logits(reloaded, inputs) - expected).abs().max())
    allowed = allowed_share * max(1.0, float(expected.abs().max()))
    if not diff <= allowed:
        failed = out_path.with_name(out_path.name + ".unverified")
        shutil.rmtree(failed, ignore_errors=True)
        staging.rename(failed)
        raise UserError(
            f"The merged model does not reproduce base + adapter: max |logit difference| "
            f"{diff:.3g} > allowed {allowed:.3g} ({allowed_share:g} x the largest |logit|). "
            f"Its files are in {failed} for inspection. Merge in float32 (--dtype float32), "
            "or raise --tolerance if the difference is expected for this dtype."
        )
    if out_path.exists():
        out_path.rmdir()  # empty, checked above
    staging.rename(out_path)
    return MergeResult(out_path, base, str(torch_dtype).removeprefix("torch."), diff, allowed,
                       sorted(p.name for p in out_path.iterdir()))


def _merge_dtype(dtype: str, config) -> torch.dtype:
    """--dtype, or auto: the base checkpoint's own dtype (float32 if it names none)."""
    if dtype != "auto":
        return DTYPES[dtype]
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(stored).removeprefix("torch.") if stored is not None else "float32"
    return DTYPES.get(name, torch.float32)


def _note_quantization(adapter: Adapter, config, dtype: torch.dtype, console: Console) -> None:
    if getattr(config, "quantization_config", None):
        console.print(f"Note: the base checkpoint is quantized; it is dequantized to "
                      f"{str(dtype).removeprefix('torch.')} and the adapter is merged into those "
                      "weights.")
    elif _trained_4bit(adapter):
        console.print("Note: this adapter was trained with model.quantization=nf4 (QLoRA). The "
                      "base is loaded unquantized for the merge, so the merged model differs "
                      "from the 4-bit base + adapter that training saw by the base's 4-bit "
                      "rounding error, as with every QLoRA merge.")


def _trained_4bit(adapter: Adapter) -> bool:
    """From the run_summary.json a training run writes next to its adapter folder."""
    summary = adapter.path.parent / "run_summary.json"
    try:
        config = json.loads(summary.read_text()).get("config", {})
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("model", {}).get("quantization") == "nf4"


def _tokenizer(adapter: Adapter, base: str):
    """The adapter folder's tokenizer (training saves it there), else the base's."""
    from ray_app.data.tokenize import load_tokenizer

    for source in (str(adapter.path), base):
        try:
            tokenizer = load_tokenizer(source)
        except (OSError, ValueError, TypeError):
            continue
        tokenizer.padding_side = "right"
        return tokenizer
    raise UserError(f"No tokenizer found in {adapter.path} or {base!r}; the merged folder needs "
                    "one to be servable. Pass a --base that has tokenizer files.")


def _load_unquantized(base: str, config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if getattr(config, "quantization_config", None):
        model = model.dequantize(dtype=dtype)
        # transformers keeps the 4-bit deserialisation among the conversions it reverts on
        # save; it has no reverse and no longer applies to the dequantized weights.
        model._weight_conversions = [c for c in getattr(model, "_weight_conversions", None) or []
                                     if _reversible(c)]
    return model.eval()


def _reversible(conversion) -> bool:
    try:
        conversion.reverse_transform()
    except NotImplementedError:
        return False
    return True


def _attach(model, adapter: Adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter.path)).eval()


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    """Float32 logits at the real (non-pad) positions of the sample inputs."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return logits.float()[inputs["attention_mask"].bool()]
