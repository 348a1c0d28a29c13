"""Every LLaMA-Factory training key dsplan reads or writes: one row each.

A row says what the key is (its type, allowed values, bounds), where it is
written in the rendered YAML (its section, in order), who decides it (dsplan,
or the user with dsplan's default), and what feeds it (a :class:`TrainSettings`
field, a command-line flag, a preset's ``training`` key).  The help text is the
documentation: ``dsplan plan --help`` shows it for every key that has a flag.

This one table drives the YAML checks (:func:`check_values`), the precedence
flag > the user's YAML > preset > default (``dsplan.inputs.settings``), the
rendered YAML (``dsplan.emit.render``) and the click options (``dsplan.cli``).
Allowed values follow LLaMA-Factory 0.9.5's ``hparams/`` dataclasses; LF itself
checks few of them before the run has loaded a model, so dsplan checks them at
once.

Standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dsplan.errors import UserError, excerpt

#: Sections of the rendered YAML, in order; keys without one are "kept from your YAML".
SECTIONS = ("model", "method", "dataset", "output", "train")

_NUMBER = (int, float)


@dataclass(frozen=True)
class LfKey:
    """One LLaMA-Factory key as dsplan understands it."""

    name: str
    type: type | tuple[type, ...] | None  # None: LLaMA-Factory's own parser checks it, dsplan does not
    help: str
    section: str | None = None  # heading it is written under; None: dsplan never writes it
    managed: bool = False  # dsplan decides the value; the user's is replaced (or removed)
    field: str | None = None  # the TrainSettings attribute it feeds or is read from
    flag: str | None = None  # the command-line flag that sets it
    preset: str | None = None  # the key in a preset's ``training`` block that sets it
    default: Any = None  # dsplan's default (None: no default, or a rule in Python decides)
    choices: tuple | None = None  # allowed values
    comma_list: bool = False  # a comma-separated list of choices
    minimum: int | None = None  # smallest allowed number
    maximum: int | None = None  # largest allowed number (every number key has one, so typos stay small)

    @property
    def settings_derived(self) -> bool:
        """The rendered value comes from the merged settings, so it beats the YAML's raw value."""
        return self.field is not None and self.section is not None

    def check(self, value: Any, where: str) -> None:
        """One clear line when ``value`` is not acceptable for this key."""
        if value is None or (self.type is None and self.choices is None):
            return
        if isinstance(value, bool) and self.type not in (bool, None):
            raise UserError(f"{where}: {self.name}: expected a {_type_name(self.type)}, got {excerpt(value)}")
        if self.choices is not None:
            values = [v.strip() for v in value.split(",")] if self.comma_list and isinstance(value, str) else [value]
            for v in values:
                if v not in self.choices:
                    raise UserError(f"{where}: {self.name}: {excerpt(value)} is not one of "
                                    f"{', '.join(map(str, self.choices))}")
            return
        if self.type is not None and not isinstance(value, self.type):
            raise UserError(f"{where}: {self.name}: expected {_type_name(self.type)}, got {excerpt(value)}")
        if isinstance(value, (int, float)):
            self.check_range(value, where)

    def check_range(self, value: int | float, where: str) -> None:
        """Finite, and within the row's minimum and maximum."""
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{where}: {self.name}: must be a finite number, got {value}")
        if self.minimum is not None and value < self.minimum:
            raise UserError(f"{where}: {self.name}: must be at least {self.minimum}, got {excerpt(value, 40)}")
        if self.maximum is not None and value > self.maximum:
            raise UserError(f"{where}: {self.name}: must be at most {self.maximum}, got {excerpt(value, 40)}")


def _type_name(typ) -> str:
    return typ.__name__ if isinstance(typ, type) else "number"


KEYS: tuple[LfKey, ...] = (
    # -- model
    LfKey("model_name_or_path", str, "Local model folder (config.json is enough) or a catalog name.",
          section="model", field="model_name_or_path", flag="--model"),
    LfKey("trust_remote_code", None, "Let transformers run the model repository's own code.", section="model"),
    LfKey("flash_attn", None, "Attention kernel; dsplan picks sdpa where no FlashAttention-2 build is known.",
          section="model", field="flash_attn", preset="flash_attn", default="auto",
          choices=("auto", "disabled", "sdpa", "fa2", "fa3")),
    LfKey("quantization_bit", None, "Bits of the quantized base weights (4 or 8 make LoRA a QLoRA).",
          section="model", field="quantization_bit", choices=(2, 3, 4, 5, 6, 8)),
    LfKey("quantization_method", None, "Quantization library; dsplan writes bnb for QLoRA.", section="model",
          default="bnb", choices=("bnb", "gptq", "awq", "aqlm", "quanto", "eetq", "hqq", "mxfp4", "fp8")),
    # -- method
    LfKey("stage", None, "Training stage.", section="method", default="sft",
          choices=("pt", "sft", "rm", "ppo", "dpo", "kto")),
    LfKey("do_train", bool, "Train (as opposed to evaluate or predict).", section="method", default=True),
    LfKey("finetuning_type", None, "What is trained: LoRA adapters, frozen-but-last layers, or everything.",
          section="method", field="finetuning_type", choices=("lora", "oft", "freeze", "full")),
    LfKey("lora_rank", int, "LoRA rank.", section="method", field="lora_rank", flag="--lora-rank",
          preset="lora_rank", default=8, minimum=1, maximum=65_536),
    LfKey("lora_target", str, "Modules that get adapters: all (every linear layer) or a comma list.",
          section="method", field="lora_target", default="all"),
    LfKey("deepspeed", str, "Path of the DeepSpeed JSON; dsplan points it at the tier's file.",
          section="method", managed=True),
    LfKey("freeze_trainable_layers", int, "Freeze tuning: N > 0 trains the last N layers, N < 0 the first -N.",
          field="freeze_trainable_layers", default=2, minimum=-10_000, maximum=10_000),
    # -- dataset
    LfKey("dataset", str, "LLaMA-Factory dataset name(s), comma separated.", section="dataset",
          field="dataset", flag="--dataset", default="alpaca_en_demo"),
    LfKey("dataset_dir", str, "Folder that holds dataset_info.json.", section="dataset", field="dataset_dir",
          flag="--dataset-dir", default="data"),
    LfKey("template", str, "Chat template (default: the model's).", section="dataset", field="template",
          flag="--template"),
    LfKey("cutoff_len", int, "Tokens per sample after truncation.", section="dataset", field="cutoff_len",
          flag="--cutoff-len", preset="cutoff_len", default=2048, minimum=1, maximum=10_000_000),
    LfKey("max_samples", None, "Use at most this many samples of each dataset.", section="dataset"),
    LfKey("preprocessing_num_workers", None, "Processes that tokenize the dataset.", section="dataset"),
    # -- output
    LfKey("output_dir", str, "Where LLaMA-Factory writes checkpoints and logs.", section="output",
          field="output_dir", flag="--output-dir", default="saves/dsplan"),
    LfKey("logging_steps", _NUMBER, "Log every N steps.", section="output", default=10, maximum=10**12),
    LfKey("save_steps", None, "Save a checkpoint every N steps.", section="output", default=500),
    LfKey("plot_loss", None, "Save a loss curve at the end.", section="output", default=True),
    LfKey("report_to", None, "Experiment trackers.", section="output", default="none",
          choices=("none", "all", "tensorboard", "wandb", "swanlab", "mlflow", "trackio"), comma_list=True),
    # -- train
    LfKey("per_device_train_batch_size", int, "Micro-batch: samples per GPU per step.", section="train",
          managed=True, field="micro_batch", flag="--micro-batch", preset="micro_batch", default=1, minimum=1,
          maximum=1_000_000),
    LfKey("gradient_accumulation_steps", int, "Micro-batches per optimizer step.", section="train",
          managed=True, field="grad_accum", flag="--grad-accum", preset="grad_accum", default=8, minimum=1,
          maximum=1_000_000),
    LfKey("learning_rate", None, "Peak learning rate (dsplan's default: 1e-4 for LoRA, 1e-5 otherwise).",
          section="train"),
    LfKey("num_train_epochs", None, "Passes over the dataset.", section="train", default=3.0),
    LfKey("lr_scheduler_type", None, "Learning-rate schedule.", section="train", default="cosine"),
    LfKey("warmup_ratio", None, "Fraction of steps spent warming up.", section="train", default=0.1),
    LfKey("bf16", bool, "bf16 mixed precision; dsplan sets it from the hardware.", section="train",
          managed=True),
    LfKey("fp16", bool, "fp16 mixed precision; dsplan sets it from the hardware.", section="train",
          managed=True),
    LfKey("pure_bf16", None, "bf16 without fp32 master weights; dsplan does not plan it and removes it.",
          managed=True),
    # -- read only: they change the estimate
    LfKey("disable_gradient_checkpointing", None, "Turn LLaMA-Factory's gradient checkpointing off.",
          default=False),
    LfKey("optim", str, "HF optimizer name (8-bit and paged variants change the memory).", field="optim",
          default="adamw_torch"),
    LfKey("do_eval", None, "Evaluate during training."),
    LfKey("resume_from_checkpoint", None, "Checkpoint folder to resume from; dsplan run sets it itself."),
)

BY_NAME: dict[str, LfKey] = {k.name: k for k in KEYS}
#: Keys dsplan decides; the user's value is replaced, or removed where dsplan writes none.
MANAGED: tuple[str, ...] = tuple(k.name for k in KEYS if k.managed)
#: The key that feeds each TrainSettings field.
BY_FIELD: dict[str, LfKey] = {k.field: k for k in KEYS if k.field}
#: The keys that have a command-line flag, in table order.
FLAGGED: tuple[LfKey, ...] = tuple(k for k in KEYS if k.flag)
#: The keys a preset's ``training`` block may set, by the preset's name for them.
BY_PRESET: dict[str, LfKey] = {k.preset: k for k in KEYS if k.preset}


def section_keys(section: str) -> tuple[str, ...]:
    """The keys written under ``section``, in table order."""
    return tuple(k.name for k in KEYS if k.section == section)


def check_values(data: dict, where: str) -> None:
    """dsplan's type, range and allowed-value checks for the LF keys it knows."""
    for name, value in data.items():
        key = BY_NAME.get(name)
        if key is not None:
            key.check(value, where)
