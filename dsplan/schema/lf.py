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
once.  Every other key must still be one LF's training parser accepts
(:func:`check_keys`, against the names shipped in ``lf_names.py``), and a YAML that
does not train is refused (:func:`check_training`).

Standard library only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from dsplan.errors import UserError, excerpt
from dsplan.estimate.workload import hf_default_optim
from dsplan.schema.lf_names import (EVAL_ONLY_KEYS, LF_VERSION, OLDER_TRANSFORMERS_ONLY_KEYS, OPTIM_NAMES,
                                   TRAIN_KEYS)

#: Sections of the rendered YAML, in order; keys without one are "kept from your YAML".
SECTIONS = ("model", "method", "dataset", "output", "train")

_NUMBER = (int, float)
#: Numbers LF reads as floats that dsplan's YAML reader (PyYAML, YAML 1.1) leaves as strings: LF loads the
#: YAML with OmegaConf, whose floats need neither a dot nor a signed exponent (``1e-4``, ``2.0e5``).  A
#: dot with a signed exponent is not here: PyYAML reads that as a float itself, so such a string was quoted.
_LF_ONLY_FLOAT = re.compile(r"[-+]?[0-9][0-9_]*(?:\.[0-9_]*[eE][0-9]+|[eE][-+]?[0-9]+)", re.ASCII)


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
    minimum: int | float | None = None  # smallest allowed number
    maximum: int | float | None = None  # largest allowed number (every number key has one, so typos stay small)

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
            number = self._lf_float(value)
            if number is None:
                raise UserError(f"{where}: {self.name}: expected {_type_name(self.type)}, got {excerpt(value)}")
            value = number
        if isinstance(value, (int, float)):
            self.check_range(value, where)

    def _lf_float(self, value: Any) -> float | None:
        """The float LF reads for a string such as ``1e-4`` (see :data:`_LF_ONLY_FLOAT`), on a float row
        dsplan never reads itself (its value goes to LF as written); None otherwise."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if (self.field is None and float in types and isinstance(value, str)
                and _LF_ONLY_FLOAT.fullmatch(value)):
            return float(value.replace("_", ""))
        return None

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
          section="model", field="quantization_bit", choices=(1, 2, 3, 4, 5, 6, 8)),
    LfKey("quantization_method", None, "On-the-fly quantization library (LF 0.9.5 quantizes with bnb, hqq and "
          "eetq only); dsplan writes bnb for QLoRA.", section="model", field="quantization_method", default="bnb",
          choices=("bnb", "gptq", "awq", "aqlm", "quanto", "eetq", "hqq", "mxfp4", "fp8")),
    # -- method
    LfKey("stage", None, "Training stage: pt, sft, rm (pairs), dpo (pairs; orpo/simpo via pref_loss), kto or "
          "ppo.", section="method", field="stage", default="sft",
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
    LfKey("preprocessing_num_workers", int, "Processes that tokenize the dataset.", section="dataset", minimum=1,
          maximum=100_000),
    # -- output
    LfKey("output_dir", str, "Where LLaMA-Factory writes checkpoints and logs.", section="output",
          field="output_dir", flag="--output-dir", default="saves/dsplan"),
    LfKey("logging_steps", _NUMBER, "Log every N steps.", section="output", default=10, maximum=10**12),
    LfKey("save_steps", _NUMBER, "Save a checkpoint every N steps (below 1: that fraction of the steps).",
          section="output", default=500, minimum=0, maximum=10**12),
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
    LfKey("learning_rate", _NUMBER, "Peak learning rate (dsplan's default: 1e-4 for LoRA, 1e-5 otherwise).",
          section="train", minimum=0, maximum=10),
    LfKey("num_train_epochs", _NUMBER, "Passes over the dataset.", section="train", default=3.0, minimum=0,
          maximum=1_000_000),
    LfKey("lr_scheduler_type", None, "Learning-rate schedule.", section="train", default="cosine"),
    LfKey("warmup_ratio", _NUMBER, "Fraction of steps spent warming up.", section="train", default=0.1, minimum=0,
          maximum=1),
    LfKey("bf16", bool, "bf16 mixed precision; dsplan sets it from the hardware.", section="train",
          managed=True),
    LfKey("fp16", bool, "fp16 mixed precision; dsplan sets it from the hardware.", section="train",
          managed=True),
    LfKey("pure_bf16", None, "bf16 without fp32 master weights; dsplan does not plan it and removes it.",
          managed=True),
    LfKey("fsdp", None, "FSDP sharding; transformers' Trainer refuses it beside deepspeed, so dsplan removes it.",
          managed=True),
    LfKey("fsdp_config", None, "FSDP's options; removed with fsdp.", managed=True),
    # -- read only: they change the estimate
    LfKey("disable_gradient_checkpointing", None, "Turn LLaMA-Factory's gradient checkpointing off.",
          default=False),
    LfKey("optim", str, "HF optimizer name (8-bit and paged variants change the memory); unset, HF's default for "
          "the installed torch: adamw_torch_fused from torch 2.8.", field="optim", default=hf_default_optim(),
          choices=OPTIM_NAMES),
    LfKey("do_eval", bool, "Evaluate during training (the evaluation's own memory is not estimated).",
          field="do_eval", default=False),
    LfKey("do_predict", bool, "Predict on the eval set; without do_train this is not a training config.",
          field="do_predict", default=False),
    LfKey("predict_with_generate", bool, "Generate at evaluation (SFT only; LF refuses it at ZeRO-3).",
          field="predict_with_generate", default=False),
    LfKey("resume_from_checkpoint", None, "Checkpoint folder to resume from; dsplan run sets it itself."),
    # -- read only: the stage's own models and losses
    LfKey("pref_loss", None, "DPO-stage loss: orpo and simpo need no reference model, the others do.",
          field="pref_loss", default="sigmoid", choices=("sigmoid", "hinge", "ipo", "kto_pair", "orpo", "simpo")),
    LfKey("pref_beta", _NUMBER, "Beta of the preference loss (no effect on memory).", maximum=1_000_000),
    LfKey("ref_model", str, "Reference model for DPO/KTO/PPO; given, LF loads it as a separate copy.",
          field="ref_model"),
    LfKey("ref_model_quantization_bit", None, "Bits of a quantized reference model (kept whole on every GPU).",
          field="ref_model_quantization_bit", choices=(4, 8)),
    LfKey("reward_model", str, "PPO's reward model: an adapter folder (lora), a model (full) or a URL (api).",
          field="reward_model"),
    LfKey("reward_model_type", None, "How PPO loads reward_model: an adapter on the policy, a copy, or an API.",
          field="reward_model_type", default="lora", choices=("lora", "full", "api")),
    LfKey("reward_model_quantization_bit", None, "Bits of a quantized full reward model.",
          field="reward_model_quantization_bit", choices=(4, 8)),
    LfKey("max_new_tokens", int, "PPO: tokens generated per response (<= 0: max_length is the total).",
          field="max_new_tokens", default=1024, maximum=10_000_000),
    LfKey("max_length", int, "PPO: total generated length when max_new_tokens <= 0.", field="max_length",
          default=1024, minimum=1, maximum=10_000_000),
    # -- read only: kernels, packing and the vocabulary
    LfKey("enable_liger_kernel", bool, "Liger kernels: for pt/sft on supported models the fused linear "
          "cross-entropy never builds the full logits.", field="enable_liger_kernel", default=False),
    LfKey("use_unsloth", bool, "Unsloth's LoRA kernels (not modelled: the estimate is plain transformers'); LF "
          "refuses it at ZeRO-3.", field="use_unsloth", default=False),
    LfKey("use_unsloth_gc", bool, "Unsloth's gradient checkpointing (not modelled).", field="use_unsloth_gc",
          default=False),
    LfKey("use_kt", bool, "KTransformers MoE backend (not modelled); LF refuses it at ZeRO-3.", field="use_kt",
          default=False),
    LfKey("packing", bool, "Pack samples into full cutoff_len sequences (dsplan always plans full sequences).",
          field="packing"),
    LfKey("neat_packing", bool, "Packing without cross-attention (SFT only): without fa2 LF builds a "
          "micro-batch x cutoff^2 attention mask.", field="neat_packing", default=False),
    LfKey("resize_vocab", bool, "Resize the embeddings; with LoRA LF then trains copies of them.",
          field="resize_vocab", default=False),
    LfKey("fp8", bool, "FP8 training (not modelled: estimated as 16-bit).", field="fp8", default=False),
    LfKey("torch_compile", bool, "torch.compile (not modelled).", field="torch_compile", default=False),
    # -- read only: what the adapter or freeze method trains
    LfKey("additional_target", str, "LoRA/OFT: modules trained in full besides the adapters (a copy each).",
          field="additional_target"),
    LfKey("use_dora", bool, "DoRA: a magnitude vector per adapted linear, its outputs saved, and a weight-norm "
          "workspace.", field="use_dora", default=False),
    LfKey("pissa_init", bool, "PiSSA adapter initialisation; LF refuses it at ZeRO-3.", field="pissa_init",
          default=False),
    LfKey("lora_dropout", _NUMBER, "LoRA dropout (above 0 its masks are not modelled).", field="lora_dropout",
          default=0.0, minimum=0, maximum=1),
    LfKey("adapter_name_or_path", str, "Adapters to load; more than one is refused at ZeRO-3.",
          field="adapter_name_or_path"),
    LfKey("oft_rank", int, "OFT: blocks per adapted linear (0: from oft_block_size).", field="oft_rank",
          default=0, minimum=0, maximum=65_536),
    LfKey("oft_block_size", int, "OFT: size of each orthogonal block.", field="oft_block_size", default=32,
          minimum=0, maximum=65_536),
    LfKey("freeze_trainable_modules", str, "Freeze tuning: the modules of the trained layers (all, self_attn, "
          "mlp, ...).", field="freeze_trainable_modules", default="all"),
    LfKey("freeze_extra_modules", str, "Freeze tuning: modules outside the layers trained too (embed_tokens, "
          "lm_head, norm).", field="freeze_extra_modules"),
    LfKey("use_llama_pro", bool, "LLaMA Pro block expansion (not modelled).", field="use_llama_pro",
          default=False),
    LfKey("freeze_vision_tower", bool, "Multimodal models: keep the vision tower frozen.",
          field="freeze_vision_tower", default=True),
    LfKey("freeze_multi_modal_projector", bool, "Multimodal models: keep the projector frozen.",
          field="freeze_multi_modal_projector", default=True),
    LfKey("freeze_language_model", bool, "Multimodal models: freeze the language model (LF 0.9.5's "
          "replacement for train_mm_proj_only).", field="freeze_language_model", default=False),
    LfKey("image_max_pixels", int, "Multimodal models: the largest image, in pixels.", field="image_max_pixels",
          default=768 * 768, minimum=1, maximum=1_000_000_000),
    # -- read only: not modelled; set to anything but LF's default (here), the plan says so
    LfKey("image_do_pan_and_scan", bool, "Gemma 3: crop images into more images (their tokens are not "
          "modelled).", default=False),
    LfKey("crop_to_patches", bool, "InternVL: crop images into patches (their tokens are not modelled).",
          default=False),
    LfKey("video_max_pixels", int, "Multimodal models: the largest video frame, in pixels (video tokens are not "
          "modelled).", default=256 * 256, minimum=1, maximum=1_000_000_000),
    LfKey("video_fps", _NUMBER, "Multimodal models: video frames sampled per second (not modelled).",
          default=2.0, minimum=0, maximum=1_000),
    LfKey("video_maxlen", int, "Multimodal models: the most frames sampled from a video (not modelled).",
          default=128, minimum=1, maximum=1_000_000),
    LfKey("use_audio_in_video", bool, "Omni models: the video's audio track too (not modelled).", default=False),
    LfKey("audio_sampling_rate", int, "Audio models: samples per second of audio inputs (not modelled).",
          default=16_000, minimum=1, maximum=10_000_000),
    LfKey("use_reentrant_gc", bool, "Reentrant gradient checkpointing (the estimate assumes LF's default, on).",
          default=True),
    LfKey("upcast_layernorm", bool, "Keep the layernorm weights in fp32 (not modelled).", default=False),
    LfKey("use_asft_loss", bool, "ASFT loss: LF loads a reference model beside the trained one (not modelled).",
          default=False),
    # -- read only: LF's own optimizers
    LfKey("use_galore", bool, "GaLore optimizer; LF refuses it with DeepSpeed.", field="use_galore", default=False),
    LfKey("use_apollo", bool, "APOLLO optimizer; LF refuses it with DeepSpeed.", field="use_apollo", default=False),
    LfKey("use_badam", bool, "BAdam optimizer: layer-wise needs ZeRO-3, ratio-wise is refused distributed.",
          field="use_badam", default=False),
    LfKey("badam_mode", None, "BAdam: layer-wise or ratio-wise.", field="badam_mode", default="layer",
          choices=("layer", "ratio")),
    LfKey("use_adam_mini", bool, "Adam-mini optimizer (fewer states; estimated as AdamW's).",
          field="use_adam_mini", default=False),
    LfKey("use_muon", bool, "Muon optimizer (fewer states; estimated as AdamW's).", field="use_muon",
          default=False),
)

BY_NAME: dict[str, LfKey] = {k.name: k for k in KEYS}
#: transformers 4's own FSDP keys (LF 0.9.5 also runs on transformers 4): removed with fsdp.
OLDER_FSDP_KEYS = ("fsdp_min_num_params", "fsdp_transformer_layer_cls_to_wrap")
#: Keys dsplan decides; the user's value is replaced, or removed where dsplan writes none.
MANAGED: tuple[str, ...] = tuple(k.name for k in KEYS if k.managed) + OLDER_FSDP_KEYS
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


#: Keys LF has dropped, with what replaced them (difflib cannot guess these).
RENAMED = {
    "train_mm_proj_only": "freeze_language_model: true with freeze_multi_modal_projector: false (LF 0.9.2 "
                          "renamed it)",
}
#: Keys that mark a YAML for `llamafactory-cli export` or `chat` rather than `train`.
_NOT_TRAINING = {"export_dir": "export", "infer_backend": "chat/api"}


def check_keys(data: dict, where: str, allow_extra: bool = False) -> list[str]:
    """Refuse, in one line, a key LLaMA-Factory's training parser does not define, with the closest
    name it does; a YAML for ``llamafactory-cli eval`` is "not a training config".  With
    ``allow_extra`` (LF's own ALLOW_EXTRA_ARGS) unknown keys are returned instead of refused."""
    evals = [k for k in data if k in _EVAL_ONLY]
    if evals and data.get("do_train") is not True:
        raise UserError(f"{where}: not a training config: {excerpt(evals[0])} is an argument of "
                        "`llamafactory-cli eval`; dsplan plans `llamafactory-cli train`")
    unknown = [k for k in data if k not in _TRAIN and k not in OLDER_TRANSFORMERS_ONLY_KEYS]
    if not unknown or allow_extra:
        return unknown
    key = unknown[0]
    more = f" (and {len(unknown) - 1} more unknown)" if len(unknown) > 1 else ""
    if key in RENAMED:
        raise UserError(f"{where}: unknown key {excerpt(key)}: use {RENAMED[key]}{more}")
    close = closest(key)
    hint = f" (did you mean {close}?)" if close else f": LLaMA-Factory {LF_VERSION} does not define it"
    raise UserError(f"{where}: unknown key {excerpt(key)}{hint}{more}")


def closest(key: str, names: tuple[str, ...] | list[str] | None = None) -> str | None:
    """The name of ``names`` (default: LF's argument names) most like ``key`` (a typo's likely meaning),
    if one is close."""
    import difflib

    found = difflib.get_close_matches(key, _TRAIN_SORTED if names is None else names, n=1, cutoff=0.7)
    return found[0] if found else None


def check_training(data: dict, where: str) -> None:
    """A YAML that does not train (predict, evaluate, export or chat) gets one line."""
    if data.get("do_train") is False:
        raise UserError(f"{where}: not a training config (do_train: false); dsplan plans training runs")
    if data.get("do_train") is not True and (data.get("do_predict") or data.get("do_eval")):
        what = "do_predict" if data.get("do_predict") else "do_eval"
        raise UserError(f"{where}: not a training config ({what} without do_train: true); dsplan plans "
                        "training runs")
    for key, command in _NOT_TRAINING.items():
        if data.get(key) is not None and data.get("do_train") is not True:
            raise UserError(f"{where}: not a training config ({key} is set: a `llamafactory-cli {command}` "
                            "YAML); dsplan plans training runs")
    if data.get("infer_backend") not in (None, "huggingface"):
        raise UserError(f"{where}: LLaMA-Factory {LF_VERSION} refuses this config: vLLM/SGLang backend is only "
                        "available for API, CLI and Web.")


_TRAIN = frozenset(TRAIN_KEYS)
_TRAIN_SORTED = sorted(TRAIN_KEYS)
_EVAL_ONLY = frozenset(EVAL_ONLY_KEYS)
