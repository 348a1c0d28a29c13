"""Built-in catalog of common architectures.

Each entry holds the fields dsplan reads from the model's public ``config.json``
on the Hugging Face hub (copied by hand; no weights, no hub access at run time),
plus the LLaMA-Factory chat template that fits it.  Instruct/Chat variants share
their base model's shapes, so ``Qwen2.5-7B-Instruct`` resolves to ``Qwen2.5-7B``.
"""

from __future__ import annotations


def _cfg(model_type, hidden, inter, layers, heads, kv, vocab, tie, qkv_bias):
    """The config.json fields dsplan reads (positions and RoPE do not change memory at a given cutoff)."""
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "attention_bias": qkv_bias,  # q/k/v projections carry a bias (Qwen1.5/Qwen2/2.5)
    }


#: name -> {"hf_id", "template", "config"}.  Source for every row: the config.json of
#: the hub repository named in hf_id (as published; values copied verbatim).
CATALOG: dict[str, dict] = {
    # Qwen2.5 family (Qwen/Qwen2.5-*): 0.5B-3B tie the embeddings, 7B+ do not and pad vocab to 152064.
    "Qwen2.5-0.5B": {"hf_id": "Qwen/Qwen2.5-0.5B", "template": "qwen",
                     "config": _cfg("qwen2", 896, 4864, 24, 14, 2, 151936, True, True)},
    "Qwen2.5-1.5B": {"hf_id": "Qwen/Qwen2.5-1.5B", "template": "qwen",
                     "config": _cfg("qwen2", 1536, 8960, 28, 12, 2, 151936, True, True)},
    "Qwen2.5-3B": {"hf_id": "Qwen/Qwen2.5-3B", "template": "qwen",
                   "config": _cfg("qwen2", 2048, 11008, 36, 16, 2, 151936, True, True)},
    "Qwen2.5-7B": {"hf_id": "Qwen/Qwen2.5-7B", "template": "qwen",
                   "config": _cfg("qwen2", 3584, 18944, 28, 28, 4, 152064, False, True)},
    "Qwen2.5-14B": {"hf_id": "Qwen/Qwen2.5-14B", "template": "qwen",
                    "config": _cfg("qwen2", 5120, 13824, 48, 40, 8, 152064, False, True)},
    "Qwen2.5-32B": {"hf_id": "Qwen/Qwen2.5-32B", "template": "qwen",
                    "config": _cfg("qwen2", 5120, 27648, 64, 40, 8, 152064, False, True)},
    "Qwen2.5-72B": {"hf_id": "Qwen/Qwen2.5-72B", "template": "qwen",
                    "config": _cfg("qwen2", 8192, 29568, 80, 64, 8, 152064, False, True)},
    # Qwen1.5 (seed 002): multi-head attention (kv = heads), vocab 151936.
    "Qwen1.5-7B": {"hf_id": "Qwen/Qwen1.5-7B", "template": "qwen",
                   "config": _cfg("qwen2", 4096, 11008, 32, 32, 32, 151936, False, True)},
    # DeepSeek-R1 distills are Qwen2.5(-Math) shapes with untied embeddings.
    "DeepSeek-R1-Distill-Qwen-1.5B": {"hf_id": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "template": "deepseekr1",
                                      "config": _cfg("qwen2", 1536, 8960, 28, 12, 2, 151936, False, True)},
    "DeepSeek-R1-Distill-Qwen-7B": {"hf_id": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "template": "deepseekr1",
                                    "config": _cfg("qwen2", 3584, 18944, 28, 28, 4, 152064, False, True)},
    "DeepSeek-R1-Distill-Qwen-14B": {"hf_id": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "template": "deepseekr1",
                                     "config": _cfg("qwen2", 5120, 13824, 48, 40, 8, 152064, False, True)},
    "DeepSeek-R1-Distill-Qwen-32B": {"hf_id": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "template": "deepseekr1",
                                     "config": _cfg("qwen2", 5120, 27648, 64, 40, 8, 152064, False, True)},
    # Llama 3 / 3.1 (meta-llama/*): GQA with 8 kv heads, vocab 128256.
    "Llama-3-8B": {"hf_id": "meta-llama/Meta-Llama-3-8B", "template": "llama3",
                   "config": _cfg("llama", 4096, 14336, 32, 32, 8, 128256, False, False)},
    "Llama-3-70B": {"hf_id": "meta-llama/Meta-Llama-3-70B", "template": "llama3",
                    "config": _cfg("llama", 8192, 28672, 80, 64, 8, 128256, False, False)},
    "Llama-3.1-8B": {"hf_id": "meta-llama/Llama-3.1-8B", "template": "llama3",
                     "config": _cfg("llama", 4096, 14336, 32, 32, 8, 128256, False, False)},
    "Llama-3.1-70B": {"hf_id": "meta-llama/Llama-3.1-70B", "template": "llama3",
                      "config": _cfg("llama", 8192, 28672, 80, 64, 8, 128256, False, False)},
    # Mistral (mistralai/*): v0.1 has a 32000 vocab, v0.3 extends it to 32768.
    "Mistral-7B-v0.1": {"hf_id": "mistralai/Mistral-7B-v0.1", "template": "mistral",
                        "config": _cfg("mistral", 4096, 14336, 32, 32, 8, 32000, False, False)},
    "Mistral-7B-v0.3": {"hf_id": "mistralai/Mistral-7B-v0.3", "template": "mistral",
                        "config": _cfg("mistral", 4096, 14336, 32, 32, 8, 32768, False, False)},
}

#: Short names people type.
CATALOG_ALIASES = {
    "Mistral-7B": "Mistral-7B-v0.1",
    "Meta-Llama-3-8B": "Llama-3-8B",
    "Meta-Llama-3-70B": "Llama-3-70B",
    "Meta-Llama-3.1-8B": "Llama-3.1-8B",
    "Meta-Llama-3.1-70B": "Llama-3.1-70B",
}

_VARIANT_SUFFIXES = ("-Instruct", "-Chat", "-it")


def lookup(name: str) -> tuple[str, dict] | None:
    """Find a catalog entry by name, hub id, or instruct/chat variant; case-insensitive."""
    key = name.strip().rstrip("/").split("/")[-1]
    for suffix in _VARIANT_SUFFIXES:
        if key.lower().endswith(suffix.lower()):
            key = key[: -len(suffix)]
    lowered = {k.lower(): k for k in CATALOG}
    lowered.update({a.lower(): t for a, t in CATALOG_ALIASES.items()})
    canon = lowered.get(key.lower())
    return (canon, CATALOG[canon]) if canon else None
