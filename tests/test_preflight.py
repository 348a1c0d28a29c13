"""`dsplan run --preflight` without torch: the preflight dataset builder, the ledger's
``preflight`` field, the run loop's sequencing with a FAKE llamafactory-cli
(tests/fakes/children/fake_lf_cli.py behind a small wrapper written here), and data
that cannot be read.  Lengths come from the characters-per-token estimate (no tokenizer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from dsplan.errors import UserError
from dsplan.inputs.data import DataSpec, measure
from dsplan.inputs.settings import TrainSettings
from dsplan.launch.ledger import AttemptRecord, RunState, append_attempt, read_attempts
from dsplan.launch.preflight import (
    DATA_DIR,
    DROPPED_KEYS,
    ENTRY,
    Preflight,
    load_preflight,
    mirror_entry,
)
from tests.conftest import REPO, run_dsplan

FAKE = REPO / "tests" / "fakes" / "children" / "fake_lf_cli.py"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DSPLAN_TRAIN_PYTHON", raising=False)


# ---------------------------------------------------------------- data
ALPACA_ENTRY = {"file_name": "qa.json", "formatting": "alpaca", "num_samples": 3, "split": "train",
                "columns": {"prompt": "question", "response": "answer", "system": "sys"}}
SHAREGPT_ENTRY = {"file_name": "chat.jsonl", "formatting": "sharegpt",
                  "columns": {"messages": "turns"},
                  "tags": {"role_tag": "who", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}}


def qa_rows(words: list[int]) -> list[dict]:
    """Alpaca rows under their own column names; row i's answer has ``words[i]`` words."""
    return [{"question": f"q{i}", "answer": " ".join(["word"] * n), "sys": "be brief"} for i, n in enumerate(words)]


def chat_rows(words: list[int]) -> list[dict]:
    return [{"turns": [{"who": "me", "text": f"hi {i}"}, {"who": "bot", "text": " ".join(["ok"] * n)}]}
            for i, n in enumerate(words)]


def write_data(folder: Path, qa: list[int], chat: list[int] | None = None, hub: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "qa.json").write_text(json.dumps(qa_rows(qa)))
    info = {"qa": ALPACA_ENTRY}
    if chat is not None:
        (folder / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(chat)))
        info["chat"] = SHAREGPT_ENTRY
    if hub:
        info["far"] = {"hf_hub_url": "someone/not-downloaded", "formatting": "alpaca"}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def settings_for(folder: Path, dataset: str = "qa", **kw) -> TrainSettings:
    base = {"model_name_or_path": "/nonexistent/model", "dataset": dataset, "dataset_dir": str(folder),
            "template": "qwen", "cutoff_len": 1024, "micro_batch": 2, "grad_accum": 2}
    return TrainSettings(**{**base, **kw})


def preflight(tmp_path, settings: TrainSettings, user: dict | None = None, steps: int = 2) -> Preflight:
    spec = DataSpec.from_lf_args({**(user or {}), **{k: getattr(settings, k) for k in (
        "dataset", "dataset_dir", "template", "cutoff_len", "stage", "packing", "neat_packing",
        "model_name_or_path")}})
    profile = measure(spec, engine="chars", cache_dir=tmp_path / "cache")
    return load_preflight(settings, user or {}, steps, None, profile=profile)


LENGTHS = [5, 40, 12, 80, 3, 60, 20, 7, 33, 50]  # words per answer: longest rows 3, 5, 9, 1, 8, 6, ...
BY_LENGTH = sorted(range(len(LENGTHS)), key=lambda i: -LENGTHS[i])


def test_rows_are_the_longest_first_and_fill_the_steps(tmp_path):
    pf = preflight(tmp_path, settings_for(write_data(tmp_path / "d", LENGTHS)))
    refs = pf.pick(micro_batch=2, grad_accum=2, world_size=1)
    assert len(refs) == 2 * 2 * 2 == pf.slots(2, 2, 1)  # steps x GA x micro-batch x world size
    assert [r.row for r in refs] == BY_LENGTH[:8]
    data = pf.write(tmp_path / "out", 2, 2, 1)
    assert (data.names, data.rows, data.distinct) == ([ENTRY], 8, 8)
    written = json.loads((tmp_path / "out" / f"{ENTRY}.json").read_text())
    assert written == [qa_rows(LENGTHS)[i] for i in BY_LENGTH[:8]]  # the source's own rows, unchanged


def test_fewer_samples_than_slots_are_repeated_in_order(tmp_path):
    pf = preflight(tmp_path, settings_for(write_data(tmp_path / "d", [4, 30, 9]), micro_batch=4, grad_accum=1),
                   steps=2)
    assert [r.row for r in pf.pick(4, 1, 1)] == [1, 2, 0, 1, 2, 0, 1, 2]


def test_every_rank_gets_the_longest_micro_batch_first(tmp_path):
    pf = preflight(tmp_path, settings_for(write_data(tmp_path / "d", LENGTHS)), steps=1)
    rows = [r.row for r in pf.pick(micro_batch=2, grad_accum=2, world_size=3)]
    # accelerate gives rank k the k-th micro-batch of each group of world_size (no shuffling)
    top, nxt = BY_LENGTH[:2], BY_LENGTH[2:4]
    assert rows == top * 3 + nxt * 3
    assert len(rows) == pf.slots(2, 2, 3)


def test_packing_fills_whole_rows_of_cutoff_len(tmp_path):
    settings = settings_for(write_data(tmp_path / "d", LENGTHS), cutoff_len=64, packing=True)
    pf = preflight(tmp_path, settings)
    refs = pf.pick(micro_batch=2, grad_accum=1, world_size=2)
    lengths = dict(zip(range(len(LENGTHS)), pf.profile.row_lengths()))
    total = sum(lengths[r.row] for r in refs)
    need = pf.slots(2, 1, 2) * 64  # packed rows are cutoff_len long
    assert total >= need and total - lengths[refs[-1].row] < need  # just enough, longest first
    ranked = sorted(lengths, key=lambda i: -lengths[i])  # truncated to the cutoff: ties keep row order
    assert [r.row for r in refs] == (ranked * 3)[:len(refs)]
    assert "packed into rows of 64 tokens" in pf.describe(2, 1, 2)


def test_dataset_info_entry_mirrors_the_source(tmp_path):
    folder = write_data(tmp_path / "d", LENGTHS, chat=[2, 90, 4])
    pf = preflight(tmp_path, settings_for(folder, dataset="qa,chat"), steps=1)
    data = pf.write(tmp_path / "out", 2, 2, 1)
    info = json.loads((tmp_path / "out" / "dataset_info.json").read_text())
    assert data.names == [f"{ENTRY}_1", f"{ENTRY}_2"] and list(info) == data.names  # two ways to read: two files
    by_format = {e["formatting"]: e for e in info.values()}
    assert by_format["sharegpt"] == {**mirror_entry(SHAREGPT_ENTRY), "file_name": by_format["sharegpt"]["file_name"]}
    assert by_format["sharegpt"]["tags"] == SHAREGPT_ENTRY["tags"] and by_format["sharegpt"]["columns"] == {
        "messages": "turns"}
    alpaca = by_format["alpaca"]
    assert set(alpaca) == {"formatting", "columns", "file_name"}  # num_samples, split: where rows are, not how
    assert alpaca["columns"] == ALPACA_ENTRY["columns"]
    chat = json.loads((tmp_path / "out" / by_format["sharegpt"]["file_name"]).read_text())
    assert chat == [chat_rows([2, 90, 4])[1]]  # the longest chat row, as written in the source


def test_attempt_user_points_lf_at_the_preflight_data(tmp_path):
    folder = write_data(tmp_path / "d", LENGTHS)
    user = {"dataset": "qa", "max_samples": 5, "val_size": 0.1, "tokenized_path": "/tmp/tok", "report_to": "wandb",
            "num_train_epochs": 3, "push_to_hub": True, "learning_rate": 3e-4, "max_steps": 9000}
    pf = preflight(tmp_path, settings_for(folder), user=user, steps=3)
    attempt = tmp_path / "run" / "attempt-004"
    out = pf.attempt_user(user, attempt, 2, 2, 1)
    assert out["dataset"] == ENTRY and out["dataset_dir"] == str(attempt / DATA_DIR)
    assert out["max_steps"] == 3 and out["save_strategy"] == "no" and out["disable_shuffling"] is True
    assert out["report_to"] == "none" and out["do_eval"] is False and out["eval_strategy"] == "no"
    assert out["media_dir"] == str(folder) and out["learning_rate"] == 3e-4 and out["num_train_epochs"] == 3
    assert not set(DROPPED_KEYS) & set(out)
    assert json.loads((attempt / DATA_DIR / "dataset_info.json").read_text())[ENTRY]["file_name"] == f"{ENTRY}.json"


@pytest.mark.parametrize("case, expect", [
    ("missing", "not found"),
    ("hub", "dataset not local"),
    ("ppo", "ppo generates its responses"),
])
def test_unreadable_data_refuses_in_one_line(tmp_path, case, expect):
    folder = write_data(tmp_path / "d", LENGTHS, hub=True)
    settings = {"missing": settings_for(tmp_path / "nowhere"), "hub": settings_for(folder, dataset="far"),
                "ppo": settings_for(folder, stage="ppo")}[case]
    with pytest.raises(UserError) as e:
        preflight(tmp_path, settings)
    msg = str(e.value)
    assert "--preflight needs the training data's own samples" in msg and expect in msg and "\n" not in msg


# ---------------------------------------------------------------- the ledger
def _record(n: int, verdict: str, **extra) -> dict:
    return {"attempt": n, "tier": "zero2", "micro_batch": 4, "grad_accum": 1, "cutoff_len": 1024,
            "started": "2025-01-01T00:00:00+00:00", "ended": "2025-01-01T00:01:00+00:00", "exit_code": 0,
            "verdict": verdict, "evidence": "", "output_dir": f"/r/attempt-{n:03d}/output", **extra}


def test_ledger_preflight_field_and_run_state(tmp_path):
    append_attempt(tmp_path, _record(1, "host_oom", preflight=True))
    append_attempt(tmp_path, _record(2, "success", preflight=True, micro_batch=2))
    state = RunState.load(tmp_path)
    assert [r.is_preflight for r in state.records] == [True, True]
    assert not state.finished  # a passed preflight is not the end of the run
    assert state.oom_attempt("zero2", 4, 1024).attempt == 1  # a preflight OOM is never repeated
    assert state.preflight_passed("zero2", 2, 1024).attempt == 2 and state.preflight_passed("zero2", 4, 1024) is None
    append_attempt(tmp_path, _record(3, "success", micro_batch=2))
    state = RunState.load(tmp_path)
    assert state.finished and not state.last.is_preflight
    assert read_attempts(tmp_path)[0]["preflight"] is True
    assert not AttemptRecord.from_dict(_record(4, "success")).is_preflight


# ---------------------------------------------------------------- the run loop, with a FAKE llamafactory-cli
BIG = ["--gpus", "8x80G", "--gpu-name", "A100", "--host-ram", "2048G", "--model", "Llama-3-8B", "--method", "full",
       "--cutoff-len", "1024", "--tier", "minimal", "--micro-batch", "8", "--grad-accum", "2"]

#: A wrapper around the fake: ``PRE_<VAR>`` / ``REAL_<VAR>`` set the fake's ``<VAR>`` for preflight or
#: real attempts only; every YAML it is given is recorded; a preflight that passes is made to leave a
#: complete checkpoint (which no later attempt may resume from).
WRAPPER = """#!{python}
import json, os, subprocess, sys
import yaml
cfg = yaml.safe_load(open(sys.argv[2]))
pre = str(cfg.get("dataset", "")).startswith("dsplan_preflight")
env = dict(os.environ)
for var in ("FAKE_MAX_MICRO_BATCH", "FAKE_NOT_OOM"):
    scoped = os.environ.get(("PRE_" if pre else "REAL_") + var)
    if scoped is not None:
        env[var] = scoped
with open(os.environ["FAKE_YAMLS"], "a") as f:
    f.write(json.dumps({{"preflight": pre, **cfg}}) + "\\n")
rc = subprocess.call([sys.executable, {fake!r}] + sys.argv[1:], env=env)
if pre and rc == 0:
    ck = os.path.join(cfg["output_dir"], "checkpoint-3")
    os.makedirs(ck, exist_ok=True)
    open(os.path.join(ck, "trainer_state.json"), "w").write('{{"global_step": 3, "max_steps": 3}}')
sys.exit(rc)
"""


@pytest.fixture
def fake_cli(tmp_path) -> Path:
    path = tmp_path / "bin" / "llamafactory-cli"
    path.parent.mkdir()
    path.write_text(WRAPPER.format(python=sys.executable, fake=str(FAKE)))
    path.chmod(0o755)
    return path


def user_yaml(tmp_path, dataset: str = "qa") -> Path:
    folder = write_data(tmp_path / "data", LENGTHS, hub=True)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"dataset": dataset, "dataset_dir": str(folder), "template": "qwen"}))
    return path


def run_pf(tmp_path, fake_cli, *args, env=None):
    """``dsplan run`` with --preflight on the fake; (result, YAMLs the fake was given, ledger)."""
    yamls = tmp_path / "yamls.jsonl"
    e = {"FAKE_YAMLS": str(yamls), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "DSPLAN_TRAIN_PYTHON": "", **(env or {})}
    r = run_dsplan("run", str(user_yaml(tmp_path)), *BIG, "--lf-cli", str(fake_cli), "--run-dir",
                   str(tmp_path / "run"), *args, env=e, timeout=180)
    calls = [json.loads(x) for x in yamls.read_text().splitlines()] if yamls.exists() else []
    return r, calls, read_attempts(tmp_path / "run") if (tmp_path / "run").exists() else []


def test_preflight_oom_falls_back_before_the_real_run(tmp_path, fake_cli):
    r, calls, ledger = run_pf(tmp_path, fake_cli, "--preflight", "--preflight-steps", "3",
                              env={"PRE_FAKE_MAX_MICRO_BATCH": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(c["preflight"], c["per_device_train_batch_size"]) for c in calls] == [
        (True, 8), (True, 4), (True, 2), (False, 2)]
    assert [(a.get("preflight", False), a["verdict"]) for a in ledger] == [
        (True, "gpu_oom"), (True, "gpu_oom"), (True, "success"), (False, "success")]
    raw = [json.loads(x) for x in (tmp_path / "run" / "attempts.jsonl").read_text().splitlines()]
    assert [x.get("preflight", False) for x in raw] == [True] * 6 + [False] * 2  # started and end lines
    for n, c in enumerate(calls[:3], 1):
        folder = tmp_path / "run" / f"attempt-{n:03d}"
        assert c["dataset"] == ENTRY and c["dataset_dir"] == str(folder / DATA_DIR)
        assert c["max_steps"] == 3 and c["save_strategy"] == "no" and c["output_dir"] == str(folder / "output")
        assert c.get("resume_from_checkpoint") is None
        rows = json.loads((folder / DATA_DIR / f"{ENTRY}.json").read_text())
        assert len(rows) == 3 * c["gradient_accumulation_steps"] * c["per_device_train_batch_size"] * 8
        assert rows[0] == qa_rows(LENGTHS)[BY_LENGTH[0]]
    real = calls[-1]
    assert real["dataset"] == "qa" and "max_steps" not in real and real.get("resume_from_checkpoint") is None
    assert "the preflight ran out of memory (gpu_oom)" in r.stderr and "preflight passed at" in r.stderr


def test_real_oom_after_a_passed_preflight_preflights_the_next_configuration(tmp_path, fake_cli):
    r, calls, ledger = run_pf(tmp_path, fake_cli, "--preflight", env={"REAL_FAKE_MAX_MICRO_BATCH": "4"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(c["preflight"], c["per_device_train_batch_size"]) for c in calls] == [
        (True, 8), (False, 8), (True, 4), (False, 4)]
    assert [a["verdict"] for a in ledger] == ["success", "gpu_oom", "success", "success"]
    assert calls[0]["max_steps"] == 2  # the default --preflight-steps


def test_a_preflight_that_fails_otherwise_stops_before_the_real_run(tmp_path, fake_cli):
    r, calls, ledger = run_pf(tmp_path, fake_cli, "--preflight", env={"PRE_FAKE_NOT_OOM": "1"})
    assert r.returncode == 1 and len(calls) == 1
    assert ledger[0]["verdict"] == "not_oom" and ledger[0]["preflight"] is True
    assert "ended not_oom, not out of memory; the real run was not started" in r.stderr


def test_a_rerun_does_not_repeat_a_passed_preflight(tmp_path, fake_cli):
    r, calls, _ = run_pf(tmp_path, fake_cli, "--preflight", env={"REAL_FAKE_NOT_OOM": "1"})
    assert r.returncode == 1 and [c["preflight"] for c in calls] == [True, False]
    (tmp_path / "yamls.jsonl").unlink()
    r, calls, ledger = run_pf(tmp_path, fake_cli, "--preflight")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [c["preflight"] for c in calls] == [False]
    assert "already passed (attempt 1); not repeating it" in r.stderr
    assert [(a.get("preflight", False), a["verdict"]) for a in ledger] == [
        (True, "success"), (False, "not_oom"), (False, "success")]


def test_a_rerun_after_a_passed_preflight_alone_starts_the_real_run(tmp_path, fake_cli):
    (tmp_path / "run").mkdir()
    append_attempt(tmp_path / "run", {**_record(1, "success", preflight=True), "tier": "zero3_offload",
                                      "micro_batch": 8, "grad_accum": 2})
    r, calls, ledger = run_pf(tmp_path, fake_cli, "--preflight")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(c["preflight"], c["per_device_train_batch_size"]) for c in calls] == [(False, 8)]
    assert [a["attempt"] for a in ledger] == [1, 2]


def test_preflight_without_readable_data_stops_before_anything(tmp_path, fake_cli):
    yamls = tmp_path / "yamls.jsonl"
    r = run_dsplan("run", str(user_yaml(tmp_path, dataset="far")), *BIG, "--lf-cli", str(fake_cli), "--run-dir",
                   str(tmp_path / "run"), "--preflight", env={"FAKE_YAMLS": str(yamls),
                                                              "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert r.returncode == 2 and not yamls.exists() and not (tmp_path / "run").exists()
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "--preflight needs the training data's own samples" in errors[0]
    assert "dataset not local" in errors[0]


def test_dry_run_shows_the_preflight_attempt(tmp_path, fake_cli):
    r, calls, _ = run_pf(tmp_path, fake_cli, "--preflight", "--dry-run")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not calls and not (tmp_path / "run").exists()
    out = r.stdout
    assert "attempt 1: preflight at tier zero3_offload, micro-batch 8 x GA 2, cutoff 1024" in out
    assert "preflight: 2 optimizer step(s) on the 10 longest samples (256 rows" in out
    assert f"/attempt-NNN/{DATA_DIR}/dataset_info.json, {ENTRY}.json" in out
    assert "attempt 2: tier zero3_offload, micro-batch 8 x GA 2, cutoff 1024 (once its preflight passes)" in out
    r = run_dsplan("run", *BIG, "--preflight-steps", "3", "--dry-run")
    assert r.returncode == 2 and "--preflight-steps goes with --preflight" in r.stderr
