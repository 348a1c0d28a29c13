"""dsplan.demo.assets: the tiny local model and dataset (fast: no training here).

The real training runs with these assets live in scripts/probe_tiny_training.py and
the end-to-end tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsplan.demo import assets as da
from dsplan.errors import UserError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return da.make_tiny_model(tmp_path_factory.mktemp("m") / "tiny-qwen2")


# ---------------------------------------------------------------- import stays light
def test_import_is_stdlib_only():
    code = ("import sys, dsplan.demo.assets; "
            "bad = [m for m in ('torch', 'transformers', 'tokenizers', 'deepspeed', 'yaml') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- dataset
def test_dataset_written_and_registered(tmp_path):
    name = da.make_dataset(tmp_path, n=12)
    assert name == da.DATASET_NAME
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    entry = info[name]
    assert entry["formatting"] == "alpaca"
    assert entry["columns"] == {"prompt": "instruction", "query": "input", "response": "output"}
    records = json.loads((tmp_path / entry["file_name"]).read_text())
    assert len(records) == 12
    assert all(set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"] for r in records)
    assert len({r["output"] for r in records}) == 12  # all distinct


def test_dataset_deterministic_and_idempotent(tmp_path):
    da.make_dataset(tmp_path / "a", n=8)
    da.make_dataset(tmp_path / "b", n=8)
    for f in ("dataset_info.json", "dsplan_demo.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    before = (tmp_path / "a" / "dsplan_demo.json").stat().st_mtime_ns
    assert da.make_dataset(tmp_path / "a", n=8) == da.DATASET_NAME
    assert (tmp_path / "a" / "dsplan_demo.json").stat().st_mtime_ns == before


def test_dataset_refuses_to_overwrite_different_content(tmp_path):
    da.make_dataset(tmp_path, n=8)
    with pytest.raises(UserError, match="different content"):
        da.make_dataset(tmp_path, n=9)
    assert len(json.loads((tmp_path / "dsplan_demo.json").read_text())) == 8


def test_dataset_keeps_other_entries(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}))
    da.make_dataset(tmp_path, n=4)
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert set(info) == {"mine", da.DATASET_NAME}


def test_dataset_refuses_conflicting_entry(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({da.DATASET_NAME: {"file_name": "other.json"}}))
    with pytest.raises(UserError, match="differently"):
        da.make_dataset(tmp_path, n=4)


def test_dataset_needs_a_sample(tmp_path):
    with pytest.raises(UserError):
        da.make_dataset(tmp_path, n=0)


# ---------------------------------------------------------------- model + tokenizer
@pytest.mark.real  # builds the model with torch/transformers
def test_model_folder_contents(tiny):
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", da.STAMP):
        assert (tiny / f).is_file(), f
    assert not list(tiny.parent.glob(".tiny-qwen2.*")), "temporary build folder left behind"


@pytest.mark.real  # builds the model with torch/transformers
def test_config_shape(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    shape = da.DEFAULT_SHAPE
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["hidden_size"] == shape["hidden"] and cfg["num_hidden_layers"] == shape["layers"]
    assert cfg["num_attention_heads"] == shape["heads"] and cfg["num_key_value_heads"] == shape["kv_heads"]
    assert cfg["intermediate_size"] == shape["intermediate"] and cfg["vocab_size"] == shape["vocab_size"]
    assert cfg["eos_token_id"] == 2 and cfg["pad_token_id"] == 0


@pytest.mark.real  # builds the model with torch/transformers
def test_dsplan_reads_the_model(tiny):
    from dsplan.inputs.model import load_model_spec

    spec = load_model_spec(str(tiny))
    assert spec.template == "qwen" and spec.num_layers == 2 and spec.attention_bias
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert sum(p.numel() for p in model.parameters()) == spec.total_params


@pytest.mark.real  # builds the model with torch/transformers
def test_tokenizer_round_trip_and_specials(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    assert len(tok) <= da.DEFAULT_SHAPE["vocab_size"]
    assert tok.convert_tokens_to_ids(list(da.SPECIAL_TOKENS)) == [0, 1, 2]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for text in ("Reverse the order of these words.\napple river stone", "unseen wörds ✓ 123", ""):
        assert tok.decode(tok(text)["input_ids"]) == text
    ids = tok("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2  # specials are single tokens, not split
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.real  # builds the model with torch/transformers
def test_lf_qwen_template_adds_no_tokens(tiny):
    """LLaMA-Factory's qwen template finds every token it needs (no resize_vocab)."""
    pytest.importorskip("llamafactory")
    from llamafactory.data.template import TEMPLATES
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    before = len(tok)
    template = TEMPLATES["qwen"]
    template.fix_special_tokens(tok)
    assert len(tok) == before and tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0
    _prompt_ids, answer_ids = template.encode_oneturn(tok, [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "apple"}])
    assert answer_ids[-2:] == [2, tok.convert_tokens_to_ids("Ċ")]  # "<|im_end|>\n"


@pytest.mark.real  # builds the model with torch/transformers
def test_samples_fill_the_cutoff(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    lens = [len(tok(r["instruction"] + r["input"] + r["output"])["input_ids"]) for r in da.demo_records(64)]
    assert min(lens) > 128 and max(lens) < 512


@pytest.mark.real  # builds the model with torch/transformers
def test_model_idempotent_and_create_only(tiny, tmp_path):
    stamp = (tiny / da.STAMP).read_text()
    mtime = (tiny / "model.safetensors").stat().st_mtime_ns
    assert da.make_tiny_model(tiny) == tiny  # same parameters: untouched
    assert (tiny / "model.safetensors").stat().st_mtime_ns == mtime and (tiny / da.STAMP).read_text() == stamp
    with pytest.raises(UserError, match="other parameters"):
        da.make_tiny_model(tiny, hidden=128)
    other = tmp_path / "taken"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(UserError, match="not a dsplan demo model"):
        da.make_tiny_model(other)


def test_model_params_checks():
    with pytest.raises(UserError):
        da.model_params("gpt2")
    with pytest.raises(UserError):
        da.model_params("qwen2", hidden=250, heads=4)
    p = da.model_params("llama", layers=3)
    assert p["arch"] == "llama" and p["layers"] == 3 and p["hidden"] == da.DEFAULT_SHAPE["hidden"]


@pytest.mark.real  # builds the model with torch/transformers
def test_llama_variant(tmp_path):
    d = da.make_tiny_model(tmp_path / "tiny-llama", arch="llama", hidden=64, intermediate=128, vocab_size=1024)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 64 and cfg["vocab_size"] == 1024


@pytest.mark.real  # builds the model with torch/transformers
def test_model_is_byte_identical_across_builds(tiny, tmp_path):
    again = da.make_tiny_model(tmp_path / "again")
    for f in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (again / f).read_bytes() == (tiny / f).read_bytes(), f


# ---------------------------------------------------------------- checkpoint layouts
def _weights(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return {k: v for k, v in model.state_dict().items()}


@pytest.mark.real  # builds the model with torch/transformers
def test_shards_hold_the_same_weights(tiny, tmp_path):
    sharded = da.make_tiny_model(tmp_path / "sharded", shard_mb=5)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (sharded / "model.safetensors").exists()
    for f in files:  # at most 5 MB of tensors per file, unless one tensor alone is bigger
        names = [k for k, v in index["weight_map"].items() if v == f]
        tensor_bytes = (sharded / f).stat().st_size - 8 - int.from_bytes((sharded / f).read_bytes()[:8], "little")
        assert tensor_bytes <= 5 * 1000**2 or len(names) == 1, (f, names)
    whole, parts = _weights(tiny), _weights(sharded)
    assert whole.keys() == parts.keys()
    assert all(whole[k].equal(parts[k]) for k in whole)


@pytest.mark.real  # builds the model with torch/transformers
def test_bf16_checkpoint_loads_as_fp32(tiny, tmp_path):
    from safetensors import safe_open

    half = da.make_tiny_model(tmp_path / "half", dtype="bfloat16")
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        names = f.keys()
        stored = {f.get_slice(k).get_dtype() for k in names}
    assert stored == {"BF16"}
    assert json.loads((half / "config.json").read_text()).get("dtype", "float32") == "float32"
    full, loaded = _weights(tiny), _weights(half)
    for k, v in loaded.items():
        assert str(v.dtype) == "torch.float32"
        assert v.equal(full[k].bfloat16().float()), k  # the same draw, rounded once to bf16


@pytest.mark.real  # builds the model with torch/transformers
def test_weights_look_initialised(tiny):
    w = _weights(tiny)
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert abs(float(q.std()) - da.INIT_STD) < 0.002 and abs(float(q.mean())) < 0.001
    assert bool((w["model.norm.weight"] == 1).all()) and bool((w["model.layers.0.self_attn.q_proj.bias"] == 0).all())


@pytest.mark.real  # builds the model with torch/transformers
def test_model_from_an_older_stamp_is_rebuilt(tmp_path):
    d = da.make_tiny_model(tmp_path / "m", hidden=64, intermediate=128, vocab_size=1024)
    stamp = json.loads((d / da.STAMP).read_text())
    (d / da.STAMP).write_text(json.dumps({**stamp, "stamp_version": da.STAMP_VERSION - 1}))
    (d / "model.safetensors").write_bytes(b"old")
    assert da.make_tiny_model(d, hidden=64, intermediate=128, vocab_size=1024) == d
    assert json.loads((d / da.STAMP).read_text()) == stamp and (d / "model.safetensors").stat().st_size > 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the old folder is gone, nothing left beside


def test_model_params_check_dtype_and_shards():
    with pytest.raises(UserError, match="dtype"):
        da.model_params("qwen2", dtype="float16")
    with pytest.raises(UserError, match="shard_mb"):
        da.model_params("qwen2", shard_mb=0)
    assert da.model_params("qwen2")["dtype"] == "float32" and da.model_params("qwen2")["shard_mb"] is None
