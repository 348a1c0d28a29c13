"""Model spec: the shapes of a decoder-only transformer, from config.json or the catalog.

Second stage of the data flow.  Only ``config.json`` is read, never weights, so
this works on a login node with nothing but the model folder (or nothing at all,
for catalog names).  Parameter counts follow the Llama/Qwen2/Mistral module
layout in transformers: per layer q/k/v/o projections (q/k/v with a bias on
Qwen), a gated MLP (gate/up/down), two RMSNorms; then a final norm and an
lm_head that may share the embedding matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from dsplan.errors import UserError, excerpt, shorten
from dsplan.fsutil import check_path_text
from dsplan.inputs import catalog
from dsplan.inputs.reading import path_kind, read_json

#: Linear modules LLaMA-Factory's ``lora_target: all`` wraps in these architectures.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: model_type -> LLaMA-Factory template, for local folders.
_TEMPLATES = {"qwen2": "qwen", "qwen3": "qwen3", "llama": "llama3", "mistral": "mistral", "gemma2": "gemma"}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and parameter counts of one model."""

    name: str = field(metadata={"help": "catalog name or folder name"})
    model_type: str = field(metadata={"help": "config.json model_type"})
    hidden_size: int = field(metadata={"help": "model width"})
    intermediate_size: int = field(metadata={"help": "MLP width (per expert for MoE)"})
    num_layers: int = field(metadata={"help": "decoder layers"})
    num_heads: int = field(metadata={"help": "attention heads"})
    num_kv_heads: int = field(metadata={"help": "key/value heads (GQA)"})
    head_dim: int = field(metadata={"help": "per-head width"})
    vocab_size: int = field(metadata={"help": "embedding rows, padded as in config.json"})
    tie_word_embeddings: bool = field(metadata={"help": "lm_head shares the embedding matrix"})
    attention_bias: bool = field(default=False, metadata={"help": "q/k/v carry a bias"})
    num_experts: int = field(default=1, metadata={"help": "MoE experts per layer (1 = dense)"})
    template: str = field(default="default", metadata={"help": "LLaMA-Factory chat template"})
    path: str | None = field(default=None, metadata={"help": "local folder, if any"})
    hf_id: str | None = field(default=None, metadata={"help": "hub id, for catalog models"})
    source: str = field(default="", metadata={"help": "where the shapes came from"})

    # ---- shapes -----------------------------------------------------------
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every linear in one decoder layer (one expert)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        i = self.intermediate_size
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    # ---- parameter counts -------------------------------------------------
    @property
    def attn_params_per_layer(self) -> int:
        s = self.linear_shapes()
        n = sum(a * b for k, (a, b) in s.items() if k in ("q_proj", "k_proj", "v_proj", "o_proj"))
        if self.attention_bias:
            n += s["q_proj"][1] + s["k_proj"][1] + s["v_proj"][1]
        return n

    @property
    def mlp_params_per_layer(self) -> int:
        s = self.linear_shapes()
        dense = sum(a * b for k, (a, b) in s.items() if k in ("gate_proj", "up_proj", "down_proj"))
        router = self.hidden_size * self.num_experts if self.num_experts > 1 else 0
        return dense * self.num_experts + router

    @property
    def params_per_layer(self) -> int:
        return self.attn_params_per_layer + self.mlp_params_per_layer + 2 * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        return self.embedding_params + self.lm_head_params + self.num_layers * self.params_per_layer + self.hidden_size

    @property
    def linear_params(self) -> int:
        """Parameters inside the decoder's linear layers (what 4/8-bit quantization shrinks)."""
        s = self.linear_shapes()
        attn = sum(a * b for k, (a, b) in s.items() if k in ("q_proj", "k_proj", "v_proj", "o_proj"))
        return self.num_layers * (attn + self.mlp_params_per_layer)

    @property
    def largest_layer_params(self) -> int:
        """Largest single module (what ZeRO-3 must gather at once): the embedding or lm_head
        for every LLM here, else the largest linear."""
        biggest_linear = max(a * b for a, b in self.linear_shapes().values())
        return max(self.embedding_params, biggest_linear)

    def lora_params(self, rank: int, targets: tuple[str, ...] = LINEAR_NAMES) -> int:
        """Trainable LoRA parameters: rank x (in + out) for every targeted linear in every layer."""
        shapes = self.linear_shapes()
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise UserError(f"unknown lora_target module(s) {excerpt(', '.join(unknown))}: known are "
                            f"{', '.join(LINEAR_NAMES)}")
        per_layer = 0
        for t in targets:
            a, b = shapes[t]
            per_layer += rank * (a + b) * (self.num_experts if t in ("gate_proj", "up_proj", "down_proj") else 1)
        return self.num_layers * per_layer

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "model_type": self.model_type,
            "total_params": self.total_params,
            "params_per_layer": self.params_per_layer,
            "largest_layer_params": self.largest_layer_params,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "num_experts": self.num_experts,
            "template": self.template,
            "path": self.path,
            "hf_id": self.hf_id,
            "source": self.source,
        }


#: Bounds on the config.json numbers dsplan reads; the largest published LLMs are far
#: inside them, so a value outside is a broken or hostile file.
CONFIG_LIMITS = {
    "hidden_size": 1 << 20, "intermediate_size": 1 << 22, "moe_intermediate_size": 1 << 22,
    "num_hidden_layers": 10_000, "num_attention_heads": 1 << 16, "num_key_value_heads": 1 << 16,
    "head_dim": 1 << 16, "vocab_size": 1 << 24, "num_local_experts": 1 << 16, "num_experts": 1 << 16,
}
#: Longest model reference (--model or model_name_or_path) dsplan looks at.
MAX_MODEL_REF = 4096


def _config_int(cfg: dict, key: str, where: str, required: bool = True) -> int | None:
    """A positive integer of config.json within :data:`CONFIG_LIMITS`; None when absent, null
    or 0 and not ``required`` (the field's default applies)."""
    value = cfg.get(key)
    if value is None or (value == 0 and not required and not isinstance(value, bool)):
        if required:
            raise UserError(f"{where}: config.json lacks {key!r}; is this a decoder-only LLM?")
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: config.json has a non-numeric size {key}: {excerpt(value, 40)}")
    if value < 1:
        raise UserError(f"{where}: config.json has a zero or negative size {key}: {value}")
    if value > CONFIG_LIMITS[key]:
        raise UserError(f"{where}: config.json {key} is {excerpt(value, 40)}; at most {CONFIG_LIMITS[key]} "
                        "is supported")
    return value


def spec_from_config(cfg: dict, name: str, template: str | None = None, path: str | None = None,
                     source: str = "", hf_id: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a parsed config.json; every size is checked (:func:`_config_int`)."""
    where = shorten(source or name, 120)
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the LM config inside
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    hidden = _config_int(cfg, "hidden_size", where)
    heads = _config_int(cfg, "num_attention_heads", where)
    layers = _config_int(cfg, "num_hidden_layers", where)
    inter = _config_int(cfg, "moe_intermediate_size", where, required=False) or _config_int(
        cfg, "intermediate_size", where)
    vocab = _config_int(cfg, "vocab_size", where)
    kv = _config_int(cfg, "num_key_value_heads", where, required=False) or heads
    head_dim = _config_int(cfg, "head_dim", where, required=False) or hidden // heads
    if head_dim < 1:
        raise UserError(f"{where}: config.json has more attention heads ({heads}) than hidden_size ({hidden})")
    experts = (_config_int(cfg, "num_local_experts", where, required=False)
               or _config_int(cfg, "num_experts", where, required=False) or 1)
    model_type = cfg.get("model_type") or "unknown"
    if not isinstance(model_type, str) or not model_type.isprintable() or len(model_type) > 64:
        raise UserError(f"{where}: config.json model_type {excerpt(model_type, 40)} is not a short name")
    bias = bool(cfg.get("attention_bias", model_type in ("qwen2", "qwen2_moe")))
    tie = bool(cfg.get("tie_word_embeddings", False))
    return ModelSpec(
        name=name, model_type=model_type, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=tie,
        attention_bias=bias, num_experts=experts,
        template=template or _TEMPLATES.get(model_type, "default"), path=path, source=source, hf_id=hf_id,
    )


def _local_spec(model: str, p: Path) -> ModelSpec:
    """The spec of a local folder (or its config.json)."""
    folder = p.parent if p.name == "config.json" else p
    cfg_path = folder / "config.json"
    if path_kind(p) not in (None, "dir") and p.name != "config.json":
        raise UserError(f"--model {excerpt(model)} is a file; give the folder that holds config.json")
    if path_kind(folder) != "dir":
        raise UserError(f"model folder {excerpt(model)} does not exist")
    if path_kind(cfg_path) != "file":
        raise UserError(f"model folder {excerpt(str(folder))} has no config.json")
    resolved = str(folder.resolve())
    check_path_text(folder.name, "model folder")
    check_path_text(resolved, "model folder")
    where = shorten(str(cfg_path), 120)
    cfg = read_json(cfg_path, where)
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: expected a JSON object")
    hit = catalog.lookup(folder.name)
    template = hit[1]["template"] if hit else None
    return spec_from_config(cfg, name=folder.name, template=template, path=resolved, source=str(cfg_path))


def load_model_spec(model: str) -> ModelSpec:
    """Resolve ``--model``: a local folder holding config.json, or a catalog name."""
    if len(model) > MAX_MODEL_REF:
        raise UserError(f"--model {excerpt(model)} is {len(model)} characters; at most {MAX_MODEL_REF}")
    try:
        p = Path(model).expanduser()
    except RuntimeError:  # "~someone" with no such user
        p = Path(model)
    looks_like_path = path_kind(p) is not None or model.startswith((".", "~", "/")) or p.name == "config.json"
    if not looks_like_path and catalog.lookup(model) is None and "/" in model:
        looks_like_path = True  # "org/name" not in the catalog: most likely a folder typo
    if looks_like_path:
        return _local_spec(model, p)
    hit = catalog.lookup(model)
    if hit is None:
        names = ", ".join(catalog.CATALOG)
        raise UserError(f"unknown model {excerpt(model)}: give a local folder with config.json, or one of {names}")
    canon, entry = hit
    return spec_from_config(entry["config"], name=canon, template=entry["template"],
                            source=f"catalog: {entry['hf_id']}/config.json", hf_id=entry["hf_id"])
