"""Model calibration (``dsplan calibrate MODEL_DIR``): its key, its entries in the shared calibration file,
and how ``plan`` applies them and names them in "why".

The login-side tests write entries by hand and never import torch; the one marked ``real`` traces a
Qwen3 config through the worker and then plans with what it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsplan.codes import Component
from dsplan.errors import UserError
from dsplan.estimate.workload import Workload
from dsplan.inputs.catalog import lookup
from dsplan.inputs.hardware import make_profile
from dsplan.inputs.model import load_model_spec, spec_from_config
from dsplan.inputs.settings import merge_settings
from dsplan.learn import trace
from dsplan.plan.planner import make_plan
from tests.conftest import run_dsplan

QWEN3 = "Qwen3-0.6B"


@pytest.fixture
def cal_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "calibration.json"
    monkeypatch.setenv("DSPLAN_CALIBRATION", str(path))
    return path


@pytest.fixture
def qwen3_dir(tmp_path) -> Path:
    """A folder with Qwen3-0.6B's config.json (the catalog's)."""
    d = tmp_path / "Qwen3-0.6B"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**lookup(QWEN3)[1]["config"], "architectures": ["Qwen3ForCausalLM"]}))
    return d


def hand_entry(spec, w: Workload, stage: int, transient: float = 1.25) -> trace.ModelEntry:
    return trace.ModelEntry(trace.model_key(spec, w, stage), trace.label(spec, w, stage), stage,
                            {"weights": 1.0, "optimizer": 1.0, "transient": transient},
                            settings=trace.key_settings(spec, w, stage), created="2026-01-01T00:00:00+00:00")


def plan_of(model: str, **flags):
    spec = trace.attach_model_calibration(load_model_spec(model))
    settings = merge_settings({}, model_name_or_path=model, default_template=spec.template, precision_supported="bf16",
                              method=flags.pop("method", "lora"), flags=flags)
    return make_plan(make_profile("1x24G"), spec, settings)


# ---------------------------------------------------------------------------- the key
def test_key_follows_architecture_and_settings_not_the_name_or_batch():
    spec = load_model_spec(QWEN3)
    same_arch = spec_from_config(lookup(QWEN3)[1]["config"], name="my-copy", path="/somewhere")
    w = Workload(method="lora", cutoff_len=1024)
    key = trace.model_key(spec, w, 2)
    assert trace.model_key(same_arch, w, 2) == key  # a folder with the same config.json shares it
    assert trace.model_key(spec, Workload(method="lora", cutoff_len=4096, micro_batch=4), 2) == key
    assert trace.model_key(spec, Workload(method="lora", stage="pt", cutoff_len=1024), 2) == key  # pt is sft's layout
    for other in (Workload(method="full"), Workload(method="lora", lora_rank=16), Workload(method="lora", stage="dpo"),
                  Workload(method="lora", gradient_checkpointing=False), Workload(method="lora", liger=True),
                  Workload(method="lora", attention="eager"), Workload(method="lora", optim="adamw_bnb_8bit")):
        assert trace.model_key(spec, other, 2) != key, other
    assert trace.model_key(spec, w, 3) != key
    assert trace.model_key(load_model_spec("Qwen3-1.7B"), w, 2) != key


# ---------------------------------------------------------------------------- the file
def test_entries_share_the_site_calibration_file_and_keep_its_entries(cal_file):
    site = {"format": "dsplan-calibration", "version": 1,
            "entries": {"cuda/H100": {"backend": "cuda", "card": "H100", "kind": "headroom", "context_bytes": 1,
                                      "nccl_bytes": 0, "slack": {"2": 0.1, "3": 0.4}, "headroom_shift": 0.05}}}
    cal_file.write_text(json.dumps(site))
    spec, w = load_model_spec(QWEN3), Workload(method="lora")
    trace.save_model_entries([hand_entry(spec, w, 2)])
    data = json.loads(cal_file.read_text())
    assert data["entries"] == site["entries"]  # the site calibration is untouched
    assert list(data["models"]) == [trace.model_key(spec, w, 2)]
    got = trace.load_model_entries()[trace.model_key(spec, w, 2)]
    assert got.factors == {"weights": 1.0, "optimizer": 1.0, "transient": 1.25} and got.path == cal_file
    from dsplan.learn.calibration import load_calibration

    site_side = load_calibration()
    assert list(site_side.entries) == ["cuda/H100"]  # the site module still reads the file
    assert json.loads(site_side.to_text())["models"] == data["models"]  # and writes the models block back


@pytest.mark.parametrize("models,needle", [
    ([], "models must be an object"),
    ({"k": {"factors": {"transient": 9.0}, "zero_stage": 2}}, "factor transient"),
    ({"k": {"factors": {}, "zero_stage": 1}}, "zero_stage"),
])
def test_a_malformed_models_block_is_one_line(cal_file, models, needle):
    cal_file.write_text(json.dumps({"format": "dsplan-calibration", "version": 1, "entries": {}, "models": models}))
    with pytest.raises(UserError, match=needle):
        trace.load_model_entries()


# ---------------------------------------------------------------------------- plan applies and names it
def test_plan_applies_the_entry_of_its_settings_and_names_it(cal_file):
    spec = load_model_spec(QWEN3)
    before = plan_of(QWEN3, cutoff_len=1024)
    w = before.workload
    trace.save_model_entries([hand_entry(spec, w, 2, transient=1.25)])
    after = plan_of(QWEN3, cutoff_len=1024)
    for name in ("zero2", "zero2_offload"):
        old, new = before.get(name).estimate.gpu, after.get(name).estimate.gpu
        assert new[Component.ACTIVATIONS] == int(old[Component.ACTIVATIONS] * 1.25)
        assert new[Component.LOGITS] == int(old[Component.LOGITS] * 1.25)
        assert new[Component.WEIGHTS] == old[Component.WEIGHTS]
    assert after.get("zero3").estimate.gpu == before.get("zero3").estimate.gpu  # no ZeRO-3 entry
    line = next(x for x in after.why if x.startswith("model calibration"))
    assert trace.model_key(spec, w, 2) in line and "transient x1.250" in line and "zero2, zero2_offload" in line
    used = after.to_dict()["model_calibration"]  # plan --json names the same entry, file and tiers
    assert [(u["key"], u["file"], u["tiers"], u["factors"]["transient"]) for u in used] == [
        (trace.model_key(spec, w, 2), str(cal_file), ["zero2", "zero2_offload"], 1.25)]
    other = plan_of(QWEN3, cutoff_len=1024, method="full")  # other settings: the entry does not apply
    assert any("none for these settings" in x for x in other.why)
    assert other.to_dict()["model_calibration"] == []


def test_plan_without_entries_says_nothing_about_model_calibration(cal_file):
    plan = plan_of(QWEN3)
    assert not any("model calibration" in x for x in plan.why) and plan.to_dict()["model_calibration"] == []


def test_calibrate_refuses_a_model_without_its_own_config(cal_file):
    with pytest.raises(UserError, match="own config.json"):
        trace.calibrate_command(QWEN3, {}, None, None, False, echo=lambda _: None)


@pytest.mark.parametrize("flags,needle", [({"use_dora": True}, "not use_dora"), ({"stage": "rm"}, "not stage rm")])
def test_calibrate_refuses_what_the_worker_does_not_trace(qwen3_dir, cal_file, flags, needle):
    with pytest.raises(UserError, match=needle):  # before any worker starts: no torch needed
        trace.calibrate_command(str(qwen3_dir), flags, None, None, False, echo=lambda _: None)
    assert not cal_file.exists()


def test_calibrate_cli_takes_model_dir_or_from(tmp_path):
    both = run_dsplan("calibrate", str(tmp_path), "--from", str(tmp_path))
    neither = run_dsplan("calibrate")
    stray = run_dsplan("calibrate", "--from", str(tmp_path), "--cutoff-len", "512")
    for r in (both, neither, stray):
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "MODEL_DIR" in neither.stderr and "go with MODEL_DIR" in stray.stderr


# ---------------------------------------------------------------------------- the whole loop, with torch
@pytest.mark.real
def test_calibrate_writes_an_entry_and_the_next_plan_names_it(qwen3_dir, cal_file, train_python):
    r = run_dsplan("calibrate", str(qwen3_dir), "--method", "lora", "--cutoff-len", "512", "--json",
                   env={"DSPLAN_CALIBRATION": str(cal_file)}, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert [e["zero_stage"] for e in out["entries"]] == [2, 3]
    for e in out["entries"]:
        assert e["layers"] == 28 and e["versions"]["torch"]
        assert abs(e["errors"]["total"]) < 0.05, e  # dsplan's estimate within 5 % of the trace
        assert e["traced"]["weights"] == pytest.approx(e["estimated"]["weights"], rel=0.01)
    r = run_dsplan("plan", "--gpus", "1x24G", "--model", str(qwen3_dir), "--method", "lora", "--cutoff-len", "512",
                   env={"DSPLAN_CALIBRATION": str(cal_file)})
    assert r.returncode == 0, r.stderr
    named = [line for line in r.stdout.splitlines() if "model calibration" in line]
    assert len(named) == 2 and all(e["key"] in r.stdout for e in out["entries"]), r.stdout
