import json

import pytest

from dsplan.errors import UserError
from dsplan.inputs.model import load_model_spec

# Parameter counts the model cards publish (rounded there); dsplan counts from config.json shapes.
PUBLISHED = {
    "Qwen2.5-0.5B": 0.49e9, "Qwen2.5-1.5B": 1.54e9, "Qwen2.5-3B": 3.09e9, "Qwen2.5-7B": 7.61e9,
    "Qwen2.5-14B": 14.7e9, "Qwen2.5-32B": 32.5e9, "Qwen2.5-72B": 72.7e9, "Llama-3-8B": 8.03e9,
    "Llama-3.1-70B": 70.6e9, "Mistral-7B-v0.1": 7.24e9, "DeepSeek-R1-Distill-Qwen-32B": 32.8e9,
}


@pytest.mark.parametrize("name,count", PUBLISHED.items())
def test_catalog_param_counts_match_model_cards(name, count):
    spec = load_model_spec(name)
    assert spec.total_params == pytest.approx(count, rel=0.01)


def test_catalog_covers_the_required_models():
    for name in ["Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B", "Qwen2.5-7B", "Qwen2.5-14B", "Qwen2.5-32B",
                 "Qwen2.5-72B", "Qwen1.5-7B", "DeepSeek-R1-Distill-Qwen-1.5B", "DeepSeek-R1-Distill-Qwen-7B",
                 "DeepSeek-R1-Distill-Qwen-14B", "DeepSeek-R1-Distill-Qwen-32B", "Llama-3-8B", "Llama-3-70B",
                 "Llama-3.1-8B", "Llama-3.1-70B", "Mistral-7B"]:
        load_model_spec(name)


def test_variants_and_hub_ids_resolve():
    assert load_model_spec("Qwen/Qwen2.5-7B-Instruct").name == "Qwen2.5-7B"
    assert load_model_spec("qwen1.5-7b-chat").name == "Qwen1.5-7B"
    assert load_model_spec("meta-llama/Meta-Llama-3-8B-Instruct").hf_id == "meta-llama/Meta-Llama-3-8B"


def test_spec_fields(model_dir):
    spec = load_model_spec(str(model_dir))
    assert spec.path == str(model_dir.resolve())
    assert (spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads) == (896, 24, 14, 2)
    assert spec.tie_word_embeddings and spec.lm_head_params == 0
    assert spec.largest_layer_params == 151936 * 896
    # one Qwen2 layer: q,k,v (+bias), o, gate/up/down, two norms
    attn = 896 * 896 + 2 * 896 * 128 + 896 * 896 + (896 + 2 * 128)
    assert spec.params_per_layer == attn + 3 * 896 * 4864 + 2 * 896
    assert spec.template == "qwen"
    # LoRA r8 on all 7 linears: r*(in+out) per module per layer
    per_layer = 8 * ((896 + 896) + 2 * (896 + 128) + (896 + 896) + 2 * (896 + 4864) + (4864 + 896))
    assert spec.lora_params(8) == 24 * per_layer


def test_model_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model_spec(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model_spec(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        load_model_spec(str(bad))
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="lacks"):
        load_model_spec(str(bad))
    with pytest.raises(UserError, match="unknown model"):
        load_model_spec("NotAModel-9B")
