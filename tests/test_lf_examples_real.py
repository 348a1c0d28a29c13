"""LLaMA-Factory's own checks on the tiers dsplan plans for LF's own example YAMLs.

Every training example (``tests/data/lf_examples``, see its README) is planned and
rendered on one and eight 80 GB GPUs.  Then LF 0.9.5 itself, in one worker process,
runs on every rendered tier:

- ``get_train_args`` on the rendered YAML (its argument checks, ZeRO-3 rules included),
- ``configure_quantization`` with the model's config.json: the rules LF applies only at
  model load (bitsandbytes 8-bit, HQQ, EETQ and pre-quantized GPTQ/AWQ/AQLM checkpoints
  refuse ZeRO-3), which ``get_train_args`` does not see; again for a reference or full
  reward model, with the arguments LF's ``create_ref_model``/``create_reward_model`` load it with.

Besides the examples, VARIANTS sets on them the other quantization choices the otfq example's
own comment offers, and quantized reference and reward models.

LF must accept every tier dsplan chose or kept on the ladder, and refuse exactly the tiers
dsplan marks ``refused_by_lf``: those are checked on the rendered YAML with ``deepspeed:``
pointed at LF's own ``examples/deepspeed`` config of the same ZeRO stage.  The examples
dsplan refuses outright (GaLore/APOLLO, an unknown key) must be refused by LF too.

LF's optional packages (adam-mini, badam, bitsandbytes, ...) are not installed here, so the
worker makes ``check_version`` record instead of raise and stands in for the quantization
libraries' config classes: every rule still runs.  Identical inputs run once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import load_script

pytestmark = pytest.mark.real


sweep = load_script("sweep_lf_examples")

GPUS = sweep.DEFAULT_GPUS
LF_DS = sweep.EXAMPLES / "deepspeed"
#: LF's own DeepSpeed config for each dsplan tier.
LF_DS_OF_TIER = {"zero2": "ds_z2_config.json", "zero2_offload": "ds_z2_offload_config.json",
                 "zero3": "ds_z3_config.json", "zero3_offload": "ds_z3_offload_config.json"}

WORKER = r'''
import json, os, sys, time, types

def main():
    jobs = json.load(sys.stdin)
    import torch, yaml
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    from llamafactory.hparams import parser
    from llamafactory.model.model_utils import quantization
    missing = set()
    def record(requirement, mandatory=False):
        missing.add(requirement)
    parser.check_version = record
    quantization.check_version = record
    for name in ("BitsAndBytesConfig", "HqqConfig", "EetqConfig"):  # their libraries may be absent
        setattr(quantization, name, lambda *a, **k: dict(k))
    for job in jobs:
        unset_hf_deepspeed_config()
        start = time.monotonic()
        result = {"key": job["key"], "refused": False, "at": None, "message": ""}
        try:
            with open(job["path"], encoding="utf-8") as f:
                args = yaml.safe_load(f)
            args.update(job.get("override", {}))
            if not torch.cuda.is_available():  # no GPU here: LF and transformers refuse bf16 unless told
                args["use_cpu"] = True
                if args.pop("pure_bf16", None):  # "This device does not support `pure_bf16`" would hide the rest
                    args["bf16"] = True
            result["at"] = "get_train_args"
            model_args, _, training_args, finetuning_args, _ = parser.get_train_args(args)
            result["at"] = "configure_quantization"
            config = types.SimpleNamespace(quantization_config=job.get("quantization_config"),
                                           model_type=job.get("model_type"))
            quantization.configure_quantization(config, None, model_args, True, {})
            for margs in companions(model_args, finetuning_args):
                quantization.configure_quantization(types.SimpleNamespace(), None, margs, False, {})
            result["at"] = None
        except (ValueError, AssertionError) as e:
            result.update(refused=True, message=" ".join(str(e).split())[:500])
        except Exception as e:
            result.update(error=f"{type(e).__name__}: {' '.join(str(e).split())[:500]}")
        result["seconds"] = round(time.monotonic() - start, 3)
        sys.stdout.write("LF-RESULT " + json.dumps(result) + "\n")
        sys.stdout.flush()

def companions(model_args, finetuning_args):
    """The arguments LF loads a reference or a full reward model with (train/trainer_utils.py)."""
    from llamafactory.hparams import ModelArguments
    out, f = [], finetuning_args
    uses_ref = (f.stage == "dpo" and f.use_ref_model) or f.stage in ("kto", "ppo")
    if uses_ref and f.ref_model is not None:
        out.append(ModelArguments.copyfrom(model_args, model_name_or_path=f.ref_model,
                                           adapter_name_or_path=f.ref_model_adapters,
                                           quantization_bit=f.ref_model_quantization_bit))
    if f.stage == "ppo" and f.reward_model_type == "full":
        out.append(ModelArguments.copyfrom(model_args, model_name_or_path=f.reward_model,
                                           adapter_name_or_path=f.reward_model_adapters,
                                           quantization_bit=f.reward_model_quantization_bit))
    return out

main()
'''


def _plan_and_render(example: Path, gpus: str, out: Path, env: dict) -> tuple[dict | None, dict | None, str]:
    """(plan JSON, render manifest, stderr) of one example on one GPU spec, from the workspace."""
    code, stdout, stderr = sweep.invoke_plan(example, gpus, env)
    if code != 0:
        return None, None, stderr
    from dsplan.cli import cli

    r = sweep._runner().invoke(cli, ["render", str(example), "--gpus", gpus, "--tier", "all", "-o", str(out),
                                     "--json"], prog_name="dsplan", env=env)
    manifest = json.loads(r.stdout) if r.exit_code == 0 else None
    return json.loads(stdout), manifest, r.stderr if r.exit_code else ""


def _model_facts(example: Path, models: dict) -> dict:
    """The model's quantization_config and model_type, as LF's loader would read them from config.json."""
    name = str(yaml.safe_load(example.read_text(encoding="utf-8")).get("model_name_or_path", ""))
    entry = models.get(name)
    if entry is None or entry["place"] == "missing":
        return {"quantization_config": None, "model_type": None}
    cfg = sweep.model_config(entry)
    return {"quantization_config": cfg.get("quantization_config"), "model_type": cfg.get("model_type")}


def _jobs_for(key: str, plan: dict, manifest: dict, out: Path, facts: dict) -> list[dict]:
    """One job per rendered tier (LF must accept it) and one per tier dsplan says LF refuses."""
    rendered = {t["tier"]: out / t["lf_yaml"] for t in manifest["tiers"]}
    jobs = [{"key": f"{key} {tier}", "tier": tier, "expect": "accept", "path": str(path), **facts}
            for tier, path in rendered.items()]
    first = next(iter(rendered.values()))
    for t in plan["tiers"]:
        if t.get("refused_by_lf"):
            jobs.append({"key": f"{key} {t['tier']}", "tier": t["tier"], "expect": "refuse", "path": str(first),
                         "override": {"deepspeed": str(LF_DS / LF_DS_OF_TIER[t["tier"]])},
                         "dsplan_says": t["refused_by_lf"], **facts})
    return jobs


def _jobs_for_refused_example(key: str, example: Path, facts: dict) -> list[dict]:
    """An example dsplan refuses outright: LF must refuse it at ZeRO-2 and at ZeRO-3 alike."""
    return [{"key": f"{key} {tier}", "tier": tier, "expect": "refuse", "path": str(example),
             "override": {"deepspeed": str(LF_DS / LF_DS_OF_TIER[tier])}, **facts} for tier in ("zero2", "zero3")]


def _signature(job: dict) -> str:
    """What LF sees for a job: the YAML with its overrides, the DeepSpeed file's content and the model's
    facts.  Jobs with one signature (often the same tier on one and eight GPUs) run once."""
    with open(job["path"], encoding="utf-8") as f:
        args = {**yaml.safe_load(f), **job.get("override", {})}
    if args.get("deepspeed"):
        args["deepspeed"] = Path(args["deepspeed"]).read_text(encoding="utf-8")
    facts = {k: job.get(k) for k in ("quantization_config", "model_type")}
    return json.dumps([args, facts], sort_keys=True, default=str)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_worker(jobs: list[dict], cwd: Path, env: dict) -> dict[str, dict]:
    """LF's checks on every job, in one process, each distinct input once; results by job key."""
    unique: dict[str, dict] = {}
    key_of = {j["key"]: unique.setdefault(_signature(j), j)["key"] for j in jobs}
    full_env = dict(os.environ, **env, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1", DISABLE_VERSION_CHECK="1")
    proc = subprocess.run([sys.executable, "-c", WORKER], input=json.dumps(list(unique.values())),
                          capture_output=True, text=True, cwd=cwd, env=full_env, timeout=1500, check=False)
    ran = {}
    for line in proc.stdout.splitlines():
        if line.startswith("LF-RESULT "):
            r = json.loads(line[len("LF-RESULT "):])
            ran[r["key"]] = r
    assert len(ran) == len(unique), f"worker exit {proc.returncode}: {proc.stderr[-3000:]}"
    return {key: ran[first] for key, first in key_of.items()}


#: LF's on-the-fly quantization choices, as qwen3_lora_sft_otfq.yaml's own comment lists them
#: (quantization_bit: 8 (bnb/hqq/eetq), 4 (bnb/hqq), 3 (hqq), 2 (hqq)); 4-bit bnb is the example itself.
OTFQ_EXAMPLE = "main/train_qlora/qwen3_lora_sft_otfq.yaml"
OTFQ_CHOICES = ((8, "bnb"), (8, "hqq"), (8, "eetq"), (4, "hqq"), (3, "hqq"), (2, "hqq"))
#: (example, label, keys set on it): the otfq choices, and reference and reward models LF loads quantized.
VARIANTS = (
    *[(OTFQ_EXAMPLE, f"{method} {bits}-bit", {"quantization_bit": bits, "quantization_method": method})
      for bits, method in OTFQ_CHOICES],
    *[("main/train_lora/qwen3_lora_dpo.yaml", f"ref {bits}-bit",
       {"ref_model": "Qwen/Qwen3-4B-Instruct-2507", "ref_model_quantization_bit": bits}) for bits in (4, 8)],
    ("v0.9.3/train_lora/llama3_lora_ppo.yaml", "full reward 8-bit",
     {"reward_model": "meta-llama/Meta-Llama-3-8B-Instruct", "reward_model_type": "full",
      "reward_model_quantization_bit": 8}),
)


def _variants(folder: Path) -> list[tuple[str, Path]]:
    """Each VARIANTS entry written out: (its name, its YAML)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (example, label, keys) in enumerate(VARIANTS):
        base = yaml.safe_load((sweep.EXAMPLES / example).read_text(encoding="utf-8"))
        path = folder / f"variant{i:02d}.yaml"
        path.write_text(yaml.safe_dump({**base, **keys}))
        out.append((f"{example} [{label}]", path))
    return out


def _collect(root: Path, env: dict, models: dict, rows: dict) -> tuple[dict, list[dict]]:
    """Plans (by 'example gpus') and LF jobs for the swept examples and the VARIANTS."""
    cases = [(name, gpus, sweep.EXAMPLES / name, row.outcome) for (name, gpus), row in sorted(rows.items())]
    cases += [(name, "8x80G", path, "ok") for name, path in _variants(root / "variants")]
    plans, jobs = {}, []
    for name, gpus, example, outcome in cases:
        key, facts = f"{name} {gpus}", _model_facts(example, models)
        if outcome == "ok":
            out = root / "render" / f"{len(plans):03d}"
            plan, manifest, err = _plan_and_render(example, gpus, out, env)
            assert plan is not None and manifest is not None, f"{key}: {err}"
            plans[key] = plan
            jobs += _jobs_for(key, plan, manifest, out, facts)
        elif outcome in ("lf-refuses", "unknown-key") and gpus == GPUS[0]:
            jobs += _jobs_for_refused_example(key, example, facts)
    return plans, jobs


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """Plan, render and check every example: (sweep rows, plans, jobs, LF's results)."""
    root = tmp_path_factory.mktemp("lf_examples_real")
    models = sweep.load_models()
    env = sweep.build_workspace(root, models)
    rows = {(r.example, r.gpus): r for r in sweep.sweep(GPUS)}
    with sweep.working_folder(root / "work"):
        plans, jobs = _collect(root, env, models, rows)
    return rows, plans, jobs, _run_worker(jobs, root / "work", env)


def test_the_worker_ran_every_check(checked):
    _, _, jobs, results = checked
    errors = [f"{k}: {r['error']}" for k, r in results.items() if r.get("error")]
    assert not errors, "\n".join(errors)
    assert len(jobs) > 200, len(jobs)


def test_lf_accepts_every_chosen_and_laddered_tier(checked):
    """The choice and every ladder tier pass LF's get_train_args and its load-time quantization rules."""
    _, plans, _, results = checked
    bad = []
    for key, plan in plans.items():
        for tier in dict.fromkeys([plan["choice"], *plan["ladder"]]):
            r = results.get(f"{key} {tier}")
            if r is None or r["refused"]:
                bad.append(f"{key} {tier}: " + ("not rendered" if r is None else f"{r['at']}: {r['message']}"))
    assert not bad, "\n".join(bad)
    assert len(plans) >= 2 * 55, len(plans)


def test_dsplan_and_lf_agree_on_every_tier(checked):
    """LF refuses exactly the tiers dsplan marks refused_by_lf, and accepts every other tier dsplan renders."""
    _, _, jobs, results = checked
    wrong = [f"{j['key']}: dsplan expects LF to {j['expect']}, LF " + (
             f"refused at {results[j['key']]['at']}: {results[j['key']]['message']}" if results[j["key"]]["refused"]
             else "accepted") for j in jobs if results[j["key"]]["refused"] != (j["expect"] == "refuse")]
    assert not wrong, "\n".join(wrong)
    assert any(j["expect"] == "refuse" for j in jobs)


def test_dsplan_gives_lf_own_reason(checked):
    """Where dsplan marks a tier refused, its reason quotes the message LF stops with."""
    _, _, jobs, results = checked
    quoted = [j for j in jobs if j.get("dsplan_says")]
    differ = [f"{j['key']}: LF: {results[j['key']]['message']!r}, dsplan: {j['dsplan_says']!r}" for j in quoted
              if results[j["key"]]["message"] not in j["dsplan_says"]]
    assert quoted and not differ, "\n".join(differ)


def test_load_time_rules_are_checked(checked):
    """LF refuses ZeRO-3 for pre-quantized checkpoints, bnb 8-bit, HQQ and EETQ at model load, which
    get_train_args does not see; dsplan keeps those tiers off (test_dsplan_and_lf_agree_on_every_tier)."""
    _, _, jobs, results = checked
    at_load = {j["key"] for j in jobs if results[j["key"]]["at"] == "configure_quantization"}
    assert any("gptq" in k and "zero3" in k for k in at_load), sorted(at_load)
    assert any("awq" in k and "zero3" in k for k in at_load), sorted(at_load)
    for method, bits in (("bnb", 8), ("hqq", 4), ("hqq", 2), ("eetq", 8)):
        assert f"{OTFQ_EXAMPLE} [{method} {bits}-bit] 8x80G zero3" in at_load, sorted(at_load)
    assert "main/train_lora/qwen3_lora_dpo.yaml [ref 8-bit] 8x80G zero3" in at_load, sorted(at_load)
    assert "v0.9.3/train_lora/llama3_lora_ppo.yaml [full reward 8-bit] 8x80G zero3_offload" in at_load
