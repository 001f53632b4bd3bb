"""A trained adapter folder: reading it, and checking that it fits a base model.

The fit is checked from the base's config alone (a weightless model on the meta device),
so a wrong base fails in a second with the module and shapes named, instead of after
loading billions of weights, or in PEFT with a size-mismatch traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ray_app.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Adapter:
    path: Path
    base_model: str | None  # base_model_name_or_path recorded by PEFT at training time
    config: dict


def read_adapter(folder: str | Path) -> Adapter:
    """The adapter in `folder` (a `<output>/final` folder of a run), or a UserError that
    says what is missing."""
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"--adapter {str(folder)!r}: no such folder. Pass the adapter folder a "
                        "training run wrote, e.g. outputs/<run.name>/final.")
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (path / name).is_file()]
    if missing:
        raise UserError(f"--adapter {str(folder)!r} is not a PEFT adapter folder: "
                        f"{' and '.join(missing)} missing. Pass the adapter folder a training "
                        "run wrote, e.g. outputs/<run.name>/final.")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path / ADAPTER_CONFIG} is not valid JSON ({err}).") from None
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path / ADAPTER_CONFIG}: peft_type is {config.get('peft_type')!r}; "
                        "only LoRA adapters are supported.")
    return Adapter(path, config.get("base_model_name_or_path"), config)


def load_base_config(base: str, trust_remote_code: bool = False):
    """The transformers config of `base`, or a UserError naming the base."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot load the base model config from {base!r} "
                        f"({str(err).splitlines()[0]}). Give a local folder with a transformers "
                        "checkpoint or a hub id (set HF_TOKEN for gated models).") from None


def check_fits(adapter: Adapter, base: str, base_config) -> None:
    """Raises a UserError unless every module the adapter adapts exists in the base with
    the input and output sizes of the adapter's LoRA matrices."""
    problems = mismatches(adapter, base_config)
    if not problems:
        return
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise UserError(
        f"The adapter in {adapter.path} does not fit the base model {base!r}: {problems[0]}"
        f"{more}. It was trained on {adapter.base_model!r}. Use the base it was trained on "
        "(model.name_or_path for eval, --base for merge)."
    )


def mismatches(adapter: Adapter, base_config) -> list[str]:
    """Human-readable differences between the adapter's LoRA shapes and the base's modules."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config)
    modules = dict(model.named_modules())
    problems = []
    with safe_open(str(adapter.path / ADAPTER_WEIGHTS), framework="pt") as weights:
        names = weights.keys()  # a safe_open handle is not iterable
        for key in names:
            name = key.removeprefix(PEFT_PREFIX)
            for part in (".lora_A.", ".lora_B."):
                if part in name:
                    module_name, kind = name.split(part)[0], part.strip(".")
                    break
            else:
                continue
            module = modules.get(module_name)
            if module is None:
                problems.append(f"the base has no module {module_name!r}")
                continue
            shape = weights.get_slice(key).get_shape()
            want, have = _sizes(module, kind, shape)
            if want is not None and want != have:
                problems.append(f"{module_name} has {'input' if kind == 'lora_A' else 'output'} "
                                f"size {want}, the adapter's {kind} expects {have}")
    return problems


def _sizes(module, kind: str, shape: list[int]) -> tuple[int | None, int]:
    """(the module's size, the adapter's size) along the dimension the LoRA matrix touches:
    lora_A is [r, in_features], lora_B is [out_features, r]."""
    if kind == "lora_A":
        return getattr(module, "in_features", None), shape[-1]
    return getattr(module, "out_features", None), shape[0]
