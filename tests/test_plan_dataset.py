"""Planning for the worst real batch: a named dataset's lengths replace cutoff_len x micro-batch in
the estimate (issue 12, items 3 and 5).  Login-node: the tokenizer estimate through ``tokenizers``,
no torch; the datasets and the tokenizer are built in tmp folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from dsplan.codes import Component
from dsplan.errors import UserError
from dsplan.inputs.data import DataSpec, measure
from dsplan.inputs.request import Request, resolve
from dsplan.launch.preflight import load_preflight
from dsplan.plan.dataset import FAR_BELOW, data_seq_len
from dsplan.plan.planner import make_plan
from tests.conftest import QWEN_SMALL, run_dsplan
from tests.test_dataset import DEMO, build_tokenizer, hub_only_dataset, write_dataset

#: A Qwen2.5-1.5B-shaped model: large enough that full tuning on 4 x 14 GiB at cutoff 4096
#: needs zero2_offload, while the demo data's worst batch fits zero2.
QWEN_MID = {**QWEN_SMALL, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
            "num_attention_heads": 12}
FLIP = ["--gpus", "4x14G", "--host-ram", "64G", "--method", "full", "--cutoff-len", "4096", "--micro-batch", "1",
        "--grad-accum", "1", "--template", "qwen"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "model")


def _model(folder: Path, tok_dir: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    for f in tok_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory, tok_dir) -> Path:
    return _model(tmp_path_factory.mktemp("small") / "Qwen-small", tok_dir, QWEN_SMALL)


@pytest.fixture(scope="module")
def mid(tmp_path_factory, tok_dir) -> Path:
    return _model(tmp_path_factory.mktemp("mid") / "Qwen-mid", tok_dir, QWEN_MID)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DSPLAN_TRAIN_PYTHON", raising=False)


def _rows(n_short: int = 40, long_words: int = 300) -> list[dict]:
    rows = [{"instruction": f"Say {i % 7 + 1} words.", "input": "", "output": " ".join(["word"] * (i % 7 + 1))}
            for i in range(n_short)]
    rows.append({"instruction": "Write a long answer.", "input": "", "output": " ".join(["story"] * long_words)})
    return rows


def _alpaca_jsonl(folder: Path, name: str = "chat", rows: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows or _rows()), encoding="utf-8")
    return write_dataset(folder, name, None, file_name=f"{name}.jsonl")


def _plan(model: Path, flags: dict | None = None, user: dict | None = None, tmp: Path | None = None, **kw):
    """(inputs, plan) as `dsplan plan` makes them, with ``user`` as the LF YAML."""
    lf_yaml = None
    if user is not None:
        lf_yaml = tmp / "lf.yaml"
        lf_yaml.write_text(yaml.safe_dump(user))
    req = Request(lf_yaml=str(lf_yaml) if lf_yaml else None, gpus=kw.pop("gpus", "1x24G"), model=str(model),
                  method=kw.pop("method", None), flags={"template": "qwen", **(flags or {})})
    inputs = resolve(req)
    return inputs, make_plan(inputs.profile, inputs.spec, inputs.settings, data=inputs.data, **kw)


def _transients(plan, tier="zero2"):
    gpu = plan.get(tier).estimate.gpu
    return gpu[Component.ACTIVATIONS], gpu[Component.LOGITS]


# ---------------------------------------------------------------- the worst batch in the estimate
def test_alpaca_worst_batch_replaces_cutoff_in_the_estimate(tmp_path, small):
    folder = _alpaca_jsonl(tmp_path / "data")
    flags = {"dataset": "chat", "dataset_dir": str(folder), "cutoff_len": 4096, "micro_batch": 4}
    inputs, plan = _plan(small, flags)
    data = inputs.data
    assert data.method == "tokenizer" and not data.at_cutoff and data.stats().count == 41
    longest = data.stats().max
    wb = data.worst_batch(4)
    assert wb.seq_len == -(-longest // 8) * 8 and wb.basis == "data"
    w = plan.workload
    assert w.data_len == wb.seq_len == w.seq_len and w.tokens == wb.tokens == 4 * wb.seq_len
    assert plan.get("zero2").micro_batch == 4
    # the same settings at cutoff_len: activations and logits scale with the tokens
    at_cutoff = make_plan(inputs.profile, inputs.spec, inputs.settings)
    act, logits = _transients(plan)
    act0, logits0 = _transients(at_cutoff)
    assert act < act0 and logits < logits0
    mb0 = at_cutoff.get("zero2").micro_batch  # cutoff_len x 4 does not fit 24 GiB
    assert logits == pytest.approx(logits0 * wb.tokens / (mb0 * 4096), rel=1e-6)
    assert plan.get("zero2").estimate.gpu_bytes < at_cutoff.get("zero2").estimate.gpu_bytes
    assert any(line.startswith("planned for the worst real batch (tokenizer estimate)") for line in plan.why)


def test_sharegpt_worst_batch_from_the_yaml(tmp_path, small):
    conv = [{"from": "human", "value": "Tell me about the sea."}, {"from": "gpt", "value": "waves " * 120}]
    short = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    folder = write_dataset(tmp_path / "data", "talk", [{"conversations": short}] * 20 + [{"conversations": conv}],
                           {"formatting": "sharegpt"})
    user = {"dataset": "talk", "dataset_dir": str(folder), "cutoff_len": 2048, "per_device_train_batch_size": 2}
    inputs, plan = _plan(small, user=user, tmp=tmp_path)
    longest = inputs.data.stats().max
    assert 120 < longest < 400 and inputs.data.dropped == 0
    assert plan.workload.data_len == -(-longest // 8) * 8 and plan.workload.tokens == 2 * plan.workload.data_len


def test_relative_dataset_dir_is_read_from_the_current_folder(tmp_path, small, monkeypatch):
    _alpaca_jsonl(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    inputs, plan = _plan(small, {"dataset": "chat", "cutoff_len": 4096})  # LF's default dataset_dir "data"
    assert inputs.data.stats().count == 41 and plan.workload.data_len < 4096


def test_micro_batch_search_uses_the_worst_batch_at_each_candidate(tmp_path, small):
    folder = _alpaca_jsonl(tmp_path / "data")
    flags = {"dataset": "chat", "dataset_dir": str(folder), "cutoff_len": 4096, "micro_batch": 8}
    _, plan = _plan(small, flags)
    _, at_cutoff = _plan(small, {**flags, "dataset": None})
    tp, tp0 = plan.get("zero2"), at_cutoff.get("zero2")
    assert tp.fits and tp0.fits
    assert tp.micro_batch == 8 and tp0.micro_batch < 8  # cutoff_len x 8 does not fit 24 GiB, the data does
    assert tp.micro_batch * tp.grad_accum == tp0.micro_batch * tp0.grad_accum
    assert any(line.startswith("larger micro-batch: zero2 fits the worst real batch at micro-batch 8")
               for line in plan.why)


def test_packing_plans_every_row_at_cutoff(tmp_path, small):
    folder = _alpaca_jsonl(tmp_path / "data")
    flags = {"dataset": "chat", "dataset_dir": str(folder), "cutoff_len": 1024, "micro_batch": 2}
    _, plain = _plan(small, {k: v for k, v in flags.items() if k != "dataset"})
    for knob in ("packing", "neat_packing"):
        inputs, plan = _plan(small, user={knob: True}, flags=flags, tmp=tmp_path)
        assert inputs.data.worst_batch(2).basis == "packing"
        assert plan.workload.data_len == 1024 and plan.workload.tokens == 2 * 1024
        assert plan.cutoff_plan is None
        assert any(line.startswith("packing: every sequence is cutoff_len (1024)") for line in plan.why)
    _, packed = _plan(small, user={"packing": True}, flags=flags, tmp=tmp_path)
    assert packed.get("zero2").estimate.gpu_bytes == plain.get("zero2").estimate.gpu_bytes


def test_hub_only_dataset_is_a_note_and_the_cutoff_plan(tmp_path, small, monkeypatch):
    folder = hub_only_dataset(tmp_path, monkeypatch)
    flags = {"dataset": "alpaca_en", "dataset_dir": str(folder), "cutoff_len": 2048, "micro_batch": 2}
    inputs, plan = _plan(small, flags)
    _, plain = _plan(small, {**flags, "dataset": None})
    assert inputs.data.at_cutoff and plan.workload.data_len is None and plan.cutoff_plan is None
    note = "planned at cutoff_len: dataset not local ('alpaca_en' is llamafactory/alpaca_en on the hub)"
    assert [line for line in plan.why if line not in plain.why] == [note]
    assert [t.estimate.gpu_bytes for t in plan.tiers] == [t.estimate.gpu_bytes for t in plain.tiers]


def test_no_dataset_named_is_todays_plan(small):
    inputs, plan = _plan(small, {"cutoff_len": 2048})
    assert inputs.data is None and plan.data is None and plan.workload.data_len is None
    assert plan.to_dict()["dataset"] is None
    assert not any("cutoff_len" in line for line in plan.why)


def test_a_dataset_folder_that_is_not_here_is_a_note(tmp_path, small):
    """No dataset_info.json here: the data may be where the training runs (LF's examples planned
    outside LF's repository); the plan keeps cutoff_len and says why."""
    inputs, plan = _plan(small, {"dataset": "x", "dataset_dir": str(tmp_path / "nowhere"), "cutoff_len": 2048})
    assert inputs.data.at_cutoff and inputs.data.refused is None and plan.workload.data_len is None
    assert any(line.startswith("planned at cutoff_len:") and "dataset_info.json not found here" in line
               for line in plan.why)


def test_the_at_cutoff_reason_is_the_same_in_the_block_and_in_why(tmp_path, small):
    """A model without tokenizer.json notes that first; the reason the plan kept cutoff_len is another note."""
    pytest.importorskip("pyarrow")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(QWEN_SMALL))
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "d.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    write_dataset(folder, "d", None, file_name="d.parquet")
    r = run_dsplan("plan", "--gpus", "1x24G", "--model", str(bare), "--dataset", "d", "--dataset-dir", str(folder),
                   "--template", "qwen", env=_cli_env(tmp_path))
    assert r.returncode == 0, r.stderr
    block = next(line for line in r.stdout.splitlines() if line.startswith("dataset d: "))
    assert block.startswith("dataset d: planned at cutoff_len: cannot read 'd' (") and "no tokenizer.json" not in block
    assert f"  - {block.removeprefix('dataset d: ')}" in r.stdout.splitlines()
    assert any(line.startswith("  - dataset: no tokenizer.json for ") for line in r.stdout.splitlines())


def _one_line_exit_2(r, want: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and want in r.stderr, r.stderr


@pytest.mark.parametrize("command", ["plan", "render", "run"])
def test_empty_or_all_dropped_dataset_is_one_line_exit_2(tmp_path, small, command):
    """LF 0.9.5 stops on a dataset with no usable sample (datasets: 'corresponds to no data'; LF:
    'Cannot find valid samples'): plan, render and run say so before writing anything."""
    folder = write_dataset(tmp_path / "data", "empty", [])
    write_dataset(folder, "allbad", [{"conversations": [{"from": "gpt", "value": "b"}]}] * 5,
                  {"formatting": "sharegpt"})
    out = tmp_path / "out"
    extra = {"plan": [], "render": ["-o", str(out)], "run": ["--dry-run", "--run-dir", str(out)]}[command]
    for name, dropped in (("empty", 0), ("allbad", 5)):
        r = run_dsplan(command, "--gpus", "1x24G", "--model", str(small), "--dataset", name, "--dataset-dir",
                       str(folder), "--template", "qwen", *extra, env=_cli_env(tmp_path))
        _one_line_exit_2(r, f"dataset {name}: 0 usable samples ({dropped} dropped): LF will refuse this dataset")
        assert not out.exists()


def test_run_preflight_on_an_empty_dataset_is_the_same_refusal(tmp_path, small):
    folder = write_dataset(tmp_path / "data", "empty", [])
    r = run_dsplan("run", "--gpus", "1x24G", "--model", str(small), "--dataset", "empty", "--dataset-dir",
                   str(folder), "--template", "qwen", "--dry-run", "--preflight", "--run-dir", str(tmp_path / "run"),
                   env=_cli_env(tmp_path))
    _one_line_exit_2(r, "dsplan: error: dataset empty: 0 usable samples (0 dropped): LF will refuse this dataset")


def test_load_preflight_says_lfs_refusal_as_it_is(tmp_path, small):
    """A refused profile that reaches --preflight (another caller than run's) keeps its one reason."""
    folder = write_dataset(tmp_path / "data", "empty", [])
    profile = measure(DataSpec(dataset="empty", dataset_dir=str(folder), template="qwen",
                               model_name_or_path=str(small)), cache_dir=tmp_path / "c")
    with pytest.raises(UserError) as e:
        load_preflight(None, {}, 2, None, profile=profile)
    assert str(e.value) == "--preflight: dataset empty: 0 usable samples (0 dropped): LF will refuse this dataset"


@pytest.mark.parametrize("case, want", [
    ("nosuch", "dataset nosuch: 'nosuch' is not in "),
    ("kto", "dataset pairs: 'pairs' is a ranking (pairwise) dataset, and stage kto: LF will refuse it"),
    ("bad_info", "dataset_info.json: not readable JSON"),
    ("missing_file", "dataset gone: 'gone': "),
    ("max_samples", "dataset chat: max_samples 'ten' is not an integer: LF will refuse it"),
    ("max_samples_negative", "dataset chat: 0 usable samples (0 dropped; max_samples -3 keeps none)"),
    ("non_text", "dataset nums: row 1 of 'nums': instruction is int, not text: LF will refuse it"),
])
def test_data_lf_surely_refuses_is_one_line_exit_2(tmp_path, small, case, want):
    folder = _alpaca_jsonl(tmp_path / "data")
    write_dataset(folder, "pairs", [{"instruction": "q", "chosen": "a", "rejected": "b"}],
                  {"ranking": True, "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}})
    write_dataset(folder, "gone", None, file_name="gone.json")
    write_dataset(folder, "nums", [{"instruction": 7, "input": "", "output": "seven"}])
    user = {"dataset": {"nosuch": "nosuch", "kto": "pairs", "missing_file": "gone", "non_text": "nums"}.get(case, "chat"),
            "dataset_dir": str(folder), "template": "qwen", "stage": "kto" if case == "kto" else "sft"}
    user.update({"max_samples": "ten"} if case == "max_samples" else
                {"max_samples": -3} if case == "max_samples_negative" else {})
    if case == "bad_info":
        (folder / "dataset_info.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "lf.yaml").write_text(yaml.safe_dump(user))
    r = run_dsplan("plan", str(tmp_path / "lf.yaml"), "--gpus", "1x24G", "--model", str(small), env=_cli_env(tmp_path))
    _one_line_exit_2(r, want)
    assert r.stderr.rstrip().endswith(("LF will refuse it", "LF will refuse this dataset"))


@pytest.mark.parametrize("cutoff", [4096, 1024])  # the demo's longest pair is ~2.6k tokens: untruncated, truncated
def test_dpo_with_packing_plans_the_same_tokens_as_without(tmp_path, small, cutoff):
    """LF packs only pt and sft: dpo's pairwise processor ignores packing (rows one short of
    cutoff_len, padded back up to it), so dpo with packing plans its real rows, as without."""
    user = {"stage": "dpo", "dataset": "dpo_en_demo", "dataset_dir": str(DEMO), "cutoff_len": cutoff,
            "per_device_train_batch_size": 2}
    plans = {}
    for knob in (None, "packing"):
        inputs, plan = _plan(small, user={**user, **({knob: True} if knob else {})}, tmp=tmp_path)
        assert not inputs.data.spec.packs and inputs.data.worst_batch(2).basis == "data"
        plans[knob] = plan
    plain, packed = plans[None], plans["packing"]
    assert packed.workload.data_len == plain.workload.data_len == min(cutoff, plain.data.worst_batch(1).seq_len)
    assert packed.to_dict()["dataset"]["planned"] == plain.to_dict()["dataset"]["planned"]
    assert packed.to_dict()["dataset"]["planned"]["basis"] == "data" and not packed.to_dict()["dataset"]["packing"]
    assert not any(line.startswith("packing:") for line in packed.why)
    assert [t.estimate.gpu_bytes for t in packed.tiers] == [t.estimate.gpu_bytes for t in plain.tiers]


def test_pairs_plan_chosen_and_rejected_rows(tmp_path, small):
    user = {"stage": "dpo", "dataset": "dpo_en_demo", "dataset_dir": str(DEMO), "cutoff_len": 8192,
            "per_device_train_batch_size": 2}
    inputs, plan = _plan(small, user=user, tmp=tmp_path)
    data = inputs.data
    longest = max(max(c, r) for c, r in zip(data.lengths, data.rejected))
    wb = data.worst_batch(2)
    assert wb.rows == 4 and wb.seq_len == -(-longest // 8) * 8
    w = plan.workload
    assert w.sequences == 2 and w.data_len == wb.seq_len
    mb = plan.chosen.micro_batch
    assert plan.to_dict()["dataset"]["planned"]["tokens"] == 2 * mb * wb.seq_len == data.worst_batch(mb).tokens


def test_kto_kl_rows_are_planned_at_twice_the_longest_sample(tmp_path, small):
    rows = [{"messages": [{"role": "user", "content": "q " * (5 + i)}, {"role": "assistant", "content": "a " * 20}],
             "label": i % 2 == 0} for i in range(10)]
    entry = {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                      "assistant_tag": "assistant"}}
    folder = write_dataset(tmp_path / "data", "fb", rows, entry)
    user = {"stage": "kto", "dataset": "fb", "dataset_dir": str(folder), "cutoff_len": 4096}
    inputs, plan = _plan(small, user=user, tmp=tmp_path)
    longest = inputs.data.stats().max
    assert plan.workload.data_len == -(-2 * longest // 8) * 8
    assert any(line.startswith("kto: the KL batch") for line in plan.why)
    assert data_seq_len(inputs.data, 64) == 64  # never above cutoff_len


def test_a_lower_cutoff_truncates_the_measured_lengths(tmp_path, small):
    folder = _alpaca_jsonl(tmp_path / "data")
    data = measure(DataSpec(dataset="chat", dataset_dir=str(folder), template="qwen", cutoff_len=4096,
                            model_name_or_path=str(small)), cache_dir=tmp_path / "c")
    seq = data.worst_batch(1).seq_len
    assert data_seq_len(data, 4096) == seq
    assert data_seq_len(data, seq - 20) == -(-(seq - 20) // 8) * 8
    assert data_seq_len(replace(data, spec=replace(data.spec, stage="pt")), 101) == 101  # pt pads to the longest


def test_second_plan_reads_the_cache(tmp_path, small):
    folder = _alpaca_jsonl(tmp_path / "data")
    flags = {"dataset": "chat", "dataset_dir": str(folder), "cutoff_len": 4096}
    first, _ = _plan(small, flags)
    second, _ = _plan(small, flags)
    assert not first.data.cached and second.data.cached and first.data.lengths == second.data.lengths


# ---------------------------------------------------------------- what plan shows
def _cli_env(tmp_path) -> dict:
    return {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "DSPLAN_TRAIN_PYTHON": ""}


def test_plan_prints_the_dataset_block_and_histogram(tmp_path, small):
    folder = _alpaca_jsonl(tmp_path / "data")
    r = run_dsplan("plan", "--gpus", "1x24G", "--model", str(small), "--dataset", "chat", "--dataset-dir",
                   str(folder), "--cutoff-len", "4096", "--micro-batch", "4", "--template", "qwen",
                   env=_cli_env(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "dataset chat: 41 samples, lengths from tokenizer estimate" in out
    assert "max " in out and "p99 " in out and "median " in out and "truncation to cutoff_len 4096 cuts 0" in out
    bars = [line for line in out.splitlines() if "|" in line and line.strip()[0].isdigit()]
    assert len(bars) == 8 and bars[0].strip().startswith("1-512") and bars[0].rstrip().endswith("| 41")
    assert "tokens per micro-batch: " in out and "(worst batch: 4 x " in out
    assert "vs cutoff_len x micro-batch = 16,384" in out
    assert "of cutoff_len x micro-batch: it frees " in out  # far below: what it frees


def test_plan_json_has_the_dataset_and_the_workload_tokens(tmp_path, small):
    folder = _alpaca_jsonl(tmp_path / "data")
    r = run_dsplan("plan", "--gpus", "1x24G", "--model", str(small), "--dataset", "chat", "--dataset-dir",
                   str(folder), "--cutoff-len", "4096", "--micro-batch", "4", "--template", "qwen", "--json",
                   env=_cli_env(tmp_path))
    d = json.loads(r.stdout)
    ds, w = d["dataset"], d["workload"]
    assert ds["method"] == "tokenizer" and ds["exact"] is False and ds["datasets"] == ["chat"]
    assert ds["stats"]["count"] == 41 and len(ds["histogram"]) == 8
    wb = ds["worst_batch"]
    assert wb["rows"] == 4 and wb["basis"] == "data" and wb["cutoff_tokens"] == 4 * 4096
    assert w["data_len"] == w["seq_len"] == wb["seq_len"] and wb["tokens"] == ds["planned"]["tokens"]
    assert "tokens" not in w  # one figure for the worst batch's tokens: dataset.planned.tokens
    assert ds["at_cutoff"]["choice"] == "zero2" and ds["at_cutoff"]["freed_gpu_bytes"] > 0
    plain = json.loads(run_dsplan("plan", "--gpus", "1x24G", "--model", str(small), "--cutoff-len", "4096",
                                  "--json").stdout)
    assert plain["dataset"] is None and plain["workload"]["seq_len"] == 4096 and plain["workload"]["data_len"] is None


def test_planned_tokens_follow_the_chosen_micro_batch(tmp_path, small):
    """The micro-batch search lowers 32 to what fits; the tokens reported are that micro-batch's."""
    folder = _alpaca_jsonl(tmp_path / "data", rows=_rows(long_words=3000))
    r = run_dsplan("plan", "--gpus", "1x24G", "--model", str(small), "--dataset", "chat", "--dataset-dir",
                   str(folder), "--cutoff-len", "4096", "--micro-batch", "32", "--template", "qwen", "--json",
                   env=_cli_env(tmp_path))
    d = json.loads(r.stdout)
    chosen = next(t for t in d["tiers"] if t["tier"] == d["choice"])
    planned = d["dataset"]["planned"]
    assert chosen["micro_batch"] < 32 and planned["micro_batch"] == chosen["micro_batch"]
    assert planned["tokens"] == chosen["micro_batch"] * d["workload"]["seq_len"] == d["dataset"]["worst_batch"]["tokens"]


def test_allow_cutoff_shows_the_data_at_the_plans_cutoff(tmp_path, small):
    folder = _alpaca_jsonl(tmp_path / "data", rows=_rows(long_words=3000))
    args = ["plan", "--gpus", "1x6G", "--model", str(small), "--method", "full", "--dataset", "chat",
            "--dataset-dir", str(folder), "--cutoff-len", "4096", "--allow-cutoff", "512", "--template", "qwen"]
    d = json.loads(run_dsplan(*args, "--json", env=_cli_env(tmp_path)).stdout)
    cut = d["workload"]["cutoff_len"]
    assert d["choice"] and cut < 4096 and d["degraded"]
    ds = d["dataset"]
    assert ds["cutoff_len"] == cut and ds["stats"]["max"] == cut == ds["worst_batch"]["seq_len"] and ds["stats"]["truncated"] == 1
    assert ds["histogram"][-1].split("|")[0].strip().endswith(f"-{cut}")
    text = run_dsplan(*args, env=_cli_env(tmp_path)).stdout
    assert f"max {cut:,}," in text and f"truncation to cutoff_len {cut} cuts 1" in text and "4096 cuts" not in text


def test_faster_tier_when_the_worst_batch_is_far_below_cutoff(tmp_path, mid):
    args = ["--model", str(mid), "--dataset", "alpaca_en_demo", "--dataset-dir", str(DEMO), *FLIP]
    d = json.loads(run_dsplan("plan", *args, "--json", env=_cli_env(tmp_path)).stdout)
    planned = d["dataset"]["planned"]
    assert planned["tokens"] < FAR_BELOW * planned["cutoff_tokens"]
    assert d["choice"] == "zero2" and d["dataset"]["at_cutoff"]["choice"] == "zero2_offload"
    text = run_dsplan("plan", *args, env=_cli_env(tmp_path)).stdout
    assert ("faster tier: zero2 fits the worst real batch (micro-batch 1 x GA 1); planning at cutoff_len would "
            "start at zero2_offload (micro-batch 1 x GA 1)") in text
    assert "it frees " in text and "GiB per GPU at zero2 against planning at cutoff_len" in text


def test_run_and_render_start_where_plan_chose(tmp_path, mid):
    """Item 5: run starts at the tier and micro-batch that fit the worst batch, the plan's choice."""
    args = ["--model", str(mid), "--dataset", "alpaca_en_demo", "--dataset-dir", str(DEMO), *FLIP]
    env = _cli_env(tmp_path)
    r = run_dsplan("run", *args, "--dry-run", "--run-dir", str(tmp_path / "run"), env=env)
    assert r.returncode == 0, r.stderr
    assert "attempt 1: tier zero2, micro-batch 1 x GA 1, cutoff 4096" in r.stdout
    assert "ladder: zero2 -> " in r.stdout
    out = tmp_path / "out"
    assert run_dsplan("render", *args, "-o", str(out), env=env).returncode == 0
    assert json.loads((out / "dsplan.json").read_text())["plan"]["choice"] == "zero2"
    # without the dataset the same inputs start one tier down
    plain = [a for a in args if a not in ("--dataset", "alpaca_en_demo", "--dataset-dir", str(DEMO))]
    r = run_dsplan("run", *plain, "--dry-run", "--run-dir", str(tmp_path / "run2"), env=env)
    assert "attempt 1: tier zero2_offload, micro-batch 1 x GA 1" in r.stdout


@pytest.mark.parametrize("command", ["plan", "render"])
def test_no_torch_or_llamafactory_imported_with_a_dataset(tmp_path, small, command):
    folder = _alpaca_jsonl(tmp_path / "data")
    args = [command, "--gpus", "1x24G", "--model", str(small), "--dataset", "chat", "--dataset-dir", str(folder),
            "--template", "qwen"] + (["-o", str(tmp_path / "r")] if command == "render" else [])
    code = ("import sys, atexit\n"
            "def check():\n"
            "    bad = [m for m in ('torch', 'deepspeed', 'llamafactory', 'transformers', 'datasets')"
            " if m in sys.modules]\n"
            "    sys.stderr.write('HEAVY:' + ','.join(bad) + '\\n')\n"
            "atexit.register(check)\n"
            "from dsplan.cli import cli\n"
            f"cli.main({args!r}, prog_name='dsplan')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, **_cli_env(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "HEAVY:\n" in r.stderr, r.stderr
