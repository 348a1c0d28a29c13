"""Model spec: the shapes of a decoder-only transformer, from config.json or the catalog.

Second stage of the data flow.  Only ``config.json`` is read, never weights, so
this works on a login node with nothing but the model folder (or nothing at all,
for catalog names and hub ids in the local Hugging Face cache).

Parameter counts follow the module layout transformers 5 builds (the version
LLaMA-Factory 0.9.5 installs with; its range is 4.55-5.6):

- per decoder layer, attention: q/k/v/o projections (q/k/v with a bias where the
  config says so; one fused ``qkv_proj``/``wqkv``/``query_key_value`` in Phi-3,
  InternLM2 and ChatGLM), per-head q/k norms (Qwen3, Gemma 3), or DeepSeek's
  multi-head latent attention (low-rank q and kv projections with their norms);
- the MLP: gated gate/up/down (``gate_up_proj`` fused in Phi-3 and GLM-4), or in
  MoE layers a router, the routed experts and any shared expert.  transformers 5
  stores the routed experts of its own MoE models as two fused 3-D tensors
  (``gate_up_proj``, ``down_proj``), which are not ``nn.Linear``: bitsandbytes does
  not quantize them, LLaMA-Factory's ``lora_target: all`` does not wrap them, and
  ZeRO-3 gathers them as one module.  Architectures loaded with
  ``trust_remote_code`` (deepseek-moe-16b) keep one ``nn.Linear`` per expert;
- two RMSNorms per layer (four in Gemma 2/3 and GLM-4), a final norm, and an
  lm_head that may share the embedding matrix;
- for vision-language models, the vision tower and its projector into the LM
  (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3's SigLIP, Llama 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from dsplan.errors import UserError, excerpt, shorten
from dsplan.fsutil import check_path_text
from dsplan.inputs import catalog, hfcache
from dsplan.inputs.reading import path_kind, read_json

#: Linear modules LLaMA-Factory's ``lora_target: all`` wraps in Llama-style architectures.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: model_type -> LLaMA-Factory 0.9.5 template, for local folders and cached hub ids
#: (the catalog names its own; LF's ``extras/constants.py`` pairs models and templates).
_TEMPLATES = {
    "qwen2": "qwen", "qwen2_moe": "qwen", "qwen3": "qwen3", "qwen3_moe": "qwen3", "llama": "llama3",
    "mistral": "mistral", "mixtral": "mistral", "gemma2": "gemma2", "gemma3_text": "gemma2", "gemma3": "gemma3",
    "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl",
    "llama4": "llama4", "deepseek": "deepseek", "deepseek_v2": "deepseek", "deepseek_v3": "deepseek3",
    "glm4": "glm4", "chatglm": "glm4", "phi3": "phi", "internlm2": "intern2",
}

#: MoE model types whose routed experts transformers 5.6 stores as fused 3-D tensors.
FUSED_EXPERT_TYPES = frozenset({
    "afmoe", "deepseek_v2", "deepseek_v3", "dots1", "ernie4_5_moe", "ernie4_5_vl_moe", "exaone_moe", "flex_olmo",
    "gemma4", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa", "gpt_oss", "hunyuan_v1_moe", "jamba",
    "lfm2_moe", "llama4", "minimax", "minimax_m2", "mistral4", "mixtral", "nemotron_h", "olmoe", "phimoe",
    "qwen2_moe", "qwen3_5_moe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_vl_moe",
})
#: MoE model types whose router is a plain ``nn.Linear`` named ``gate`` (LF's ``all`` wraps it).
ROUTER_LINEAR_TYPES = frozenset({"afmoe", "deepseek_v2", "lfm2_moe", "phimoe"})
#: Model types with a per-head RMSNorm on q and k (``q_norm``/``k_norm``, head_dim each).
QK_NORM_TYPES = frozenset({"qwen3", "qwen3_moe", "qwen3_vl", "qwen3_vl_moe", "gemma3", "gemma3_text"})
#: Model types with four norms per decoder layer (pre/post attention and pre/post MLP).
FOUR_NORM_TYPES = frozenset({"gemma2", "gemma3", "gemma3_text", "glm4"})

#: Module names of the decoder's linears per layout: (q/k/v, o, MLP); one name for q/k/v
#: or two for the MLP means those projections are fused into one ``nn.Linear``.
LAYOUTS = {
    "llama": (("q_proj", "k_proj", "v_proj"), "o_proj", ("gate_proj", "up_proj", "down_proj")),
    "phi3": (("qkv_proj",), "o_proj", ("gate_up_proj", "down_proj")),
    "glm4": (("q_proj", "k_proj", "v_proj"), "o_proj", ("gate_up_proj", "down_proj")),
    "chatglm": (("query_key_value",), "dense", ("dense_h_to_4h", "dense_4h_to_h")),
    "internlm2": (("wqkv",), "wo", ("w1", "w3", "w2")),
}
_LAYOUT_OF_TYPE = {"phi3": "phi3", "phi3_v": "phi3", "glm4": "glm4", "chatglm": "chatglm", "internlm2": "internlm2"}

#: Defaults transformers fills in for keys a config.json may leave out (Gemma 3's
#: config.json names only a few; the class defaults are gemma-3-4b's shapes).
_TYPE_DEFAULTS = {
    "gemma3_text": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256},
    "gemma2": {"head_dim": 256},
    "siglip_vision_model": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                            "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
}
#: Whether lm_head shares the embedding when config.json does not say (transformers' class defaults).
_TIED_BY_DEFAULT = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


@dataclass(frozen=True)
class MoE:
    """The mixture-of-experts part of a model."""

    experts: int = field(metadata={"help": "routed experts in each MoE layer"})
    top_k: int = field(metadata={"help": "routed experts each token goes to"})
    expert_width: int = field(metadata={"help": "MLP width of one routed expert"})
    layers: tuple[int, ...] = field(metadata={"help": "indices of the MoE layers; the others are dense"})
    shared_width: int = field(default=0, metadata={"help": "MLP width of the shared expert(s), 0 if none"})
    shared_gate: bool = field(default=False, metadata={"help": "a Linear(h, 1) scales the shared expert"})
    fused: bool = field(default=True, metadata={"help": "routed experts are fused tensors, not nn.Linear"})
    router_linear: bool = field(default=False, metadata={"help": "the router is an nn.Linear named 'gate'"})

    def to_dict(self) -> dict:
        return {"experts": self.experts, "top_k": self.top_k, "expert_width": self.expert_width,
                "moe_layers": len(self.layers), "shared_width": self.shared_width, "fused": self.fused}


@dataclass(frozen=True)
class MLA:
    """DeepSeek's multi-head latent attention: low-rank q and kv projections."""

    q_lora_rank: int = field(metadata={"help": "rank of q's down-projection; 0: one q_proj"})
    kv_lora_rank: int = field(metadata={"help": "rank of the joint kv down-projection"})
    qk_nope_head_dim: int = field(metadata={"help": "per-head q/k width without RoPE"})
    qk_rope_head_dim: int = field(metadata={"help": "per-head q/k width with RoPE (k's is shared)"})
    v_head_dim: int = field(metadata={"help": "per-head value width"})


@dataclass(frozen=True)
class Vision:
    """A vision-language model's image side: the tower and its projector into the LM."""

    model_type: str = field(metadata={"help": "vision_config model_type, or the family it was read as"})
    tower_params: int = field(metadata={"help": "encoder parameters (patch embedding, blocks, norms)"})
    projector_params: int = field(metadata={"help": "merger/projector parameters into the LM"})
    depth: int = field(metadata={"help": "encoder blocks"})
    hidden_size: int = field(metadata={"help": "encoder width"})
    intermediate_size: int = field(metadata={"help": "encoder MLP width"})
    num_heads: int = field(metadata={"help": "encoder attention heads"})
    patch_size: int = field(metadata={"help": "pixels per patch side"})
    spatial_merge_size: int = field(default=1, metadata={"help": "patches merged per side into one LM token"})
    temporal_patch_size: int = field(default=1, metadata={"help": "video frames per patch"})
    image_size: int | None = field(default=None, metadata={"help": "fixed input side in pixels; None: dynamic"})
    tokens_per_image: int | None = field(default=None, metadata={"help": "fixed LM tokens per image, if fixed"})
    linear_params: int = field(default=0, metadata={"help": "weights of its nn.Linear modules (bnb quantizes them)"})

    @property
    def params(self) -> int:
        return self.tower_params + self.projector_params

    def image_tokens(self, max_pixels: int) -> int:
        """LM tokens one image becomes, at most: the fixed count of a fixed-size tower, else the
        patches of an image LF resized to ``max_pixels`` (``image_max_pixels``) merged
        ``spatial_merge_size``-squared into one token (Qwen2-VL: 768 x 768 -> 752).  0 for Llama 4,
        whose image processor cuts an image into a variable number of tiles that config.json does not
        bound (its datasets then plan at cutoff_len)."""
        if self.model_type == "llama4_vision_model":
            return 0
        if self.tokens_per_image:
            return self.tokens_per_image
        if self.image_size:
            return (self.image_size // self.patch_size) ** 2 // self.spatial_merge_size ** 2
        return max_pixels // self.patch_size ** 2 // self.spatial_merge_size ** 2

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "tower_params": self.tower_params,
                "projector_params": self.projector_params, "depth": self.depth, "hidden_size": self.hidden_size,
                "patch_size": self.patch_size, "spatial_merge_size": self.spatial_merge_size,
                "temporal_patch_size": self.temporal_patch_size, "image_size": self.image_size,
                "tokens_per_image": self.tokens_per_image}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and parameter counts of one model."""

    name: str = field(metadata={"help": "catalog name or folder name"})
    model_type: str = field(metadata={"help": "config.json model_type"})
    hidden_size: int = field(metadata={"help": "model width"})
    intermediate_size: int = field(metadata={"help": "MLP width of the dense layers"})
    num_layers: int = field(metadata={"help": "decoder layers"})
    num_heads: int = field(metadata={"help": "attention heads"})
    num_kv_heads: int = field(metadata={"help": "key/value heads (GQA)"})
    head_dim: int = field(metadata={"help": "per-head width"})
    vocab_size: int = field(metadata={"help": "embedding rows, padded as in config.json"})
    tie_word_embeddings: bool = field(metadata={"help": "lm_head shares the embedding matrix"})
    attention_bias: bool = field(default=False, metadata={"help": "q/k/v carry a bias"})
    num_experts: int = field(default=1, metadata={"help": "routed experts per MoE layer (1 = dense)"})
    template: str = field(default="default", metadata={"help": "LLaMA-Factory chat template"})
    path: str | None = field(default=None, metadata={"help": "local folder, if any"})
    hf_id: str | None = field(default=None, metadata={"help": "hub id, for catalog models and cached hub ids"})
    source: str = field(default="", metadata={"help": "where the shapes came from"})
    moe: MoE | None = field(default=None, metadata={"help": "mixture-of-experts layout, None when dense"})
    mla: MLA | None = field(default=None, metadata={"help": "latent attention (DeepSeek V2/V3), else None"})
    vision: Vision | None = field(default=None, metadata={"help": "vision tower of a VLM, else None"})
    qk_norm: bool = field(default=False, metadata={"help": "per-head RMSNorm on q and k"})
    norms_per_layer: int = field(default=2, metadata={"help": "RMSNorms in each decoder layer"})
    layout: str = field(default="llama", metadata={"help": "module naming, a key of LAYOUTS"})
    warnings: tuple[str, ...] = field(default=(), metadata={"help": "parts of config.json not modelled"})
    quantization: dict | None = field(default=None, compare=False,
                                      metadata={"help": "config.json quantization_config (a pre-quantized "
                                                        "checkpoint), else None"})
    calibration: tuple = field(default=(), compare=False, repr=False, metadata={
        "help": "model calibrations of this architecture (dsplan calibrate MODEL_DIR; dsplan.learn.trace)"})

    # ---- shapes -----------------------------------------------------------
    def _attn_linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of one layer's attention linears."""
        h = self.hidden_size
        if self.mla is not None:
            m = self.mla
            q_out = self.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
            q = ([("q_a_proj", h, m.q_lora_rank), ("q_b_proj", m.q_lora_rank, q_out)] if m.q_lora_rank
                 else [("q_proj", h, q_out)])
            return q + [("kv_a_proj_with_mqa", h, m.kv_lora_rank + m.qk_rope_head_dim),
                        ("kv_b_proj", m.kv_lora_rank, self.num_heads * (m.qk_nope_head_dim + m.v_head_dim)),
                        ("o_proj", self.num_heads * m.v_head_dim, h)]
        qkv_names, o_name, _ = LAYOUTS[self.layout]
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if len(qkv_names) == 1:
            qkv = [(qkv_names[0], h, q + 2 * kv)]
        else:
            qkv = [(qkv_names[0], h, q), (qkv_names[1], h, kv), (qkv_names[2], h, kv)]
        return qkv + [(o_name, q, h)]

    def _mlp_linears(self, width: int) -> list[tuple[str, int, int]]:
        """(name, in, out) of a gated MLP of ``width``."""
        h, names = self.hidden_size, LAYOUTS[self.layout][2]
        if len(names) == 2:
            return [(names[0], h, 2 * width), (names[1], width, h)]
        return [(names[0], h, width), (names[1], h, width), (names[2], width, h)]

    def linears(self) -> list[tuple[str, int, int, int]]:
        """(name, in_features, out_features, count in the model) of every ``nn.Linear`` in the
        decoder: what LLaMA-Factory's ``lora_target: all`` wraps and bitsandbytes quantizes.
        Fused expert tensors are not among them; ``nn.Linear`` experts count once per expert."""
        moe_layers = len(self.moe.layers) if self.moe else 0
        dense_layers = self.num_layers - moe_layers
        out = [(n, a, b, self.num_layers) for n, a, b in self._attn_linears()]
        if dense_layers:
            out += [(n, a, b, dense_layers) for n, a, b in self._mlp_linears(self.intermediate_size)]
        if self.moe and moe_layers:
            m = self.moe
            if not m.fused:
                out += [(n, a, b, moe_layers * m.experts) for n, a, b in self._mlp_linears(m.expert_width)]
            if m.router_linear:
                out.append(("gate", self.hidden_size, m.experts, moe_layers))
            if m.shared_width:
                out += [(n, a, b, moe_layers) for n, a, b in self._mlp_linears(m.shared_width)]
            if m.shared_gate:
                out.append(("shared_expert_gate", self.hidden_size, 1, moe_layers))
        merged: dict[str, tuple[str, int, int, int]] = {}
        for n, a, b, c in out:  # a name used at two widths (dense and shared MLPs) keeps both rows
            key = f"{n}:{a}:{b}"
            merged[key] = (n, a, b, merged[key][3] + c) if key in merged else (n, a, b, c)
        return list(merged.values())

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every linear module name, the largest where a name has
        several shapes (a dense MLP and a shared expert)."""
        shapes: dict[str, tuple[int, int]] = {}
        for n, a, b, _ in self.linears():
            if n not in shapes or a * b > shapes[n][0] * shapes[n][1]:
                shapes[n] = (a, b)
        return shapes

    # ---- parameter counts -------------------------------------------------
    @property
    def attn_params_per_layer(self) -> int:
        n = sum(a * b for _, a, b in self._attn_linears())
        if self.mla is not None:
            n += self.mla.kv_lora_rank + self.mla.q_lora_rank  # kv_a_layernorm, q_a_layernorm
        elif self.attention_bias:
            n += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    def _gated_mlp_params(self, width: int) -> int:
        return 3 * self.hidden_size * width

    @property
    def moe_mlp_params(self) -> int:
        """Parameters of one MoE layer's MLP: router, routed experts, shared expert(s)."""
        m = self.moe
        if m is None:
            return 0
        n = self.hidden_size * m.experts + m.experts * self._gated_mlp_params(m.expert_width)
        n += self._gated_mlp_params(m.shared_width) + (self.hidden_size if m.shared_gate else 0)
        return n

    @property
    def fused_expert_params(self) -> int:
        """One layer's fused expert tensors: the largest module ZeRO-3 gathers at once (0 if none)."""
        m = self.moe
        return m.experts * self._gated_mlp_params(m.expert_width) if m and m.fused else 0

    def is_moe_layer(self, index: int) -> bool:
        return self.moe is not None and index in self.moe.layers

    def layer_params(self, index: int) -> int:
        """Parameters of decoder layer ``index`` (0-based)."""
        mlp = self.moe_mlp_params if self.is_moe_layer(index) else self._gated_mlp_params(self.intermediate_size)
        return self.attn_params_per_layer + mlp + self.norms_per_layer * self.hidden_size

    @property
    def mlp_params_per_layer(self) -> int:
        """The MLP of the last layer (an MoE layer in every MoE model here)."""
        return self.layer_params(self.num_layers - 1) - self.attn_params_per_layer - \
            self.norms_per_layer * self.hidden_size

    @property
    def params_per_layer(self) -> int:
        """Parameters of the last decoder layer (what LLaMA-Factory's freeze tuning trains first)."""
        return self.layer_params(self.num_layers - 1)

    def layers_params(self, n: int) -> int:
        """Parameters of LF's ``freeze_trainable_layers: n`` layers: the last n, or the first -n."""
        count = min(abs(n), self.num_layers)
        picked = range(self.num_layers - count, self.num_layers) if n > 0 else range(count)
        return sum(self.layer_params(i) for i in picked)

    @property
    def decoder_params(self) -> int:
        moe_layers = len(self.moe.layers) if self.moe else 0
        dense = self.num_layers - moe_layers
        base = self.attn_params_per_layer + self.norms_per_layer * self.hidden_size
        return self.num_layers * base + dense * self._gated_mlp_params(self.intermediate_size) + \
            moe_layers * self.moe_mlp_params

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def vision_params(self) -> int:
        """The vision tower and its projector (0 for a text-only model)."""
        return self.vision.params if self.vision else 0

    @property
    def text_params(self) -> int:
        """The language model alone: embeddings, decoder, final norm, lm_head."""
        return self.embedding_params + self.lm_head_params + self.decoder_params + self.hidden_size

    @property
    def total_params(self) -> int:
        return self.text_params + self.vision_params

    @property
    def num_experts_per_tok(self) -> int:
        return self.moe.top_k if self.moe else 1

    def _mean_over_layers(self, moe_value: float) -> float:
        """The mean over the decoder layers of a per-layer figure: the dense width in dense
        layers, ``moe_value`` in MoE layers."""
        if self.moe is None:
            return self.intermediate_size
        n = len(self.moe.layers)
        return ((self.num_layers - n) * self.intermediate_size + n * moe_value) / self.num_layers

    @property
    def mlp_width_per_token(self) -> float:
        """MLP width a token runs through, averaged over the layers: the dense width, or in an
        MoE layer its top-k routed experts plus the shared expert(s)."""
        m = self.moe
        return self._mean_over_layers(m.top_k * m.expert_width + m.shared_width if m else 0)

    @property
    def lora_mlp_width_per_token(self) -> float:
        """The same, counting only MLPs made of ``nn.Linear`` (what LoRA wraps): fused routed
        experts are left out."""
        m = self.moe
        return self._mean_over_layers(m.shared_width + (0 if m.fused else m.top_k * m.expert_width) if m else 0)

    @property
    def moe_layer_fraction(self) -> float:
        """Share of the decoder layers that are MoE layers (0 for a dense model)."""
        return len(self.moe.layers) / self.num_layers if self.moe else 0.0

    @property
    def linear_params(self) -> int:
        """Weights of the ``nn.Linear`` modules of the decoder and of any vision tower (what 4/8-bit
        bitsandbytes quantizes; fused expert tensors, norms, embeddings and lm_head stay 16-bit)."""
        return sum(a * b * c for _, a, b, c in self.linears()) + (self.vision.linear_params if self.vision else 0)

    @property
    def largest_layer_params(self) -> int:
        """Largest single module (what ZeRO-3 must gather at once): the embedding, the largest
        linear, or one layer's fused routed experts (DeepSpeed fetches a module's own
        parameters together, and the fused experts are two parameters of one module)."""
        biggest_linear = max(a * b for _, a, b, _ in self.linears())
        return max(self.embedding_params, biggest_linear, self.fused_expert_params)

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        """Module names LLaMA-Factory's ``lora_target: all`` finds (every ``nn.Linear`` of the decoder)."""
        return tuple(dict.fromkeys(n for n, *_ in self.linears()))

    def dora_params(self, targets: tuple[str, ...] | None = None) -> int:
        """DoRA's magnitude vectors: one entry per output feature of every targeted linear."""
        return sum(b * c for n, _, b, c in self.linears() if targets is None or n in targets)

    def lora_params(self, rank: int, targets: tuple[str, ...] | None = None) -> int:
        """Trainable LoRA parameters: rank x (in + out) for every targeted linear.  ``targets``
        None is LF's ``all``: every ``nn.Linear`` of the decoder (:meth:`linears`)."""
        mods = self.linears()
        if targets is not None:
            known = list(dict.fromkeys(n for n, *_ in mods))
            unknown = [t for t in targets if t not in known]
            if unknown:
                raise UserError(f"unknown lora_target module(s) {excerpt(', '.join(unknown))}: known are "
                                f"{', '.join(known)}")
            mods = [m for m in mods if m[0] in targets]
        return sum(rank * (a + b) * c for _, a, b, c in mods)

    def _architecture(self) -> dict:
        """What sets this model apart from a dense Llama-style decoder (empty when nothing)."""
        arch: dict = {}
        if self.moe:
            arch["moe"] = self.moe.to_dict()
        if self.mla:
            arch["mla"] = {"q_lora_rank": self.mla.q_lora_rank, "kv_lora_rank": self.mla.kv_lora_rank}
        if self.vision:
            arch["vision"] = self.vision.to_dict()
        if self.qk_norm:
            arch["qk_norm"] = True
        if self.norms_per_layer != 2:
            arch["norms_per_layer"] = self.norms_per_layer
        if self.layout != "llama":
            arch["layout"] = self.layout
        if self.warnings:
            arch["warnings"] = list(self.warnings)
        return arch

    def to_dict(self) -> dict:
        d = {
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
        arch = self._architecture()
        if arch:  # dense Llama-style models keep the keys they always had
            d["architecture"] = arch
        return d


#: Bounds on the config.json numbers dsplan reads; the largest published LLMs are far
#: inside them, so a value outside is a broken or hostile file.
CONFIG_LIMITS = {
    "hidden_size": 1 << 20, "intermediate_size": 1 << 22, "moe_intermediate_size": 1 << 22,
    "num_hidden_layers": 10_000, "num_attention_heads": 1 << 16, "num_key_value_heads": 1 << 16,
    "head_dim": 1 << 16, "vocab_size": 1 << 24, "num_local_experts": 1 << 16, "num_experts": 1 << 16,
}
#: The same for sizes read only by some families (MoE routing, latent attention, vision
#: towers, other layouts); each is optional where it is read.
EXTRA_LIMITS = {
    "n_routed_experts": 1 << 16, "moe_num_experts": 1 << 16, "num_experts_per_tok": 1 << 16,
    "num_experts_per_token": 1 << 16, "moe_topk": 1 << 16, "moe_k": 1 << 16,
    "shared_expert_intermediate_size": 1 << 22, "n_shared_experts": 1 << 10, "intermediate_size_mlp": 1 << 22,
    "first_k_dense_replace": 10_000, "moe_layer_freq": 10_000, "decoder_sparse_step": 10_000,
    "interleave_moe_layer_step": 10_000, "layer_index": 10_000,
    "q_lora_rank": 1 << 20, "kv_lora_rank": 1 << 20, "qk_rope_head_dim": 1 << 16, "qk_nope_head_dim": 1 << 16,
    "v_head_dim": 1 << 16,
    "depth": 10_000, "embed_dim": 1 << 20, "mlp_ratio": 1 << 8, "num_heads": 1 << 16, "patch_size": 1 << 12,
    "spatial_merge_size": 1 << 8, "temporal_patch_size": 1 << 8, "in_channels": 1 << 8, "in_chans": 1 << 8,
    "num_channels": 1 << 8, "out_hidden_size": 1 << 20, "image_size": 1 << 16,
    "num_position_embeddings": 1 << 24, "projector_input_dim": 1 << 20, "projector_output_dim": 1 << 20,
    "vision_output_dim": 1 << 20, "mm_tokens_per_image": 1 << 20,
    "ffn_hidden_size": 1 << 22, "num_layers": 10_000, "multi_query_group_num": 1 << 16, "kv_channels": 1 << 16,
    "padded_vocab_size": 1 << 24,
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
    limit = CONFIG_LIMITS.get(key) or EXTRA_LIMITS[key]
    if value > limit:
        raise UserError(f"{where}: config.json {key} is {excerpt(value, 40)}; at most {limit} is supported")
    return value


def _config_first(cfg: dict, keys: tuple[str, ...], where: str) -> int | None:
    """The first of ``keys`` that config.json sets (a per-layer list counts as its largest entry)."""
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, list) and value:
            return max(_config_int({key: v}, key, where) for v in value[:10_000])
        found = _config_int(cfg, key, where, required=False)
        if found is not None:
            return found
    return None


def _layer_list(cfg: dict, key: str, layers: int, where: str) -> set[int] | None:
    """A list of layer indices (``mlp_only_layers``, ``moe_layers``); None when absent."""
    value = cfg.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > EXTRA_LIMITS["layer_index"]:
        raise UserError(f"{where}: config.json {key} is not a list of layer indices: {excerpt(value, 40)}")
    out = set()
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < max(layers, 1):
            raise UserError(f"{where}: config.json {key} holds {excerpt(v, 40)}, not a layer index "
                            f"below {layers}")
        out.add(v)
    return out


def _moe_layers(cfg: dict, layers: int, where: str) -> tuple[int, ...]:
    """Which decoder layers are MoE layers, by the family's rule."""
    listed = _layer_list(cfg, "moe_layers", layers, where)
    if listed is not None:  # Llama 4 writes the list out
        return tuple(sorted(listed))
    step = _config_int(cfg, "interleave_moe_layer_step", where, required=False)
    if step is not None:  # Llama 4 without the list
        return tuple(range(step - 1, layers, step))
    if "first_k_dense_replace" in cfg or "n_routed_experts" in cfg:  # DeepSeek, GLM-4-MoE
        first = _config_int(cfg, "first_k_dense_replace", where, required=False) or 0
        freq = _config_int(cfg, "moe_layer_freq", where, required=False) or 1
        return tuple(i for i in range(layers) if i >= first and i % freq == 0)
    step = _config_int(cfg, "decoder_sparse_step", where, required=False) or 1  # Qwen MoE, Mixtral
    dense = _layer_list(cfg, "mlp_only_layers", layers, where) or set()
    return tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)


def _experts_fused(remote_code: bool, kinds: set[str]) -> tuple[bool, str]:
    """Whether the routed experts are fused tensors (transformers 5's own MoE models) or one
    ``nn.Linear`` per expert (remote code), and a warning when that is a guess."""
    native = {k.removesuffix("_text") for k in kinds}
    if native & FUSED_EXPERT_TYPES:
        return True, ""
    if "deepseek" in native or remote_code:  # trust_remote_code models keep a ModuleList of experts
        return False, ""
    kind = shorten(sorted(kinds)[0], 40)
    return True, f"the MoE layout of {kind} is not known to dsplan: its experts are taken as fused tensors"


def _moe_from_config(cfg: dict, kinds: set[str], layers: int, moe_width: int | None, remote_code: bool,
                     where: str) -> tuple[MoE | None, str]:
    """The MoE layout of a text config (None for a dense model), and a warning if it is a guess."""
    experts = _config_first(cfg, ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts"), where)
    if experts is None or experts < 2:
        return None, ""
    top_k = _config_first(cfg, ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k"), where)
    guessed_k = "" if top_k else "config.json names no experts per token: top-2 routing assumed"
    top_k = top_k or 2
    width = moe_width or _config_int(cfg, "intermediate_size", where)  # Mixtral, Llama 4: intermediate_size
    shared, gate = 0, False
    shared_width = _config_int(cfg, "shared_expert_intermediate_size", where, required=False)
    n_shared = _config_int(cfg, "n_shared_experts", where, required=False)
    if shared_width:
        shared, gate = shared_width, True  # Qwen2-MoE: one shared expert, scaled by a sigmoid gate
    elif n_shared:
        shared = n_shared * width  # DeepSeek: n shared experts run as one wide MLP
    elif kinds & {"llama4", "llama4_text"}:
        shared = width  # Llama 4: one shared expert as wide as a routed one
    fused, warning = _experts_fused(remote_code, kinds)
    native = {k.removesuffix("_text") for k in kinds}
    return MoE(experts=experts, top_k=min(top_k, experts), expert_width=width, layers=_moe_layers(cfg, layers, where),
               shared_width=shared, shared_gate=gate, fused=fused,
               router_linear=bool(native & ROUTER_LINEAR_TYPES)), "; ".join(w for w in (warning, guessed_k) if w)


def checked_types() -> frozenset[str]:
    """The model types dsplan's counts were checked on: those of the catalog's entries, each
    against its model card (tests/test_catalog.py)."""
    return frozenset(str(e["config"].get("model_type")) for e in catalog.CATALOG.values())


def _unchecked_type(top_type: str) -> str:
    if top_type in checked_types():
        return ""
    return (f"model_type {shorten(top_type, 40)} is not one dsplan's counts were checked on: sized from "
            "config.json's widths as the nearest known layout, so parts it does not know are missing")


def _mla_from_config(cfg: dict, where: str) -> MLA | None:
    """DeepSeek V2/V3's latent attention, when config.json sets ``kv_lora_rank``."""
    kv_rank = _config_int(cfg, "kv_lora_rank", where, required=False)
    if kv_rank is None:
        return None
    return MLA(q_lora_rank=_config_int(cfg, "q_lora_rank", where, required=False) or 0, kv_lora_rank=kv_rank,
               qk_nope_head_dim=_config_int(cfg, "qk_nope_head_dim", where),
               qk_rope_head_dim=_config_int(cfg, "qk_rope_head_dim", where),
               v_head_dim=_config_int(cfg, "v_head_dim", where))


# ---- vision towers ------------------------------------------------------------
def _linear(a: int, b: int, bias: bool = True) -> int:
    return a * b + (b if bias else 0)


def _merger(h: int, merge: int, out: int, norm: int) -> int:
    """Qwen-VL's patch merger: a norm, then Linear(h m^2, h m^2) and Linear(h m^2, out), with biases."""
    wide = h * merge * merge
    return norm + _linear(wide, wide) + _linear(wide, out)


def _vision_qwen2(v: dict, text_hidden: int, where: str) -> Vision:
    """Qwen2-VL: LayerNorm blocks with a plain MLP (``embed_dim x mlp_ratio``)."""
    e, depth = _config_int(v, "embed_dim", where), _config_int(v, "depth", where)
    i = e * _config_int(v, "mlp_ratio", where)
    p, tp, m = (_config_int(v, k, where) for k in ("patch_size", "temporal_patch_size", "spatial_merge_size"))
    ch = _config_first(v, ("in_channels", "in_chans"), where) or 3
    block = 4 * e + _linear(e, 3 * e) + _linear(e, e) + _linear(e, i) + _linear(i, e)
    out = _config_int(v, "hidden_size", where, required=False) or text_hidden
    linear = depth * (4 * e * e + 2 * e * i) + (e * m * m) * (e * m * m + out)
    return Vision("qwen2_vl", ch * tp * p * p * e + depth * block, _merger(e, m, out, 2 * e), depth, e, i,
                  _config_int(v, "num_heads", where), p, m, tp, linear_params=linear)


def _vision_qwen25(v: dict, text_hidden: int, where: str) -> Vision:
    """Qwen2.5-VL: RMSNorm blocks with a gated MLP, all linears with biases."""
    h, i, depth = (_config_int(v, k, where) for k in ("hidden_size", "intermediate_size", "depth"))
    p, tp, m = (_config_int(v, k, where) for k in ("patch_size", "temporal_patch_size", "spatial_merge_size"))
    ch = _config_first(v, ("in_channels", "in_chans"), where) or 3
    block = 2 * h + _linear(h, 3 * h) + _linear(h, h) + 2 * _linear(h, i) + _linear(i, h)
    out = _config_int(v, "out_hidden_size", where, required=False) or text_hidden
    linear = depth * (4 * h * h + 3 * h * i) + (h * m * m) * (h * m * m + out)
    return Vision("qwen2_5_vl", ch * tp * p * p * h + depth * block, _merger(h, m, out, h), depth, h, i,
                  _config_int(v, "num_heads", where), p, m, tp, linear_params=linear)


def _vision_qwen3(v: dict, text_hidden: int, where: str) -> Vision:
    """Qwen3-VL: LayerNorm blocks, learned position embeddings, extra "deepstack" mergers."""
    h, i, depth = (_config_int(v, k, where) for k in ("hidden_size", "intermediate_size", "depth"))
    p, tp, m = (_config_int(v, k, where) for k in ("patch_size", "temporal_patch_size", "spatial_merge_size"))
    ch = _config_first(v, ("in_channels", "in_chans"), where) or 3
    positions = _config_int(v, "num_position_embeddings", where)
    block = 4 * h + _linear(h, 3 * h) + _linear(h, h) + _linear(h, i) + _linear(i, h)
    out = _config_int(v, "out_hidden_size", where, required=False) or text_hidden
    deep = _layer_list(v, "deepstack_visual_indexes", depth, where) or set()
    projector = _merger(h, m, out, 2 * h) + len(deep) * _merger(h, m, out, 2 * h * m * m)
    tower = ch * tp * p * p * h + h + positions * h + depth * block
    linear = depth * (4 * h * h + 2 * h * i) + (1 + len(deep)) * (h * m * m) * (h * m * m + out)
    return Vision("qwen3_vl", tower, projector, depth, h, i, _config_int(v, "num_heads", where), p, m, tp,
                  linear_params=linear)


def _vision_siglip(v: dict, text_hidden: int, tokens: int | None, where: str) -> Vision:
    """Gemma 3: a SigLIP encoder (no pooling head) and a projection matrix with an RMSNorm."""
    v = {**_TYPE_DEFAULTS["siglip_vision_model"], **v}
    h, i, depth, size, p = (_config_int(v, k, where) for k in
                            ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size"))
    ch = _config_int(v, "num_channels", where, required=False) or 3
    block = 4 * h + 4 * _linear(h, h) + _linear(h, i) + _linear(i, h)
    tower = _linear(ch * p * p, h) + (size // p) ** 2 * h + depth * block + 2 * h
    return Vision("siglip_vision_model", tower, h * text_hidden + h, depth, h, i,
                  _config_int(v, "num_attention_heads", where), p, image_size=size, tokens_per_image=tokens,
                  linear_params=depth * (4 * h * h + 2 * h * i))


def _vision_llama4(v: dict, text_hidden: int, where: str) -> Vision:
    """Llama 4: a ViT with a class token, a pixel-shuffle MLP adapter and a linear projector."""
    h, i, depth, size, p = (_config_int(v, k, where) for k in
                            ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size"))
    ch = _config_int(v, "num_channels", where, required=False) or 3
    block = 4 * _linear(h, h) + _linear(h, i) + _linear(i, h) + 4 * h
    tower = h + ((size // p) ** 2 + 1) * h + ch * p * p * h + 4 * h + depth * block
    proj_in, proj_out = _config_int(v, "projector_input_dim", where), _config_int(v, "projector_output_dim", where)
    adapter = i * proj_in + proj_out * proj_out
    projector = adapter + _config_int(v, "vision_output_dim", where) * text_hidden
    linear = ch * p * p * h + depth * (4 * h * h + 2 * h * i) + projector
    return Vision("llama4_vision_model", tower, projector, depth, h, i, _config_int(v, "num_attention_heads", where),
                  p, image_size=size, linear_params=linear)


def _vision_from_config(cfg: dict, top_type: str, text_hidden: int, where: str) -> tuple[Vision | None, str]:
    """The vision tower of a VLM config, and a warning when its family is not modelled."""
    v = cfg.get("vision_config")
    if not isinstance(v, dict):
        return None, ""
    kind = v.get("model_type") if isinstance(v.get("model_type"), str) else top_type
    if top_type == "qwen2_vl":
        return _vision_qwen2(v, text_hidden, where), ""
    if top_type == "qwen2_5_vl":
        return _vision_qwen25(v, text_hidden, where), ""
    if top_type in ("qwen3_vl", "qwen3_vl_moe"):
        return _vision_qwen3(v, text_hidden, where), ""
    if top_type == "gemma3":
        tokens = _config_int(cfg, "mm_tokens_per_image", where, required=False) or 256
        return _vision_siglip(v, text_hidden, tokens, where), ""
    if top_type == "llama4":
        return _vision_llama4(v, text_hidden, where), ""
    return None, f"the vision tower ({shorten(str(kind), 40)}) is not counted"


# ---- config.json -> ModelSpec ---------------------------------------------------
def _model_type(cfg: dict, where: str, default: str = "unknown") -> str:
    model_type = cfg.get("model_type") or default
    if not isinstance(model_type, str) or not model_type.isprintable() or len(model_type) > 64:
        raise UserError(f"{where}: config.json model_type {excerpt(model_type, 40)} is not a short name")
    return model_type


def _text_config(cfg: dict, top_type: str, where: str) -> tuple[dict, str]:
    """The language model's part of config.json (``text_config`` in multimodal wrappers, with
    transformers' defaults for keys left out) and its model_type."""
    inner = cfg.get("text_config")
    if not isinstance(inner, dict):
        return {**_TYPE_DEFAULTS.get(top_type, {}), **cfg}, top_type
    text_type = _model_type(inner, where, top_type)
    if text_type == "gemma3":
        text_type = "gemma3_text"
    outer = cfg if "hidden_size" not in inner else {}  # older wrappers keep the sizes outside
    return {**_TYPE_DEFAULTS.get(text_type, {}), **outer, **inner}, text_type


def _chatglm_keys(cfg: dict) -> dict:
    """ChatGLM/GLM-4 (remote code) names its sizes differently; map them to the usual keys."""
    renames = {"num_layers": "num_hidden_layers", "ffn_hidden_size": "intermediate_size",
               "multi_query_group_num": "num_key_value_heads", "kv_channels": "head_dim",
               "padded_vocab_size": "vocab_size"}
    out = dict(cfg)
    for old, new in renames.items():
        if old in cfg:
            out[new] = cfg[old]
    if "attention_bias" not in out:
        out["attention_bias"] = bool(cfg.get("add_qkv_bias", False))
    return out


def _tied(cfg: dict, text: dict, kinds: set[str]) -> bool:
    """Whether lm_head shares the embedding: the outer config decides for multimodal wrappers."""
    for c in (cfg, text):
        if isinstance(c.get("tie_word_embeddings"), bool):
            return c["tie_word_embeddings"]
    return bool(kinds & _TIED_BY_DEFAULT)


def _attention_bias(text: dict, kinds: set[str]) -> bool:
    if isinstance(text.get("qkv_bias"), bool):  # Qwen2-MoE's own switch
        return text["qkv_bias"]
    if isinstance(text.get("attention_bias"), bool):
        return text["attention_bias"]
    return bool(kinds & {"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl", "glm4"})


def spec_from_config(cfg: dict, name: str, template: str | None = None, path: str | None = None,
                     source: str = "", hf_id: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a parsed config.json; every size is checked (:func:`_config_int`)."""
    where = shorten(source or name, 120)
    top_type = _model_type(cfg, where)
    text, text_type = _text_config(cfg, top_type, where)
    if top_type == "chatglm":
        text = _chatglm_keys(text)
    kinds = {top_type, text_type}
    hidden = _config_int(text, "hidden_size", where)
    heads = _config_int(text, "num_attention_heads", where)
    layers = _config_int(text, "num_hidden_layers", where)
    moe_width = _config_int(text, "moe_intermediate_size", where, required=False)
    dense_width = _config_int(text, "intermediate_size_mlp", where, required=False) or _config_int(
        text, "intermediate_size", where, required=moe_width is None)
    vocab = _config_int(text, "vocab_size", where)
    kv = _config_int(text, "num_key_value_heads", where, required=False) or heads
    head_dim = _config_int(text, "head_dim", where, required=False) or hidden // heads
    if head_dim < 1:
        raise UserError(f"{where}: config.json has more attention heads ({heads}) than hidden_size ({hidden})")
    moe, moe_warning = _moe_from_config(text, kinds, layers, moe_width, "auto_map" in cfg, where)
    dense_width = dense_width or (moe.expert_width if moe else 0)
    vision, warning = _vision_from_config(cfg, top_type, hidden, where)
    return ModelSpec(
        name=name, model_type=top_type, hidden_size=hidden, intermediate_size=dense_width, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, vocab_size=vocab,
        tie_word_embeddings=_tied(cfg, text, kinds), attention_bias=_attention_bias(text, kinds),
        num_experts=moe.experts if moe else 1, template=template or _TEMPLATES.get(top_type, "default"),
        path=path, source=source, hf_id=hf_id, moe=moe, mla=_mla_from_config(text, where), vision=vision,
        qk_norm=bool(kinds & QK_NORM_TYPES), norms_per_layer=4 if kinds & FOUR_NORM_TYPES else 2,
        layout=_LAYOUT_OF_TYPE.get(top_type, "llama"),
        warnings=tuple(w for w in (_unchecked_type(top_type), moe_warning, warning) if w),
        quantization=next((c["quantization_config"] for c in (cfg, text)
                           if isinstance(c.get("quantization_config"), dict)), None),
    )


# ---- --model -> ModelSpec -------------------------------------------------------
def _read_config(cfg_path: Path) -> dict:
    where = shorten(str(cfg_path), 120)
    cfg = read_json(cfg_path, where)
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: expected a JSON object")
    return cfg


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
    cfg = _read_config(cfg_path)
    hit = catalog.lookup(folder.name)
    template = hit[1]["template"] if hit else None
    return spec_from_config(cfg, name=folder.name, template=template, path=resolved, source=str(cfg_path))


def _cached_spec(model: str, cfg_path: Path | None = None) -> ModelSpec:
    """A hub id's config.json from the local Hugging Face cache (the template from the catalog's
    entry of the same name, if any)."""
    cfg_path = cfg_path or hfcache.find_config(model)
    if cfg_path is None:
        raise UserError(f"model {excerpt(model)} is not a local folder, a catalog name, or in the Hugging Face "
                        f"cache: put its config.json at {hfcache.where_to_put(model)} (or pass a folder that "
                        "holds it)")
    hit = catalog.lookup(model)
    return spec_from_config(_read_config(cfg_path), name=model.split("/")[-1], source=str(cfg_path), hf_id=model,
                            template=hit[1]["template"] if hit else None)


def load_model_spec(model: str) -> ModelSpec:
    """Resolve ``--model``: a local folder holding config.json, a catalog name or hub id, or a
    hub id in the local Hugging Face cache."""
    if len(model) > MAX_MODEL_REF:
        raise UserError(f"--model {excerpt(model)} is {len(model)} characters; at most {MAX_MODEL_REF}")
    try:
        p = Path(model).expanduser()
    except RuntimeError:  # "~someone" with no such user
        p = Path(model)
    looks_like_path = path_kind(p) is not None or model.startswith((".", "~", "/")) or p.name == "config.json"
    cached = hfcache.find_config(model) if not looks_like_path and hfcache.is_hub_id(model) else None
    if cached is not None and path_kind(cached) == "file":  # the user's own copy wins over the catalog's
        return _cached_spec(model, cached)
    hit = None if looks_like_path else catalog.lookup(model)
    if hit is None and not looks_like_path and hfcache.is_hub_id(model):
        return _cached_spec(model)
    if hit is None and not looks_like_path and "/" in model:
        looks_like_path = True  # "a/b/c" is no hub id: most likely a folder typo
    if looks_like_path:
        return _local_spec(model, p)
    if hit is None:
        names = ", ".join(list(catalog.CATALOG)[:12])
        raise UserError(f"unknown model {excerpt(model)}: give a local folder with config.json, a hub id (org/name) "
                        f"in the Hugging Face cache, or a catalog name ({names}, ... {len(catalog.CATALOG)} in all)")
    canon, entry = hit
    return spec_from_config(entry["config"], name=canon, template=entry["template"],
                            source=f"catalog: {entry['hf_id']}/config.json", hf_id=catalog.hub_id(model))
