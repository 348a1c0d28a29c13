"""Model spec: the shapes of a decoder-only transformer, from config.json or the catalog.

Second stage of the data flow.  Only ``config.json`` is read, never weights, so
this works on a login node with nothing but the model folder (or nothing at all,
for catalog names).  Parameter counts follow the Llama/Qwen2/Mistral module
layout in transformers: per layer q/k/v/o projections (q/k/v with a bias on
Qwen), a gated MLP (gate/up/down), two RMSNorms; then a final norm and an
lm_head that may share the embedding matrix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dsplan.inputs import catalog
from dsplan.errors import UserError

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
            raise UserError(f"unknown lora_target module(s) {', '.join(unknown)}: known are {', '.join(LINEAR_NAMES)}")
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


def spec_from_config(cfg: dict, name: str, template: str | None = None, path: str | None = None,
                     source: str = "", hf_id: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a parsed config.json."""
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the LM config inside
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        inter = int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise UserError(f"{source or name}: config.json lacks {e.args[0]!r}; is this a decoder-only LLM?") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{source or name}: config.json has a non-numeric size ({e})") from None
    if min(hidden, heads, layers, inter, vocab) < 1:
        raise UserError(f"{source or name}: config.json has a zero or negative size")
    model_type = str(cfg.get("model_type", "unknown"))
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1)
    bias = bool(cfg.get("attention_bias", model_type in ("qwen2", "qwen2_moe")))
    tie = bool(cfg.get("tie_word_embeddings", False))
    return ModelSpec(
        name=name, model_type=model_type, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=tie,
        attention_bias=bias, num_experts=experts,
        template=template or _TEMPLATES.get(model_type, "default"), path=path, source=source, hf_id=hf_id,
    )


def load_model_spec(model: str) -> ModelSpec:
    """Resolve ``--model``: a local folder holding config.json, or a catalog name."""
    p = Path(model).expanduser()
    looks_like_path = p.exists() or model.startswith((".", "~", "/")) or p.name == "config.json"
    if not looks_like_path and catalog.lookup(model) is None and "/" in model:
        looks_like_path = True  # "org/name" not in the catalog: most likely a folder typo
    if looks_like_path:
        folder = p.parent if p.name == "config.json" else p
        cfg_path = folder / "config.json"
        if p.exists() and not p.is_dir() and p.name != "config.json":
            raise UserError(f"--model {model} is a file; give the folder that holds config.json")
        if not folder.is_dir():
            raise UserError(f"model folder {model} does not exist")
        if not cfg_path.is_file():
            raise UserError(f"model folder {folder} has no config.json")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{cfg_path}: not readable JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise UserError(f"{cfg_path}: expected a JSON object")
        template = None
        hit = catalog.lookup(folder.name)
        if hit:
            template = hit[1]["template"]
        return spec_from_config(cfg, name=folder.name, template=template, path=str(folder.resolve()),
                                source=str(cfg_path))
    hit = catalog.lookup(model)
    if hit is None:
        names = ", ".join(catalog.CATALOG)
        raise UserError(f"unknown model {model!r}: give a local folder with config.json, or one of {names}")
    canon, entry = hit
    return spec_from_config(entry["config"], name=canon, template=entry["template"],
                            source=f"catalog: {entry['hf_id']}/config.json", hf_id=entry["hf_id"])
