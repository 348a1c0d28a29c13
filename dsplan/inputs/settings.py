"""Training settings: what the user asked for, merged from CLI flags, their LF YAML and defaults.

Precedence is flag > the user's LLaMA-Factory YAML > a preset's training block >
the default in ``dsplan.schema.lf``, key by key, driven by that table.  The
merged :class:`TrainSettings` is what the memory model and the renderer read;
the user's YAML itself is carried along so render can keep every key the user
set that dsplan does not manage.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from dsplan.errors import UserError, excerpt, shorten
from dsplan.inputs.reading import path_kind, read_yaml
from dsplan.schema.lf import BY_FIELD, BY_NAME, MANAGED, check_keys, check_training, check_values, closest
from dsplan.schema.lf_names import LF_VERSION, OLDER_TRANSFORMERS_ONLY_KEYS, TEMPLATE_NAMES, TRAIN_KEYS

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
    quantization_method: str = _lf("quantization_method")
    adapter: str = field(default="lora", metadata={"help": "lora or oft: the adapter a lora/qlora method trains"})
    # the stage and its models
    stage: str = _lf("stage")
    pref_loss: str = _lf("pref_loss")
    ref_model: str | None = _lf("ref_model")
    ref_model_quantization_bit: int | None = _lf("ref_model_quantization_bit")
    reward_model: str | None = _lf("reward_model")
    reward_model_type: str = _lf("reward_model_type")
    reward_model_quantization_bit: int | None = _lf("reward_model_quantization_bit")
    max_new_tokens: int = _lf("max_new_tokens")
    max_length: int = _lf("max_length")
    do_eval: bool = _lf("do_eval")
    do_predict: bool = _lf("do_predict")
    predict_with_generate: bool = _lf("predict_with_generate")
    # kernels, packing, vocabulary
    enable_liger_kernel: bool = _lf("enable_liger_kernel")
    use_unsloth: bool = _lf("use_unsloth")
    use_unsloth_gc: bool = _lf("use_unsloth_gc")
    use_kt: bool = _lf("use_kt")
    packing: bool | None = _lf("packing")
    neat_packing: bool = _lf("neat_packing")
    resize_vocab: bool = _lf("resize_vocab")
    fp8: bool = _lf("fp8")
    torch_compile: bool = _lf("torch_compile")
    # what the adapter or freeze method trains
    additional_target: str | None = _lf("additional_target")
    use_dora: bool = _lf("use_dora")
    pissa_init: bool = _lf("pissa_init")
    lora_dropout: float = _lf("lora_dropout")
    adapter_name_or_path: str | None = _lf("adapter_name_or_path")
    oft_rank: int = _lf("oft_rank")
    oft_block_size: int = _lf("oft_block_size")
    freeze_trainable_modules: str = _lf("freeze_trainable_modules")
    freeze_extra_modules: str | None = _lf("freeze_extra_modules")
    use_llama_pro: bool = _lf("use_llama_pro")
    freeze_vision_tower: bool = _lf("freeze_vision_tower")
    freeze_multi_modal_projector: bool = _lf("freeze_multi_modal_projector")
    freeze_language_model: bool = _lf("freeze_language_model")
    image_max_pixels: int = _lf("image_max_pixels")
    # LF's own optimizers
    use_galore: bool = _lf("use_galore")
    use_apollo: bool = _lf("use_apollo")
    use_badam: bool = _lf("use_badam")
    badam_mode: str = _lf("badam_mode")
    use_adam_mini: bool = _lf("use_adam_mini")
    use_muon: bool = _lf("use_muon")
    unknown_keys: tuple[str, ...] = field(default=(), metadata={
        "help": "keys LF does not define, kept because ALLOW_EXTRA_ARGS is set (LF then ignores them)"})
    unmodelled_keys: tuple[str, ...] = field(default=(), metadata={
        "help": "LF keys set in the YAML that change memory in ways the estimate does not model"})
    older_transformers_keys: tuple[str, ...] = field(default=(), metadata={
        "help": "keys only the older transformers LF supports accepts (the newest refuses them)"})

    @property
    def finetuning_type(self) -> str:
        if self.method in ("lora", "qlora"):
            return self.adapter
        return self.method


#: LF keys dsplan does not read that change memory when set to anything but LF's default (the schema row's
#: default where the key has a row, else None/False): the estimate warns about them.
UNMODELLED_KEYS = ("mixture_of_depths", "shift_attn", "upcast_lmhead_output", "upcast_layernorm", "use_reentrant_gc",
                   "video_max_pixels", "video_fps", "video_maxlen", "use_audio_in_video", "audio_sampling_rate",
                   "image_do_pan_and_scan", "crop_to_patches", "use_asft_loss")
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
            if not any(k in TRAIN_KEYS for k in data):  # e.g. LF's extras/multi_tokens/tokens_cfg.yaml
                raise UserError(f"{where}: not a LLaMA-Factory training config: none of its keys is an argument "
                                f"of LLaMA-Factory {LF_VERSION} ({excerpt(key, 60)} is not a plain identifier)")
            raise UserError(f"malformed YAML in {where}: key {excerpt(key)} is not a plain identifier "
                            "(ASCII letters, digits and _, at most 128 characters)")
    check_keys(data, where, allow_extra=_env_enabled("ALLOW_EXTRA_ARGS"))
    check_values(data, where=where)
    check_training(data, where)
    return data


def _env_enabled(name: str) -> bool:
    """LF's own reading of a switch in the environment (``is_env_enabled``)."""
    return os.environ.get(name, "0").lower() in ("true", "y", "1")


def method_from_yaml(data: dict) -> str | None:
    ft = data.get("finetuning_type")
    if ft is None:
        return None
    if ft == "lora" and data.get("quantization_bit") in (4, 8):
        return "qlora"
    if ft == "oft":  # an adapter method like LoRA (settings.adapter keeps "oft")
        return "qlora" if data.get("quantization_bit") in (4, 8) else "lora"
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
    check_template(values["template"])
    m = method or method_from_yaml(user) or "lora"
    qbit = user.get("quantization_bit")
    if m == "qlora":
        qbit = qbit if qbit in (4, 8) else 4
    elif method is not None:
        qbit = None  # an explicit non-q method drops quantization
    qbit = qbit if m in ("lora", "qlora") else None
    if qbit is not None and m == "lora":
        m = "qlora"
    adapter = "oft" if user.get("finetuning_type") == "oft" and method is None else "lora"
    settings = TrainSettings(
        model_name_or_path=model_name_or_path or user.get("model_name_or_path") or "", method=m,
        quantization_bit=qbit, gradient_checkpointing=not user.get("disable_gradient_checkpointing", False),
        precision=_precision(user, precision_supported), adapter=adapter,
        unknown_keys=tuple(k for k in user if k not in TRAIN_KEYS and k not in OLDER_TRANSFORMERS_ONLY_KEYS),
        older_transformers_keys=tuple(k for k in user if k in OLDER_TRANSFORMERS_ONLY_KEYS and k not in MANAGED),
        unmodelled_keys=_unmodelled(user), **values)
    check_lf_rules(settings)
    return settings


_MERGED_FIELDS = frozenset(f.name for f in fields(TrainSettings))


def _unmodelled(user: dict) -> tuple[str, ...]:
    """The :data:`UNMODELLED_KEYS` the user's YAML sets to something other than LF's default."""
    out = []
    for name in UNMODELLED_KEYS:
        default = BY_NAME[name].default if name in BY_NAME else None
        if user.get(name) not in ((None, False) if default in (None, False) else (None, default)):
            out.append(name)
    return tuple(out)


def check_template(name: str | None) -> None:
    """One line for a chat template LF does not register (LF stops with "Template X does not exist.")."""
    if name is None or name in TEMPLATE_NAMES:
        return
    close = closest(name, TEMPLATE_NAMES) if isinstance(name, str) else None
    raise UserError(f"LLaMA-Factory {LF_VERSION} has no template {excerpt(name)}"
                    + (f" (did you mean {close}?)" if close else ": LF stops with \"Template "
                       f"{shorten(str(name), 60)} does not exist.\""))


def _first(*candidates):
    """The first value that is set (the precedence order is the argument order)."""
    return next((c for c in candidates if c not in (None, "")), None)


def _precision(user: dict, supported: str) -> str:
    """bf16 where the hardware has it, fp16 otherwise; an explicit fp16 in the YAML is kept
    (a YAML's bf16 on a card without it becomes fp16)."""
    return "fp16" if user.get("fp16") is True else supported


# ---------------------------------------------------------------- LF's refusals of a whole config
def _lf_refusals(s: TrainSettings) -> list[tuple[bool, str]]:
    """(condition, LF 0.9.5's own message) for the checks its argument parser makes whatever the
    DeepSpeed tier (``hparams/parser.py`` and ``FinetuningArguments.__post_init__``)."""
    ft, quantized = s.finetuning_type, s.quantization_bit is not None
    optimizers = int(s.use_galore) + int(s.use_apollo) + int(s.use_badam)
    uses_ref = s.stage == "dpo" and s.pref_loss not in ("orpo", "simpo")
    return [
        (s.stage != "sft" and s.predict_with_generate, "`predict_with_generate` cannot be set as True except SFT."),
        (s.stage != "sft" and s.neat_packing, "`neat_packing` cannot be set as True except SFT."),
        (s.stage == "ppo" and not s.reward_model, "`reward_model` is necessary for PPO training."),
        (s.stage == "ppo" and s.reward_model_type == "lora" and ft != "lora",
         "`reward_model_type` cannot be lora for Freeze/Full PPO training."),
        (s.stage == "ppo" and s.reward_model_type == "lora" and s.use_unsloth,
         "Unsloth does not support lora reward model."),
        (ft == "lora" and optimizers > 0, "Cannot use LoRA with GaLore, APOLLO or BAdam together."),
        (optimizers > 1, "Cannot use GaLore, APOLLO or BAdam together."),
        (ft != "lora" and s.use_dora, "`use_dora` is only valid for LoRA training."),
        (ft != "lora" and s.pissa_init, "`pissa_init` is only valid for LoRA training."),
        (s.pissa_init and (s.stage in ("ppo", "kto") or uses_ref), "Cannot use PiSSA for current training stage."),
        (quantized and s.resize_vocab, "Cannot resize embedding layers of a quantized model."),
        (quantized and s.pissa_init, "Please use scripts/pissa_init.py to initialize PiSSA for a quantized model."),
        (s.use_llama_pro and ft == "full", "`use_llama_pro` is only valid for Freeze or LoRA training."),
        (s.use_unsloth and ft == "oft", "Unsloth is currently not supported for OFT."),
        (s.fp8 and quantized, "FP8 training is not compatible with quantization. Please disable one of them."),
    ]


def check_lf_rules(settings: TrainSettings) -> None:
    """One line when LLaMA-Factory would refuse the merged config on every tier."""
    for refused, message in _lf_refusals(settings):
        if refused:
            raise UserError(f"LLaMA-Factory {LF_VERSION} refuses this config: {message}")
