"""dsplan.inputs.data on a login node: reading LF datasets, lengths after the template, the cache,
the worst batch.  Light: ``tokenizers`` only, no torch (the comparison with LF's own pipeline is in
test_dataset_real.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsplan.errors import UserError
from dsplan.inputs.data import DataProfile, DataSpec, SampleRef, lf_available, measure, measure_many, read_samples
from dsplan.inputs.data import sources
from dsplan.inputs.data.lengths import TokenCounter, infer_seqlen
from tests.conftest import REPO

DEMO = REPO / "tests" / "data" / "lf_demo"
#: The Qwen and Llama-3 special tokens, so both families' templates find them in the vocabulary.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
#: Qwen2's pre-tokenizer split.
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _demo_texts():
    def walk(x):
        if isinstance(x, str):
            yield x
        elif isinstance(x, list):
            for y in x:
                yield from walk(y)
        elif isinstance(x, dict):
            for y in x.values():
                yield from walk(y)

    for f in sorted(DEMO.glob("*.json")):
        if f.name != "dataset_info.json":
            yield from walk(json.loads(f.read_text(encoding="utf-8")))


def build_tokenizer(dest: Path, vocab_size: int = 8000) -> Path:
    """A byte-level BPE tokenizer trained on LF's demo data, Qwen2-style, with the Qwen and
    Llama-3 special tokens (bos ``<|begin_of_text|>``, eos ``<|endoftext|>``); written as
    tokenizer.json + tokenizer_config.json, which LF's AutoTokenizer also loads."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_demo_texts(), trainer=trainer)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 131072,
              "clean_up_tokenization_spaces": False}
    (dest / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dest


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "model")


@pytest.fixture(scope="session")
def tok(tok_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def n_tok(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False).ids)


def write_dataset(folder: Path, name: str, rows, entry: dict | None = None, file_name: str | None = None) -> Path:
    """``rows`` as ``folder/<file_name>`` registered in ``folder/dataset_info.json`` under ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    file_name = file_name or f"{name}.json"
    if rows is not None:
        (folder / file_name).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    info_path = folder / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    info[name] = {"file_name": file_name, **(entry or {})}
    info_path.write_text(json.dumps(info), encoding="utf-8")
    return folder


def spec(folder, name, tok_dir=None, **kw) -> DataSpec:
    return DataSpec(dataset=name, dataset_dir=str(folder), model_name_or_path=str(tok_dir) if tok_dir else None,
                    **{"template": "qwen", "cutoff_len": 2048, **kw})


# ---------------------------------------------------------------- lengths after the template
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"


def test_alpaca_sample_is_counted_as_lf_renders_it(tmp_path, tok_dir, tok):
    rows = [{"instruction": "Name a colour.", "input": "Pick one.", "output": "Blue is a colour."}]
    p = measure(spec(write_dataset(tmp_path, "d", rows), "d", tok_dir), cache_dir=tmp_path / "c")
    # LF: the system (the template's default) and the user turn are one message, each string
    # element tokenized on its own; instruction and input joined by a newline.
    user = QWEN_SYSTEM, "<|im_start|>user\nName a colour.\nPick one.<|im_end|>\n<|im_start|>assistant\n"
    want = sum(n_tok(tok, t) for t in user) + n_tok(tok, "Blue is a colour.<|im_end|>\n")
    assert p.method == "tokenizer" and not p.exact and "estimated" in p.method_note
    assert p.lengths == (want,)
    assert p.stats().max == want and p.truncated == 0 and p.dropped == 0


def test_default_template_counts_its_eos_markers_as_one_token_each(tmp_path, tok_dir, tok):
    rows = [{"instruction": "hi", "input": "", "output": "hello"}]
    p = measure(spec(write_dataset(tmp_path, "d", rows), "d", tok_dir, template="default"), cache_dir=tmp_path / "c")
    assert p.lengths == (n_tok(tok, "Human: hi") + 1 + n_tok(tok, "\nAssistant:") + n_tok(tok, "hello") + 1
                         + n_tok(tok, "\n"),)


def test_efficient_eos_template_adds_one_eos_at_the_end(tmp_path, tok_dir, tok):
    rows = [{"instruction": "hi", "input": "", "output": "hello"}]
    p = measure(spec(write_dataset(tmp_path, "d", rows), "d", tok_dir, template="falcon"), cache_dir=tmp_path / "c")
    assert p.lengths == (n_tok(tok, "User: hi\nFalcon:") + n_tok(tok, "hello\n") + 1,)


def test_reasoning_template_adds_the_empty_thought(tmp_path, tok_dir, tok):
    folder = write_dataset(tmp_path, "d", [{"instruction": "hi", "input": "", "output": "hello"}])
    plain, think, off = measure_many([spec(folder, "d", tok_dir, template=t, enable_thinking=e) for t, e in
                                      (("qwen3_nothink", True), ("qwen3", True), ("qwen3", False))],
                                     cache_dir=tmp_path / "c")
    thought = n_tok(tok, "<think>\n\n</think>\n\n")
    assert think.lengths[0] == plain.lengths[0] + thought
    assert off.lengths[0] == plain.lengths[0] + thought  # in the prompt instead: same length


def test_tools_are_rendered_into_the_system_message(tmp_path, tok_dir):
    tools = json.dumps([{"name": "get_time", "description": "Current time in a city.",
                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                        "required": ["city"]}}])
    conv = [{"from": "human", "value": "Time in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_time", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": "12:00"}, {"from": "gpt", "value": "It is noon."}]
    entry = {"formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}}
    folder = write_dataset(tmp_path, "with", [{"conversations": conv, "tools": tools}], entry)
    write_dataset(folder, "without", [{"conversations": conv, "tools": ""}], entry)
    with_tools, without = measure_many([spec(folder, "with", tok_dir), spec(folder, "without", tok_dir)],
                                       cache_dir=tmp_path / "c")
    assert with_tools.dropped == without.dropped == 0
    assert with_tools.lengths[0] > without.lengths[0] + 50  # Qwen's tool prompt alone is ~100 tokens


def test_unknown_template_is_stated_as_an_assumption(tmp_path, tok_dir):
    p = measure(spec(write_dataset(tmp_path, "d", [{"instruction": "a", "input": "", "output": "b"}]), "d", tok_dir,
                     template="no_such_template"), cache_dir=tmp_path / "c")
    assert p.lengths and any("no copy" in n and "chatml" in n for n in p.notes)


# ---------------------------------------------------------------- reading the way LF reads
def test_lf_demo_datasets_read_with_their_dataset_info(tmp_path, tok_dir):
    names = ("alpaca_en_demo", "identity", "glaive_toolcall_en_demo")
    profiles = measure_many([spec(DEMO, n, tok_dir) for n in names], cache_dir=tmp_path / "c")
    assert [p.rows_read for p in profiles] == [999, 91, 300]
    assert all(p.method == "tokenizer" and p.dropped == 0 and p.lengths for p in profiles)
    both = measure(spec(DEMO, "alpaca_en_demo, identity", tok_dir), cache_dir=tmp_path / "c")
    assert both.lengths == profiles[0].lengths + profiles[1].lengths  # LF concatenates in order


def test_max_samples_is_per_dataset(tmp_path, tok_dir):
    p = measure(spec(DEMO, "alpaca_en_demo,identity", tok_dir, max_samples=10), cache_dir=tmp_path / "c")
    assert p.rows_read == 20 and len(p.lengths) == 20


def test_columns_block_replaces_the_defaults(tmp_path, tok_dir):
    rows = [{"q": "Question?", "input": "a long extra input that a columns block without query drops " * 5,
             "a": "Answer."}]
    folder = write_dataset(tmp_path, "mapped", rows, {"columns": {"prompt": "q", "response": "a"}})
    write_dataset(folder, "with_query", None, {"columns": {"prompt": "q", "query": "input", "response": "a"}},
                  file_name="mapped.json")
    rows_plain = [{"instruction": "Question?", "input": "", "output": "Answer."}]
    write_dataset(folder, "plain", rows_plain)
    mapped, with_query, plain = measure_many([spec(folder, n, tok_dir) for n in ("mapped", "with_query", "plain")],
                                             cache_dir=tmp_path / "c")
    assert mapped.lengths == plain.lengths  # LF: an unnamed column becomes None, "input" is not read
    assert with_query.lengths[0] > plain.lengths[0] + 40


def test_a_column_some_rows_lack_reads_as_empty_and_is_not_refused(tmp_path, tok_dir):
    """``datasets`` builds a column from the union of the rows' keys: only a column in no row stops LF."""
    rows = [{"instruction": "Question?", "output": "Answer."}, {"instruction": "Q2?", "input": "", "output": "A2."}]
    p = measure(spec(write_dataset(tmp_path, "d", rows), "d", tok_dir), cache_dir=tmp_path / "c")
    assert p.refused is None and len(p.lengths) == 2


# ---------------------------------------------------------------- images
_MM = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
       "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


def _mm_rows(images_per_row):
    return [{"messages": [{"role": "user", "content": "<image>" * n + "What is shown?"},
                          {"role": "assistant", "content": "A cat on a mat."}], "images": [f"{i}.png"] * n}
            for i, n in enumerate(images_per_row)]


def test_each_image_adds_the_vlms_tokens_to_its_sample(tmp_path, tok_dir):
    folder = write_dataset(tmp_path, "mm", _mm_rows([0, 1, 3]), _MM)
    p = measure(spec(folder, "mm", tok_dir, image_tokens=752, cutoff_len=4096), cache_dir=tmp_path / "c")
    assert p.refused is None and not p.at_cutoff
    placeholder = p.lengths[1] - p.lengths[0] - 752  # the "<image>" text itself, which LF replaces
    assert 0 < placeholder < 10
    assert p.lengths == (p.lengths[0], p.lengths[0] + 752 + placeholder, p.lengths[0] + 3 * (752 + placeholder))
    assert any("each image counted as 752 tokens" in n for n in p.notes)
    short = measure(spec(folder, "mm", tok_dir, image_tokens=752, cutoff_len=1024), cache_dir=tmp_path / "c")
    assert short.lengths[2] == 1024 and short.truncated == 1  # image tokens count toward cutoff_len, as in LF


@pytest.mark.parametrize("image_tokens, extra, needle", [
    (0, {}, "'mm' has images, whose tokens count toward cutoff_len and which dsplan does not count for this model"),
    (752, {"videos": "videos"}, "'mm' has videos, whose tokens count toward cutoff_len and which dsplan does not "
                                "count"),
])
def test_media_dsplan_cannot_count_plans_at_cutoff(tmp_path, tok_dir, image_tokens, extra, needle):
    entry = {**_MM, "columns": {**_MM["columns"], **extra}}
    folder = write_dataset(tmp_path, "mm", _mm_rows([1, 2]), entry)
    p = measure(spec(folder, "mm", tok_dir, image_tokens=image_tokens), cache_dir=tmp_path / "c")
    assert p.at_cutoff and p.refused is None and p.cutoff_reason == "planned at cutoff_len: " + needle


def test_sharegpt_tags_and_system_message(tmp_path, tok_dir, tok):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]}]
    entry = {"formatting": "sharegpt", "columns": {"messages": "messages"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                      "assistant_tag": "assistant", "system_tag": "system"}}
    p = measure(spec(write_dataset(tmp_path, "d", rows, entry), "d", tok_dir), cache_dir=tmp_path / "c")
    want = (n_tok(tok, "<|im_start|>system\nBe brief.<|im_end|>\n")
            + n_tok(tok, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n") + n_tok(tok, "Hello<|im_end|>\n"))
    assert p.lengths == (want,)


def test_malformed_sharegpt_rows_are_dropped_as_lf_drops_them(tmp_path, tok_dir):
    good = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    rows = [{"conversations": good},
            {"conversations": [{"from": "gpt", "value": "b"}, {"from": "human", "value": "a"}]},  # wrong order
            {"conversations": good[:1]},  # no answer
            {"conversations": good + good}]  # two turns: fine
    p = measure(spec(write_dataset(tmp_path, "d", rows, {"formatting": "sharegpt"}), "d", tok_dir),
                cache_dir=tmp_path / "c")
    assert p.rows_read == 4 and p.dropped == 2 and len(p.lengths) == 2
    assert "LF drops" in p.method_note


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "dir"])
def test_jsonl_csv_and_folders_read_like_json(tmp_path, tok_dir, fmt):
    rows = [{"instruction": f"Say {i} words.", "input": "", "output": " ".join(["word"] * i)} for i in range(1, 6)]
    folder = write_dataset(tmp_path, "ref", rows)
    if fmt == "jsonl":
        (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        write_dataset(folder, "d", None, file_name="d.jsonl")
    elif fmt == "csv":
        lines = ["instruction,input,output"] + [f'"{r["instruction"]}",,"{r["output"]}"' for r in rows]
        (folder / "d.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        write_dataset(folder, "d", None, file_name="d.csv")
    else:
        (folder / "parts").mkdir()
        (folder / "parts" / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        write_dataset(folder, "d", None, file_name="parts")
    ref, got = measure_many([spec(folder, "ref", tok_dir), spec(folder, "d", tok_dir)], cache_dir=tmp_path / "c")
    assert got.lengths == ref.lengths and not got.notes


def test_parquet_without_pyarrow_plans_at_cutoff_with_a_note(tmp_path, tok_dir, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setattr(sources, "_have_pyarrow", lambda: False)
    p = measure(spec(write_dataset(tmp_path, "d", None, file_name="d.parquet"), "d", tok_dir),
                cache_dir=tmp_path / "c")
    assert p.at_cutoff and p.method == "none" and p.notes == ("planned at cutoff_len: install pyarrow to read 'd' "
                                                              "(parquet)",)
    assert p.worst_batch(2).basis == "cutoff" and p.worst_batch(2).tokens == 2 * 2048


def test_parquet_and_arrow_read_when_pyarrow_is_there(tmp_path, tok_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"instruction": "a b c", "input": "", "output": "d e f g"}]
    folder = write_dataset(tmp_path, "ref", rows)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, folder / "d.parquet")
    with pa.OSFile(str(folder / "e.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    write_dataset(folder, "d", None, file_name="d.parquet")
    write_dataset(folder, "e", None, file_name="e.arrow")
    ref, d, e = measure_many([spec(folder, n, tok_dir) for n in ("ref", "d", "e")], cache_dir=tmp_path / "c")
    assert d.lengths == e.lengths == ref.lengths


def hub_only_dataset(tmp_path, monkeypatch) -> Path:
    """A dataset_info.json naming a hub dataset ``alpaca_en``, with empty local HF caches."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_DATASETS_CACHE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps({"alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"}}))
    return folder


def test_hub_dataset_not_local_is_a_note_not_a_failure(tmp_path, tok_dir, monkeypatch):
    folder = hub_only_dataset(tmp_path, monkeypatch)
    p = measure(spec(folder, "alpaca_en", tok_dir), cache_dir=tmp_path / "c")
    assert p.at_cutoff and p.stats() is None and p.histogram() == []
    assert p.notes == ("planned at cutoff_len: dataset not local ('alpaca_en' is llamafactory/alpaca_en on the hub)",)
    wb = p.worst_batch(4)
    assert (wb.rows, wb.seq_len, wb.tokens, wb.basis) == (4, 2048, 4 * 2048, "cutoff")


def test_hub_dataset_in_the_local_hub_cache_is_read(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_DATASETS_CACHE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    snap = tmp_path / "hf" / "hub" / "datasets--someone--chat" / "snapshots" / "abc123" / "data"
    snap.mkdir(parents=True)
    (snap / "train.jsonl").write_text(json.dumps({"instruction": "hi", "input": "", "output": "there"}) + "\n", encoding="utf-8")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps({"chat": {"hf_hub_url": "someone/chat"}}))
    p = measure(spec(folder, "chat", tok_dir), cache_dir=tmp_path / "c")
    assert p.method == "tokenizer" and p.rows_read == 1


@pytest.mark.parametrize("case, note", [
    ("none", "no dataset named"),
    ("ppo", "ppo generates its responses"),
    ("script", "loads through a script, which dsplan does not run"),
    ("remote", "dataset_info.json is on the hub (REMOTE:), not local"),
    ("no_info", "dataset_info.json not found here"),  # the data folder may be where the training runs
])
def test_data_that_is_not_here_to_read_plans_at_cutoff(tmp_path, tok_dir, case, note):
    folder = tmp_path / "data"
    name, kw = "d", {}
    write_dataset(folder, "d", [{"instruction": "a", "input": "", "output": "b"}],
                  {"script_url": "d_script"} if case == "script" else None)
    if case == "none":
        name = ""
    elif case == "ppo":
        kw["stage"] = "ppo"
    elif case == "remote":
        folder = "REMOTE:someone/data"
    elif case == "no_info":
        folder = tmp_path / "elsewhere"
    p = measure(spec(folder, name, tok_dir, **kw), cache_dir=tmp_path / "c")
    assert p.at_cutoff and p.refused is None and len(p.notes) == 1 and p.notes[0].startswith("planned at cutoff_len")
    assert note in p.notes[0] and p.cutoff_reason == p.notes[0]


def _refusal_case(folder: Path, case: str) -> tuple[str, dict]:
    """Write the data of one case LF 0.9.5 refuses; the dataset name and DataSpec keywords."""
    ok = [{"instruction": "a", "input": "", "output": "b"}]
    entries = {"unknown": ("d", ok, None), "ranking": ("d", ok, {"ranking": True}),
               "non_text_input": ("d", [{"instruction": "a", "input": ["x"], "output": "b"}], None),
               "non_text_history": ("d", [{"instruction": "a", "output": "b", "history": [["q"]]}],
                                    {"columns": {"prompt": "instruction", "response": "output", "history": "history"}}),
               "sharegpt_null": ("s", [{"conversations": [{"from": "human", "value": None},
                                                          {"from": "gpt", "value": "b"}]}], {"formatting": "sharegpt"}),
               "no_input_column": ("d", [{"instruction": "a", "output": "b"}] * 2, None),
               "no_mapped_column": ("s", [{"messages": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}],
                                    {"formatting": "sharegpt", "columns": {"messages": "conversations"}}),
               "empty": ("e", [], None), "all_dropped": ("d", [{"instruction": "a", "input": "", "output": 5}] * 3, None)}
    name, rows, entry = entries.get(case, ("d", ok, None))
    write_dataset(folder, name, rows, entry)
    kw: dict = {"stage": "kto"} if case == "ranking" else {}
    if case == "bad_info":
        (folder / "dataset_info.json").write_text("{not json", encoding="utf-8")
    elif case == "entry_not_mapping":
        (folder / "dataset_info.json").write_text(json.dumps({"d": "d.json"}), encoding="utf-8")
    elif case == "missing_file":
        (folder / "d.json").unlink()
    elif case == "mixed_files":
        (folder / "parts").mkdir()
        (folder / "parts" / "a.json").write_text(json.dumps(ok), encoding="utf-8")
        (folder / "parts" / "README.md").write_text("x", encoding="utf-8")
        write_dataset(folder, "d", None, file_name="parts")
    elif case == "undecodable":
        (folder / "d.json").write_bytes(b"\xff\xfe\x00garbage")
    elif case in ("max_samples_text", "max_samples_negative"):
        kw["max_samples"] = "ten" if case == "max_samples_text" else -3
    return ("other" if case == "unknown" else name), kw


@pytest.mark.parametrize("case, reason", [
    ("bad_info", "dataset_info.json: not readable JSON"),
    ("entry_not_mapping", "the entry 'd' is not a mapping: LF will refuse it"),
    ("unknown", "'other' is not in "),
    ("ranking", "'d' is a ranking (pairwise) dataset, and stage kto: LF will refuse it"),
    ("missing_file", "d.json not found: LF will refuse it"),
    ("mixed_files", "'d': files of one type only"),
    ("undecodable", "cannot read 'd' (UnicodeDecodeError"),
    ("max_samples_text", "max_samples 'ten' is not an integer: LF will refuse it"),
    ("max_samples_negative", "0 usable samples (0 dropped; max_samples -3 keeps none): LF will refuse this dataset"),
    ("empty", "0 usable samples (0 dropped): LF will refuse this dataset"),
    ("no_input_column", "'d' has no column 'input' (LF's alpaca converter reads it from every row, a KeyError)"),
    ("no_mapped_column", "'s' has no column 'conversations' (LF's sharegpt converter reads it"),
    ("all_dropped", "0 usable samples (3 dropped): LF will refuse this dataset"),
    ("non_text_input", "row 1 of 'd': input is list, not text: LF will refuse it"),
    ("non_text_history", "row 1 of 'd': history holds list, not a (query, response) pair: LF will refuse it"),
    ("sharegpt_null", "row 1 of 's': value is null, not text: LF will refuse it"),
])
def test_data_lf_will_refuse_is_a_refusal_not_a_plan(tmp_path, tok_dir, case, reason):
    """LF 0.9.5's loader, parser or converter raises on each of these (checked against its source):
    the profile says so in one line instead of planning at cutoff_len quietly."""
    folder = tmp_path / "data"
    name, kw = _refusal_case(folder, case)
    p = measure(spec(folder, name, tok_dir, **kw), cache_dir=tmp_path / "c")
    assert p.at_cutoff and p.refused and reason in p.refused, p.refused
    assert p.refused.endswith(("LF will refuse it", "LF will refuse this dataset")) and "\n" not in p.refused
    assert p.cutoff_reason == p.refused and p.notes[-1] == p.refused


def test_a_refusal_is_not_cached_and_clears_when_the_data_is_fixed(tmp_path, tok_dir):
    folder = write_dataset(tmp_path / "data", "d", [{"instruction": 7, "input": "", "output": "b"}])
    assert "instruction is int" in measure(spec(folder, "d", tok_dir), cache_dir=tmp_path / "c").refused
    write_dataset(folder, "d", [{"instruction": "seven", "input": "", "output": "b"}])
    p = measure(spec(folder, "d", tok_dir), cache_dir=tmp_path / "c")
    assert p.refused is None and len(p.lengths) == 1


def test_read_samples_of_data_lf_refuses_is_a_user_error(tmp_path):
    folder = write_dataset(tmp_path / "data", "d", [{"instruction": "a", "input": "", "output": "b"}])
    with pytest.raises(UserError, match="'nope' is not in .*: LF will refuse it"):
        read_samples(spec(folder, "nope"), [SampleRef("nope", 0)])


# ---------------------------------------------------------------- truncation and the worst batch
@pytest.mark.parametrize("args, want", [
    ((3000, 2000, 1000), (600, 400)), ((2000, 3000, 1000), (400, 600)), ((1000, 100, 1000), (900, 100)),
    ((100, 1000, 1000), (100, 900)), ((100, 500, 1000), (100, 500)), ((500, 100, 1000), (500, 100)),
    ((10, 10, 1000), (10, 10)),
])
def test_infer_seqlen_is_lfs(args, want):
    assert infer_seqlen(*args) == want


def _long_among_short(folder: Path, long_words: int = 600) -> Path:
    rows = [{"instruction": f"Short question {i}.", "input": "", "output": "Short answer."} for i in range(30)]
    rows.insert(17, {"instruction": "Tell a long story.", "input": "", "output": " ".join(["story"] * long_words)})
    return write_dataset(folder, "mix", rows)


def test_truncation_cuts_to_cutoff_and_is_counted(tmp_path, tok_dir):
    folder = _long_among_short(tmp_path)
    full, cut = measure_many([spec(folder, "mix", tok_dir, cutoff_len=c) for c in (4096, 128)],
                             cache_dir=tmp_path / "c")
    assert full.truncated == 0 and full.stats().max > 128 and full.longest_untruncated == full.stats().max
    assert cut.truncated == 1 and cut.stats().max == 128 and cut.longest_untruncated == full.stats().max
    assert cut.lengths[:17] == full.lengths[:17]


def test_worst_batch_pads_the_longest_sample_to_a_multiple_of_8(tmp_path, tok_dir):
    p = measure(spec(_long_among_short(tmp_path), "mix", tok_dir), cache_dir=tmp_path / "c")
    longest = p.stats().max
    wb = p.worst_batch(4)
    assert wb.basis == "data" and wb.rows == 4 and wb.seq_len == -(-longest // 8) * 8 and wb.tokens == 4 * wb.seq_len
    assert wb.cutoff_tokens == 4 * 2048 and wb.tokens < wb.cutoff_tokens
    assert p.longest(1) == [SampleRef("mix", 17)]
    assert read_samples(p.spec, p.longest(2))[0]["instruction"] == "Tell a long story."


@pytest.mark.parametrize("kw, seq", [({"packing": True}, 2048), ({"neat_packing": True}, 2048),
                                     ({"packing": True, "cutoff_len": 1001}, 1008),
                                     ({"stage": "pt", "cutoff_len": 1001}, 1001)])
def test_packing_makes_every_row_cutoff_long(tmp_path, tok_dir, kw, seq):
    p = measure(spec(_long_among_short(tmp_path), "mix", tok_dir, **kw), cache_dir=tmp_path / "c")
    wb = p.worst_batch(2)
    assert wb.basis == "packing" and wb.seq_len == seq and wb.tokens == 2 * seq


@pytest.mark.parametrize("stage, packing, neat, packs", [
    ("pt", None, False, True), ("pt", True, False, True), ("pt", False, False, False),
    ("sft", None, False, False), ("sft", True, False, True), ("sft", None, True, True), ("sft", False, True, True),
    ("dpo", True, False, False), ("rm", True, False, False), ("kto", True, False, False), ("ppo", True, False, False),
])
def test_packs_only_where_lfs_processor_packs(stage, packing, neat, packs):
    """LF 0.9.5's _get_dataset_processor: pt packs unless packing is false, sft with packing
    (neat_packing turns it on); the pairwise, feedback and unsupervised processors never pack."""
    assert DataSpec(dataset="d", stage=stage, packing=packing, neat_packing=neat).packs is packs


def test_dpo_with_packing_is_per_sample_rows_one_short_of_cutoff(tmp_path, tok_dir):
    rows = [{"instruction": "q " * (5 + i), "chosen": "c " * (10 + i), "rejected": "r " * 4} for i in range(6)]
    rows.append({"instruction": "long", "chosen": "story " * 400, "rejected": "no"})
    entry = {"ranking": True, "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}
    folder = write_dataset(tmp_path, "pairs", rows, entry)
    plain, packed = measure_many([spec(folder, "pairs", tok_dir, stage="dpo", cutoff_len=256),
                                  spec(folder, "pairs", tok_dir, stage="dpo", cutoff_len=256, packing=True)],
                                 cache_dir=tmp_path / "c")
    assert packed.worst_batch(2).basis == "data" and packed.stats().max == 255  # LF still keeps a slot free
    assert plain.stats().max == 256 and packed.worst_batch(2).tokens == plain.worst_batch(2).tokens == 4 * 256


def test_packing_truncates_samples_one_short_of_cutoff(tmp_path, tok_dir):
    p = measure(spec(_long_among_short(tmp_path), "mix", tok_dir, packing=True, cutoff_len=128),
                cache_dir=tmp_path / "c")
    assert p.stats().max == 127 and p.truncated == 1  # LF's DataArguments lowers cutoff_len by one


def test_mask_history_keeps_the_last_turn_first(tmp_path, tok_dir):
    conv = [{"from": "human", "value": "first " * 50}, {"from": "gpt", "value": "one " * 50},
            {"from": "human", "value": "second"}, {"from": "gpt", "value": "two"}]
    folder = write_dataset(tmp_path, "d", [{"conversations": conv}], {"formatting": "sharegpt"})
    plain, masked, whole = measure_many([spec(folder, "d", tok_dir, cutoff_len=40),
                                         spec(folder, "d", tok_dir, cutoff_len=40, mask_history=True),
                                         spec(folder, "d", tok_dir, cutoff_len=4096)], cache_dir=tmp_path / "c")
    assert plain.lengths == (40,) and plain.truncated == 1
    assert masked.lengths[0] <= 40 and whole.lengths[0] > 100


def test_pairwise_counts_chosen_and_rejected(tmp_path, tok_dir):
    p = measure(spec(DEMO, "dpo_en_demo", tok_dir, stage="dpo", cutoff_len=8192), cache_dir=tmp_path / "c")
    assert p.rejected is not None and len(p.rejected) == len(p.lengths) == 100
    assert p.lengths != p.rejected
    longest = max(max(p.lengths), max(p.rejected))
    assert p.stats().max == longest
    wb = p.worst_batch(2)
    assert wb.rows == 4 and wb.seq_len == -(-longest // 8) * 8 and wb.cutoff_tokens == 4 * 8192


def test_kto_sample_is_its_prompt_and_its_one_answer(tmp_path, tok_dir):
    rows = [{"instruction": "Rate this.", "input": "", "output": "Good answer.", "label": True},
            {"instruction": "Rate that.", "input": "", "output": "Bad answer.", "label": False}]
    folder = write_dataset(tmp_path, "kto", rows, {"columns": {"prompt": "instruction", "response": "output",
                                                                "kto_tag": "label"}})
    write_dataset(folder, "sft", [{k: v for k, v in r.items() if k != "label"} for r in rows])
    kto, sft = measure_many([spec(folder, "kto", tok_dir, stage="kto"), spec(folder, "sft", tok_dir)],
                            cache_dir=tmp_path / "c")
    assert kto.dropped == 0 and kto.lengths == sft.lengths
    sft_of_kto = measure(spec(folder, "kto", tok_dir), cache_dir=tmp_path / "c")  # sft drops KTO rows: all of them
    assert sft_of_kto.refused == "0 usable samples (2 dropped): LF will refuse this dataset"


def test_stats_and_histogram():
    lengths = tuple(range(1, 101)) + (1000,)
    p = DataProfile(spec=DataSpec(dataset="x", cutoff_len=1024), method="tokenizer", method_note="", lengths=lengths,
                    truncated=0, dropped=0)
    s = p.stats()
    assert (s.count, s.max, s.min, s.median, s.p99) == (101, 1000, 1, 51, 100)
    lines = p.histogram(bins=4, width=10)
    assert len(lines) == 4 and [int(line.rsplit(" ", 1)[1]) for line in lines] == [100, 0, 0, 1]
    assert lines[0].startswith("   1-256 ") and lines[-1].startswith(" 769-1024") and "#" * 10 in lines[0]
    out = p.to_json(micro_batch=2)
    assert out["stats"]["max"] == 1000 and out["worst_batch"]["tokens"] == 2 * 1000 and json.dumps(out)


# ---------------------------------------------------------------- fallbacks
def test_without_a_tokenizer_the_characters_rate_is_used_and_stated(tmp_path):
    rows = [{"instruction": "", "input": "", "output": "a" * 350}, {"instruction": "", "input": "", "output": "汉" * 100},
            {"instruction": "", "input": "", "output": "7" * 100}]
    p = measure(spec(write_dataset(tmp_path, "d", rows), "d", None, template="empty"), cache_dir=tmp_path / "c")
    assert p.method == "chars" and "characters per token" in p.method_note and "Latin 3.5" in p.method_note
    assert any("no tokenizer.json" in n for n in p.notes)
    # "empty" template: the bare answer (no eos, and an empty user turn is no token);
    # Latin 3.5 characters a token, CJK and digits 1
    assert p.lengths == (100, 100, 100)


def test_engine_lf_without_llamafactory_falls_back_to_the_estimate(tmp_path, tok_dir):
    if lf_available(sys.executable):
        pytest.skip("this interpreter has llamafactory (test_dataset_real.py covers that path)")
    s = spec(DEMO, "identity", tok_dir)
    auto = measure(s, python=sys.executable, cache_dir=tmp_path / "c")
    forced = measure(s, python=sys.executable, engine="lf", cache_dir=tmp_path / "c")
    assert auto.method == forced.method == "tokenizer" and auto.lengths == forced.lengths
    assert not auto.notes and any("data pipeline failed" in n and "ModuleNotFoundError" in n for n in forced.notes)


# ---------------------------------------------------------------- the cache
def test_second_call_does_not_tokenize_and_a_new_cutoff_is_arithmetic(tmp_path, tok_dir, monkeypatch):
    first = measure(spec(DEMO, "alpaca_en_demo", tok_dir), cache_dir=tmp_path / "c")
    assert not first.cached and list((tmp_path / "c").glob("*.json"))

    def no_tokenizing(self, texts):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(TokenCounter, "count", no_tokenizing)
    again = measure(spec(DEMO, "alpaca_en_demo", tok_dir), cache_dir=tmp_path / "c")
    other_cutoff = measure(spec(DEMO, "alpaca_en_demo", tok_dir, cutoff_len=256), cache_dir=tmp_path / "c")
    assert again.cached and again.lengths == first.lengths
    assert other_cutoff.cached and other_cutoff.stats().max == 256 and other_cutoff.truncated > 0


def test_cache_follows_the_files_size_and_mtime(tmp_path, tok_dir):
    folder = write_dataset(tmp_path, "d", [{"instruction": "a", "input": "", "output": "b"}])
    first = measure(spec(folder, "d", tok_dir), cache_dir=tmp_path / "c")
    write_dataset(folder, "d", [{"instruction": "a", "input": "", "output": "b " * 40}])
    second = measure(spec(folder, "d", tok_dir), cache_dir=tmp_path / "c")
    assert not second.cached and second.lengths[0] > first.lengths[0]
    third = measure(spec(folder, "d", tok_dir, template="llama3"), cache_dir=tmp_path / "c")
    assert not third.cached


def test_default_cache_dir_is_under_xdg_cache_home(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    measure(spec(DEMO, "identity", tok_dir))
    assert list((tmp_path / "xdg" / "dsplan" / "lengths").glob("*.json"))
    assert not list((tmp_path / "xdg" / "dsplan" / "lengths").glob(".*.tmp"))  # atomic: no temp left


def test_an_unwritable_or_corrupt_cache_costs_only_time(tmp_path, tok_dir):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    p = measure(spec(DEMO, "identity", tok_dir), cache_dir=blocked / "c")
    assert p.lengths and not p.cached
    good = measure(spec(DEMO, "identity", tok_dir), cache_dir=tmp_path / "c")
    for f in (tmp_path / "c").glob("*.json"):
        f.write_text("{broken")
    again = measure(spec(DEMO, "identity", tok_dir), cache_dir=tmp_path / "c")
    assert not again.cached and again.lengths == good.lengths


# ---------------------------------------------------------------- the login node stays light
def test_login_node_path_imports_no_torch(tmp_path, tok_dir):
    code = (
        "import sys\n"
        "from dsplan.inputs.data import DataSpec, measure\n"
        f"s = DataSpec(dataset='alpaca_en_demo', dataset_dir={str(DEMO)!r}, template='qwen',"
        f" model_name_or_path={str(tok_dir)!r})\n"
        f"p = measure(s, cache_dir={str(tmp_path / 'c')!r})\n"
        "heavy = ('torch', 'transformers', 'datasets', 'llamafactory', 'deepspeed', 'tokenizers')\n"
        "print(p.method, p.cached, len(p.lengths), [m for m in heavy if m in sys.modules])\n")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(REPO))) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr
    assert runs[0].stdout.split() == ["tokenizer", "False", "999", "['tokenizers']"]
    assert runs[1].stdout.split() == ["tokenizer", "True", "999", "[]"]  # warm: not even tokenizers


def test_from_lf_args(tmp_path):
    s = DataSpec.from_lf_args({"dataset": ["a", "b"], "cutoff_len": 512, "stage": "dpo", "template": "llama3",
                               "packing": None, "max_samples": 5}, base_dir=tmp_path)
    assert s.names == ["a", "b"] and s.dataset_dir == str(tmp_path / "data") and s.cutoff_len == 512
    assert s.pairwise and not s.packs and s.max_samples == 5 and s.enable_thinking is True
    assert DataSpec.from_lf_args({"dataset": "c", "stage": "pt"}).packs
    assert DataSpec.from_lf_args({"dataset": "c", "dataset_dir": "/abs"}).dataset_dir == "/abs"


def test_read_samples_of_an_unreadable_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        read_samples(DataSpec(dataset="d", dataset_dir=str(tmp_path)), [SampleRef("d", 0)])
