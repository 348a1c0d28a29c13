"""Training settings: what the user asked for, merged from CLI flags, their LF YAML and defaults.

Precedence is flag > the user's LLaMA-Factory YAML > a preset's training block >
the default in ``dsplan.schema.lf``, key by key, driven by that table.  The
merged :class:`TrainSettings` is what the memory model and the renderer read;
the user's YAML itself is carried along so render can keep every key the user
set that dsplan does not manage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from dsplan.errors import UserError, excerpt, shorten
from dsplan.inputs.reading import path_kind, read_yaml
from dsplan.schema.lf import BY_FIELD, check_values

METHODS = ("lora", "qlora", "full", "freeze")


def _lf(name: str, **extra):
    """A settings field whose default and help come from its LLaMA-Factory key in the schema."""
    key = BY_FIELD[name]
    return field(default=extra.pop("default", key.default), metadata={"help": key.help, "lf_key": key.name})


@dataclass(frozen=True)
class TrainSettings:
    """One training run, as dsplan understands it: the merged answer of flags, YAML, preset and defaults."""

    model_name_or_path: str = field(metadata={"help": "written to the YAML as-is (hub id or folder)"})
    method: str = field(default="lora", metadata={"help": "lora, qlora (4-bit LoRA), full or freeze"})
    dataset: str = _lf("dataset")
    dataset_dir: str = _lf("dataset_dir")
    template: str = _lf("template", default="default")
    cutoff_len: int = _lf("cutoff_len")
    micro_batch: int = _lf("micro_batch")
    grad_accum: int = _lf("grad_accum")
    precision: str = field(default="bf16", metadata={"help": "bf16 or fp16 mixed precision, or fp32 (none)"})
    lora_rank: int = _lf("lora_rank")
    quantization_bit: int | None = _lf("quantization_bit")
    gradient_checkpointing: bool = field(default=True, metadata={"help": "LF enables it unless disabled"})
    lora_target: str = _lf("lora_target")
    freeze_trainable_layers: int = _lf("freeze_trainable_layers")
    optim: str = _lf("optim")
    output_dir: str = _lf("output_dir")
    flash_attn: str = _lf("flash_attn")

    @property
    def finetuning_type(self) -> str:
        return "lora" if self.method == "qlora" else self.method


#: A key of the user's YAML: a plain identifier, as LLaMA-Factory's dataclass fields are.
_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}", re.ASCII)


def load_user_yaml(path: str | Path) -> dict:
    """Read the user's LLaMA-Factory YAML; every problem is a one-line UserError."""
    where = shorten(str(path), 120)
    kind = path_kind(path)
    if kind != "file":
        raise UserError(f"LF YAML {where} " + ("does not exist" if kind is None else "is not a regular file"))
    data = read_yaml(path, where)
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"malformed YAML in {where}: expected a mapping of LLaMA-Factory arguments")
    for key in data:
        if not _KEY_RE.fullmatch(key):
            raise UserError(f"malformed YAML in {where}: key {excerpt(key)} is not a plain identifier "
                            "(ASCII letters, digits and _, at most 128 characters)")
    check_values(data, where=where)
    return data


def method_from_yaml(data: dict) -> str | None:
    ft = data.get("finetuning_type")
    if ft is None:
        return None
    if ft == "lora" and data.get("quantization_bit") in (4, 8):
        return "qlora"
    if ft == "oft":
        return "lora"  # same memory shape as LoRA for planning purposes
    return ft


def merge_settings(user: dict, *, model_name_or_path: str | None, default_template: str, precision_supported: str,
                   method: str | None = None, flags: dict | None = None, defaults: dict | None = None) -> TrainSettings:
    """Flags > the user's YAML > ``defaults`` (a preset's training block, by its key names) > the schema's
    defaults.  ``flags`` holds command-line values by settings field; ``precision_supported`` is the
    hardware's (bf16/fp16; fp32 on a CPU)."""
    flags, d = flags or {}, defaults or {}
    if method is not None and method not in METHODS:
        raise UserError(f"unknown --method {excerpt(method)}: choose one of {', '.join(METHODS)}")
    values: dict = {}
    for name, key in BY_FIELD.items():
        if name in ("model_name_or_path", "quantization_bit") or name not in _MERGED_FIELDS:
            continue  # set below by their own rules (finetuning_type follows the method)
        fallback = default_template if name == "template" else key.default
        values[name] = _first(flags.get(name), user.get(key.name), d.get(key.preset) if key.preset else None,
                              fallback)
    m = method or method_from_yaml(user) or "lora"
    qbit = user.get("quantization_bit")
    if m == "qlora":
        qbit = qbit if qbit in (4, 8) else 4
    elif method is not None:
        qbit = None  # an explicit non-q method drops quantization
    qbit = qbit if m in ("lora", "qlora") else None
    if qbit is not None and m == "lora":
        m = "qlora"
    return TrainSettings(
        model_name_or_path=model_name_or_path or user.get("model_name_or_path") or "", method=m,
        quantization_bit=qbit, gradient_checkpointing=not user.get("disable_gradient_checkpointing", False),
        precision=_precision(user, precision_supported), **values)


_MERGED_FIELDS = frozenset(f.name for f in fields(TrainSettings))


def _first(*candidates):
    """The first value that is set (the precedence order is the argument order)."""
    return next((c for c in candidates if c not in (None, "")), None)


def _precision(user: dict, supported: str) -> str:
    """bf16 where the hardware has it, fp16 otherwise; an explicit fp16 in the YAML is kept
    (a YAML's bf16 on a card without it becomes fp16)."""
    return "fp16" if user.get("fp16") is True else supported
