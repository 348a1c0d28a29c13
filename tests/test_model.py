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


def _write(tmp_path, text):
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(text)
    return str(d)


BASE_CFG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 100}


@pytest.mark.parametrize("field,value,needle", [
    ("num_local_experts", -5, "zero or negative size num_local_experts"),
    ("num_key_value_heads", -1, "zero or negative"),
    ("hidden_size", 0, "zero or negative"),
    ("hidden_size", "64", "non-numeric"),
    ("hidden_size", 64.5, "non-numeric"),
    ("hidden_size", True, "non-numeric"),
    ("hidden_size", [64], "non-numeric"),
    ("num_hidden_layers", 10**9, "at most 10000"),
    ("vocab_size", 2**40, "at most"),
    ("num_attention_heads", 128, "more attention heads"),
    ("model_type", {"a": 1}, "model_type"),
])
def test_config_sizes_are_checked(tmp_path, field, value, needle):
    path = _write(tmp_path, json.dumps({**BASE_CFG, field: value}))
    with pytest.raises(UserError, match=needle):
        load_model_spec(path)


@pytest.mark.parametrize("text,needle", [
    ('{"hidden_size": Infinity}', "non-numeric"),
    ('{"hidden_size": NaN}', "non-numeric"),
    ('{"hidden_size": ' + "9" * 5000 + "}", "5000 digits"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("caf\udce9", "not UTF-8"),
])
def test_hostile_config_json_is_one_error(tmp_path, text, needle):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(UserError, match=needle):
        load_model_spec(str(d))


def test_optional_sizes_null_or_zero_take_their_defaults(tmp_path):
    path = _write(tmp_path, json.dumps({**BASE_CFG, "num_key_value_heads": None, "head_dim": 0,
                                        "num_local_experts": 0, "hidden_size": 64.0}))
    spec = load_model_spec(path)
    assert (spec.num_kv_heads, spec.head_dim, spec.num_experts, spec.hidden_size) == (4, 16, 1, 64)


def test_long_and_unprintable_model_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        load_model_spec(str(tmp_path / ("x" * 300)))
    assert len(str(e.value)) < 200
    with pytest.raises(UserError, match="at most 4096"):
        load_model_spec("y" * 5000)
    bad = tmp_path / "name\x1bwith-escape"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(BASE_CFG))
    with pytest.raises(UserError, match="contains the character"):
        load_model_spec(str(bad))


def test_negative_freeze_layers_count_the_first_layers():
    from dsplan.estimate.workload import Workload, trainable_params

    spec = load_model_spec("Qwen2.5-0.5B")
    last4 = trainable_params(spec, Workload(method="freeze", freeze_trainable_layers=4))
    first4 = trainable_params(spec, Workload(method="freeze", freeze_trainable_layers=-4))
    assert first4 == last4 == 4 * spec.params_per_layer
    assert trainable_params(spec, Workload(method="freeze", freeze_trainable_layers=-1000)) == \
        spec.num_layers * spec.params_per_layer
