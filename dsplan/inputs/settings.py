"""Training settings: what the user asked for, merged from CLI flags, their LF YAML and defaults.

Precedence is flag > the user's LLaMA-Factory YAML > dsplan's default.  The
merged :class:`TrainSettings` is what the memory model and the renderer read;
the user's YAML itself is carried along so render can keep every key the user
set that dsplan does not manage.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from dsplan.errors import UserError

METHODS = ("lora", "qlora", "full", "freeze")

#: Keys of the LF YAML that dsplan decides; everything else the user wrote is kept.
MANAGED_KEYS = (
    "deepspeed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "pure_bf16",
)

#: LLaMA-Factory's accepted values for the enum-like keys dsplan writes or reads.
#: get_train_args does not check these itself (it only asserts some of them late).
LF_ENUMS = {
    "finetuning_type": ("lora", "oft", "freeze", "full"),
    "stage": ("pt", "sft", "rm", "ppo", "dpo", "kto"),
    "quantization_bit": (2, 3, 4, 5, 6, 8),
    "quantization_method": ("bnb", "gptq", "awq", "aqlm", "quanto", "eetq", "hqq", "mxfp4", "fp8"),
    "flash_attn": ("auto", "disabled", "sdpa", "fa2", "fa3"),
    "report_to": ("none", "all", "tensorboard", "wandb", "swanlab", "mlflow", "trackio"),
}
#: Types of the keys dsplan writes (bool is not an int here).
LF_TYPES = {
    "per_device_train_batch_size": int,
    "gradient_accumulation_steps": int,
    "cutoff_len": int,
    "lora_rank": int,
    "freeze_trainable_layers": int,
    "optim": str,
    "lora_target": str,
    "logging_steps": (int, float),
    "bf16": bool,
    "fp16": bool,
    "do_train": bool,
    "model_name_or_path": str,
    "dataset": str,
    "dataset_dir": str,
    "template": str,
    "output_dir": str,
    "deepspeed": str,
}


@dataclass(frozen=True)
class TrainSettings:
    """One training run, as dsplan understands it."""

    model_name_or_path: str = field(metadata={"help": "written to the YAML as-is (hub id or folder)"})
    method: str = field(default="lora", metadata={"help": "lora, qlora (4-bit LoRA), full or freeze"})
    dataset: str = field(default="alpaca_en_demo", metadata={"help": "LF dataset name(s), comma separated"})
    dataset_dir: str = field(default="data", metadata={"help": "folder holding dataset_info.json"})
    template: str = field(default="default", metadata={"help": "LF chat template"})
    cutoff_len: int = field(default=2048, metadata={"help": "tokens per sample after truncation"})
    micro_batch: int = field(default=1, metadata={"help": "per_device_train_batch_size"})
    grad_accum: int = field(default=8, metadata={"help": "gradient_accumulation_steps"})
    precision: str = field(default="bf16", metadata={"help": "bf16 or fp16 mixed precision, or fp32 (no mixed precision)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank (lora/qlora)"})
    quantization_bit: int | None = field(default=None, metadata={"help": "4 or 8 for quantized LoRA"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "LF enables it unless disabled"})
    lora_target: str = field(default="all", metadata={"help": "LF lora_target: all, or module names"})
    freeze_trainable_layers: int = field(default=2, metadata={"help": "LF freeze: last N layers train"})
    optim: str = field(default="adamw_torch", metadata={"help": "HF optim name (8-bit and paged change memory)"})
    output_dir: str = field(default="saves/dsplan", metadata={"help": "LF output_dir"})
    flash_attn: str = field(default="auto", metadata={"help": "LF flash_attn"})

    @property
    def finetuning_type(self) -> str:
        return "lora" if self.method == "qlora" else self.method

    @property
    def effective_batch_per_gpu(self) -> int:
        return self.micro_batch * self.grad_accum


def load_user_yaml(path: str | Path) -> dict:
    """Read the user's LLaMA-Factory YAML; every problem is a one-line UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"LF YAML {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "parse error"
        raise UserError(f"malformed YAML in {path}{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"malformed YAML in {path}: expected a mapping of LLaMA-Factory arguments")
    check_lf_values(data, where=str(path))
    return data


def check_lf_values(data: dict, where: str) -> None:
    """dsplan's own type and enum checks for the LF keys it understands."""
    for key, allowed in LF_ENUMS.items():
        if key in data and data[key] is not None:
            value = data[key]
            values = [v.strip() for v in value.split(",")] if key == "report_to" and isinstance(value, str) else [value]
            for v in values:
                if v not in allowed:
                    raise UserError(f"{where}: {key}: {value!r} is not one of {', '.join(map(str, allowed))}")
    for key, typ in LF_TYPES.items():
        if key in data and data[key] is not None:
            value = data[key]
            if isinstance(value, bool) and typ is not bool:
                raise UserError(f"{where}: {key}: expected a number, got {value!r}")
            if not isinstance(value, typ):
                want = typ.__name__ if isinstance(typ, type) else "number"
                raise UserError(f"{where}: {key}: expected {want}, got {value!r}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "cutoff_len", "lora_rank"):
        if isinstance(data.get(key), int) and data[key] < 1:
            raise UserError(f"{where}: {key}: must be at least 1, got {data[key]}")


def method_from_yaml(data: dict) -> str | None:
    ft = data.get("finetuning_type")
    if ft is None:
        return None
    if ft == "lora" and data.get("quantization_bit") in (4, 8):
        return "qlora"
    if ft == "oft":
        return "lora"  # same memory shape as LoRA for planning purposes
    return ft


def merge_settings(
    user: dict,
    *,
    model_name_or_path: str | None,
    default_template: str,
    precision_supported: str,
    method: str | None = None,
    dataset: str | None = None,
    dataset_dir: str | None = None,
    template: str | None = None,
    cutoff_len: int | None = None,
    micro_batch: int | None = None,
    grad_accum: int | None = None,
    lora_rank: int | None = None,
    output_dir: str | None = None,
    flash_attn: str | None = None,
    defaults: dict | None = None,
) -> TrainSettings:
    """Flags > user YAML > ``defaults`` (a preset's training block) > dsplan's defaults.
    ``precision_supported`` is the hardware's (bf16/fp16; fp32 on a CPU)."""
    d = defaults or {}
    if method is not None and method not in METHODS:
        raise UserError(f"unknown --method {method!r}: choose one of {', '.join(METHODS)}")
    s = TrainSettings(model_name_or_path=model_name_or_path or user.get("model_name_or_path") or "")
    m = method or method_from_yaml(user) or s.method
    qbit = user.get("quantization_bit")
    if m == "qlora":
        qbit = qbit if qbit in (4, 8) else 4
    elif method is not None:
        qbit = None  # an explicit non-q method drops quantization
    s = replace(
        s,
        method=m,
        quantization_bit=qbit if m in ("lora", "qlora") else None,
        dataset=dataset or user.get("dataset") or s.dataset,
        dataset_dir=dataset_dir or user.get("dataset_dir") or s.dataset_dir,
        template=template or user.get("template") or default_template,
        cutoff_len=cutoff_len or user.get("cutoff_len") or d.get("cutoff_len") or s.cutoff_len,
        micro_batch=micro_batch or user.get("per_device_train_batch_size") or d.get("micro_batch") or s.micro_batch,
        grad_accum=grad_accum or user.get("gradient_accumulation_steps") or d.get("grad_accum") or s.grad_accum,
        lora_rank=lora_rank or user.get("lora_rank") or d.get("lora_rank") or s.lora_rank,
        output_dir=output_dir or user.get("output_dir") or s.output_dir,
        flash_attn=flash_attn or user.get("flash_attn") or d.get("flash_attn") or s.flash_attn,
        gradient_checkpointing=not user.get("disable_gradient_checkpointing", False),
        lora_target=str(user.get("lora_target") or "all"),
        freeze_trainable_layers=int(user.get("freeze_trainable_layers") or 2),
        optim=str(user.get("optim") or "adamw_torch"),
        precision=_precision(user, precision_supported),
    )
    if s.quantization_bit is not None and s.method == "lora":
        s = replace(s, method="qlora")
    return s


def _precision(user: dict, supported: str) -> str:
    """bf16 where the hardware has it, fp16 otherwise; an explicit fp16 in the YAML is kept
    (a YAML's bf16 on a card without it becomes fp16)."""
    return "fp16" if user.get("fp16") is True else supported
