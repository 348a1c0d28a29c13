"""Model calibration: dsplan's estimate against a trace of the model's exact architecture, and its entry.

``dsplan calibrate MODEL_DIR [plan flags]`` runs :mod:`dsplan.learn.trace_worker` under the Python
that has torch, transformers and peft (``--python``, ``$DSPLAN_TRAIN_PYTHON``, else this one): a
``FakeTensorMode`` trace of one training step of MODEL_DIR's config.json, in the state LF +
DeepSpeed leave the model in (16-bit weights, LoRA in the stage's dtype, HF's optimizer over
DeepSpeed's partitions; see the worker's docstring).  FakeTensors hold no memory, so a 70B
architecture traces on a laptop.  This module is login-node safe: it never imports torch.

Both sides are split into the same parts (:data:`PARTS`), the tensor memory of one GPU:

- ``weights``: the model's parameters (the reference copy's too), partitioned 1/N at ZeRO-3;
- ``optimizer``: what persists between steps on the optimizer's side (fp32 master partition and
  Adam's states, 12 B per trainable parameter / N);
- ``transient``: everything else at the step's peak: activations, the loss's logits, the extra
  forwards of DPO/KTO, the gradient partition, the reduce bucket, the optimizer step's own tensors.
  Context, communication buffers, allocator slack, ZeRO-3's gathered working set and ZeRO-2's
  allgather bucket are not tensors a one-process trace sees, and are left out of both sides.

The entry stores trace / estimate per part as a *factor*.  ``plan`` looks the entry up by a key made
of the architecture (the shapes dsplan reads from config.json, so a catalog name and a folder with
the same config.json share it) and the settings that change the layout of memory -- method, LoRA
rank and targets, trainable layers, gradient checkpointing, attention, stage (pt and sft alike),
Liger, quantization bits, optimizer and the ZeRO stage -- but not cutoff_len, micro-batch or world
size: the factors are ratios and carry over to those.  It scales the components of each part by
its factor and names the entry in its ``why``.

Entries live in the site calibration's file (:mod:`dsplan.learn.calibration`) under their own
top-level key, ``"models"``::

    {"format": "dsplan-calibration", "version": 1, "entries": {...site entries...},
     "models": {"<key>": {"label": "Qwen3-0.6B lora r8 ...", "zero_stage": 2, "factors": {"weights": 1.0,
                "optimizer": 1.0, "transient": 1.04}, "traced": {...}, "estimated": {...}, "settings": {...},
                "layers": 4, "seq_len": 512, "micro_batch": 1, "world_size": 1, "versions": {...},
                "created": "..."}}}
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from dsplan.codes import Component
from dsplan.errors import UserError, excerpt
from dsplan.estimate.workload import Workload
from dsplan.units import GiB

WORKER = Path(__file__).with_name("trace_worker.py")
PARTS = ("weights", "optimizer", "transient", "total")
#: The estimate's components each part's factor scales.
SCALED: dict[str, tuple[Component, ...]] = {
    "weights": (Component.WEIGHTS, Component.REF_MODEL, Component.REWARD_MODEL),
    "optimizer": (Component.OPTIMIZER,),
    "transient": (Component.ACTIVATIONS, Component.LOGITS, Component.REF_FORWARD, Component.KL_FORWARD,
                  Component.GRADIENTS, Component.OPTIMIZER_STEP, Component.ATTENTION_MASK,
                  Component.DORA_WORKSPACE),
}
#: Components no one-process trace sees (left out of the estimate's side).
UNTRACED = (Component.OVERHEAD, Component.ZERO3_GATHER, Component.ZERO3_LIVE, Component.DEQUANT_WORKSPACE,
            Component.LOAD_UPCAST, Component.KV_CACHE, Component.GENERATION_GATHER)
#: A factor outside this range means the trace and the estimate describe different things.
FACTOR_RANGE = (0.25, 4.0)
MODELS_KEY = "models"
TRAIN_PYTHON_ENV = "DSPLAN_TRAIN_PYTHON"


# ---------------------------------------------------------------------------- the key
def arch_fields(spec) -> dict:
    """The shapes of ``spec`` that decide memory (not its name or where it came from)."""
    d = spec.to_dict()
    keep = ("model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
            "vocab_size", "tie_word_embeddings", "num_experts", "total_params")
    arch = {k: d[k] for k in keep}
    arch.update({k: v for k, v in d.get("architecture", {}).items() if k != "warnings"})
    return arch


def settings_fields(w: Workload, zero_stage: int) -> dict:
    """The settings that change how memory is laid out (cutoff, micro-batch and world size do not)."""
    out = {"method": w.method, "gradient_checkpointing": w.gradient_checkpointing, "attention": w.attention,
           "stage": "sft" if w.stage in ("pt", "sft") else w.stage, "liger": w.liger, "optim": w.optim,
           "zero_stage": zero_stage}
    if w.adapters:
        out.update(lora_rank=w.lora_rank, lora_targets=sorted(w.lora_targets) if w.lora_targets else "all",
                   quantization_bit=w.quantization_bit or (4 if w.method == "qlora" else None))
    if w.method == "freeze":
        out["freeze_trainable_layers"] = w.freeze_trainable_layers
    if w.stage in ("dpo", "kto"):
        out["reference"] = w.reference
    return out


def untraceable(w: Workload) -> list[str]:
    """What of ``w`` the worker does not trace (calibrate refuses rather than trace something else)."""
    return [what for what, bad in (
        (f"stage {w.stage}", w.stage not in ("pt", "sft", "dpo", "kto")), ("use_dora", w.use_dora),
        (f"finetuning_type {w.adapter}", w.adapter != "lora"), ("additional_target/freeze_extra_modules",
                                                               bool(w.extra_modules)),
        ("neat_packing without fa2", w.attention_mask_4d), ("freeze_trainable_modules",
                                                              tuple(w.freeze_modules) != ("all",)),
        (f"quantization_method {w.quantization_method}", bool(w.quantization_bit) and w.quantization_method != "bnb"),
    ) if bad]


def model_key(spec, w: Workload, zero_stage: int) -> str:
    blob = json.dumps({"arch": arch_fields(spec), "settings": settings_fields(w, zero_stage)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def key_settings(spec, w: Workload, zero_stage: int) -> dict:
    """What an entry records of its key: the settings, and the architecture (as JSON) it was traced for."""
    return {**settings_fields(w, zero_stage), "arch": json.dumps(arch_fields(spec), sort_keys=True)}


def label(spec, w: Workload, zero_stage: int) -> str:
    how = f"{w.method} r{w.lora_rank}" if w.adapters else w.method
    return (f"{spec.name} {how}, {w.stage}, gradient checkpointing {'on' if w.gradient_checkpointing else 'off'}, "
            f"{w.attention}{', liger' if w.liger else ''}, ZeRO-{zero_stage}")


# ---------------------------------------------------------------------------- the trace
def reduced_config(config: dict, layers: int | None) -> dict:
    """config.json with ``layers`` decoder layers (the text model's, for a VLM); unchanged when None."""
    cfg = json.loads(json.dumps(config))
    if not layers:
        return cfg
    text = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
    text["num_hidden_layers"] = layers
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:layers]
    return cfg


def worker_job(config: dict, w: Workload, zero_stage: int, world_size: int, layers: int | None,
               reduce_bucket: int) -> dict:
    """One job for the worker: this architecture, these settings, this ZeRO stage and world size."""
    return {"config": config, "layers": layers, "method": w.method, "lora_rank": w.lora_rank,
            "freeze_trainable_layers": w.freeze_trainable_layers, "gradient_checkpointing": w.gradient_checkpointing,
            "seq_len": w.seq_len, "micro_batch": w.micro_batch, "attention": "eager" if w.attention == "eager"
            else "sdpa", "stage": "sft" if w.stage == "pt" else w.stage, "liger": w.liger, "zero": zero_stage,
            "world_size": world_size, "optim": w.optim, "reduce_bucket": reduce_bucket,
            "reference": w.reference != "none"}


def train_python(python: str | None = None) -> str:
    return python or os.environ.get(TRAIN_PYTHON_ENV) or sys.executable


def run_worker(jobs: list[dict], python: str | None = None, timeout: float = 3600) -> list[dict]:
    """The worker's result per job, in a subprocess under ``python``; a worker that cannot start, or
    fails outright, is a UserError."""
    exe = train_python(python)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    try:
        proc = subprocess.run([exe, str(WORKER)], input=json.dumps(jobs), capture_output=True, text=True,
                              timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"the trace worker under {excerpt(exe)} did not run: {e}") from None
    results = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            results.append(json.loads(line))
    if len(results) != len(jobs):
        tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
        raise UserError(f"the trace worker under {excerpt(exe)} failed (exit {proc.returncode}): "
                        f"{excerpt(tail, 300)}; it needs torch, transformers and peft")
    return results


def traced_parts(result: dict, job: dict) -> dict[str, int]:
    """The trace's parts (module docstring); ZeRO-3's weights are the partition, whole / N."""
    n = job["world_size"] if job["zero"] == 3 else 1
    whole = result["weights"] + result["ref_weights"]
    weights = whole / n
    total = max(result["peaks"].values()) - whole + weights
    optimizer = result["states"]
    return {"weights": int(weights), "optimizer": int(optimizer), "transient": int(total - weights - optimizer),
            "total": int(total)}


def estimated_parts(est, spec, tier, zero) -> dict[str, int]:
    """The estimate's parts: the same tensors, without what a one-process trace cannot see (the
    runtime overhead, ZeRO-3's gathered set, the allgather/prefetch buckets)."""
    from dsplan.schema.ds import resolve_auto

    gpu = est.gpu
    weights = sum(gpu.get(c, 0) for c in SCALED["weights"])
    optimizer = gpu.get(Component.OPTIMIZER, 0)
    reduce_bucket = 2.0 * resolve_auto(zero.reduce_bucket_size, spec.hidden_size ** 2)
    kept = sum(v for c, v in gpu.items() if c not in UNTRACED and c != Component.DS_BUFFERS)
    total = kept + min(reduce_bucket, gpu.get(Component.DS_BUFFERS, 0))
    return {"weights": int(weights), "optimizer": int(optimizer), "transient": int(total - weights - optimizer),
            "total": int(total)}


def errors(traced: dict, estimated: dict) -> dict[str, float | None]:
    """(estimate - trace) / trace per part; None where the trace has nothing."""
    return {k: ((estimated[k] - traced[k]) / traced[k] if traced[k] else None) for k in PARTS}


def factors(traced: dict, estimated: dict) -> dict[str, float]:
    """trace / estimate per scaled part (1 where the estimate has nothing), kept within FACTOR_RANGE."""
    lo, hi = FACTOR_RANGE
    out = {}
    for part in SCALED:
        t, e = traced[part], estimated[part]
        out[part] = 1.0 if e <= 0 else round(min(hi, max(lo, t / e)), 4)
    return out


# ---------------------------------------------------------------------------- the entries
@dataclass(frozen=True)
class ModelEntry:
    """One model + settings + ZeRO stage's calibration, as the file holds it."""

    key: str
    label: str
    zero_stage: int
    factors: dict[str, float]
    traced: dict[str, int] = field(default_factory=dict)
    estimated: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    measured_at: dict = field(default_factory=dict)  # layers, seq_len, micro_batch, world_size
    versions: dict = field(default_factory=dict)
    created: str = ""
    path: Path | None = None

    def to_file(self) -> dict:
        return {"label": self.label, "zero_stage": self.zero_stage, "factors": self.factors, "traced": self.traced,
                "estimated": self.estimated, "settings": self.settings, **self.measured_at,
                "versions": self.versions, "created": self.created}

    def why(self) -> str:
        moved = ", ".join(f"{p} x{f:.3f}" for p, f in self.factors.items() if abs(f - 1) >= 0.0005) or "no change"
        where = f" in {self.path}" if self.path else ""
        return (f"model calibration {self.key} ({self.label}, traced {self.created[:10] or 'n/a'}){where}: "
                f"{moved}")


MEASURED_AT = ("layers", "seq_len", "micro_batch", "world_size")


def _model_entry(key: str, raw, path: Path | None) -> ModelEntry:
    what = f"models entry {excerpt(key, 40)}"
    if not isinstance(raw, dict) or not isinstance(raw.get("factors"), dict) or raw.get("zero_stage") not in (2, 3):
        raise ValueError(f"{what}: needs factors (an object) and zero_stage (2 or 3)")
    lo, hi = FACTOR_RANGE
    fac = {}
    for part in SCALED:
        v = raw["factors"].get(part, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError(f"{what}: factor {part} must be a number from {lo:g} to {hi:g}, got {excerpt(v, 30)}")
        fac[part] = float(v)
    dicts = {k: raw.get(k) if isinstance(raw.get(k), dict) else {} for k in ("traced", "estimated", "settings",
                                                                            "versions")}
    return ModelEntry(key, str(raw.get("label") or key), raw["zero_stage"], fac, dicts["traced"],
                      dicts["estimated"], dicts["settings"], {k: raw[k] for k in MEASURED_AT if k in raw},
                      dicts["versions"], str(raw.get("created") or ""), path)


def _calibration_file(path: Path | None) -> Path:
    from dsplan.learn.calibration import calibration_path

    return Path(path) if path is not None else calibration_path()


def load_model_entries(path: Path | None = None) -> dict[str, ModelEntry]:
    """The ``models`` entries of the calibration file (none there: empty); a malformed one is a UserError."""
    from dsplan.inputs.reading import path_kind, read_json

    path = _calibration_file(path)
    if path_kind(path) is None and not path.is_symlink():
        return {}
    data = read_json(path, f"calibration file {path}")
    models = data.get(MODELS_KEY, {}) if isinstance(data, dict) else None
    try:
        if not isinstance(models, dict):
            raise ValueError(f"{MODELS_KEY} must be an object")
        return {k: _model_entry(k, raw, path) for k, raw in models.items()}
    except ValueError as e:
        raise UserError(f"calibration file {path}: {e} (fix it, or remove it to use dsplan's defaults)") from None


def save_model_entries(entries: list[ModelEntry], path: Path | None = None) -> Path:
    """Add or replace these entries under ``models``, keeping everything else the file holds (the site
    calibration's ``entries`` included)."""
    from dsplan.fsutil import atomic_write
    from dsplan.inputs.reading import path_kind, read_json
    from dsplan.learn.calibration import FORMAT, VERSION

    path = _calibration_file(path)
    data = {"format": FORMAT, "version": VERSION, "entries": {}}
    if path_kind(path) is not None:
        data = read_json(path, f"calibration file {path}")
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"calibration file {path}: not a {FORMAT} file; not overwriting it")
    load_model_entries(path)  # refuses a malformed models block before writing over it
    models = dict(data.get(MODELS_KEY) or {})
    models.update({e.key: e.to_file() for e in entries})
    data[MODELS_KEY] = dict(sorted(models.items()))
    try:
        atomic_write(path, json.dumps(data, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"cannot write calibration file {path}: {e.strerror or e}") from None
    return path


def find_entry(entries: dict[str, ModelEntry], spec, w: Workload, zero_stage: int) -> ModelEntry | None:
    return entries.get(model_key(spec, w, zero_stage)) if entries else None


def apply_entry(est, entry: ModelEntry):
    """The estimate with each part's components scaled by the entry's factor (the overhead, computed
    from the uncalibrated transient, is left as it was)."""
    gpu = dict(est.gpu)
    for part, comps in SCALED.items():
        f = entry.factors.get(part, 1.0)
        for c in comps:
            if c in gpu:
                gpu[c] = int(gpu[c] * f)
    return replace(est, gpu=gpu)


# ---------------------------------------------------------------------------- plan's side
def attach_model_calibration(spec, path: Path | None = None):
    """``spec`` carrying the model entries of its architecture (any settings), for the planner to look up;
    ``spec`` itself when the file has none."""
    entries = load_model_entries(path)
    if not entries:
        return spec
    arch = json.dumps(arch_fields(spec), sort_keys=True)
    mine = tuple(e for e in entries.values() if e.settings.get("arch") == arch)
    return replace(spec, calibration=mine) if mine else spec


def calibrated(est, spec, tier, w: Workload):
    """The estimate with the model entry for this architecture, settings and ZeRO stage applied (as it
    was when there is none)."""
    held = getattr(spec, "calibration", ())
    if not held:
        return est
    entry = find_entry({e.key: e for e in held}, spec, w, tier.stage)
    return apply_entry(est, entry) if entry is not None else est


def calibration_used(plan) -> list[tuple[ModelEntry, list[str]]]:
    """The model entries the plan's tiers used, each with the tiers it was applied to."""
    held = getattr(plan.model, "calibration", ())
    by_key = {e.key: e for e in held}
    used: dict[str, list[str]] = {}
    for tp in plan.tiers:
        entry = find_entry(by_key, plan.model, plan.workload, tp.tier.stage)
        if entry is not None:
            used.setdefault(entry.key, []).append(tp.tier.name)
    return [(by_key[k], tiers) for k, tiers in used.items()]


def calibration_json(plan) -> list[dict]:
    """``plan --json``'s ``model_calibration``: each entry used, its file, factors and tiers."""
    return [{"key": e.key, "label": e.label, "zero_stage": e.zero_stage, "factors": dict(e.factors),
             "file": str(e.path) if e.path else None, "created": e.created or None, "tiers": tiers}
            for e, tiers in calibration_used(plan)]


def calibration_why(plan) -> list[str]:
    """The plan's lines naming the model entries its tiers used."""
    held = getattr(plan.model, "calibration", ())
    if not held:
        return []
    lines = [f"{e.why()}; applied to {', '.join(tiers)}" for e, tiers in calibration_used(plan)]
    if not lines:
        lines.append(f"model calibration: {len(held)} entr{'y' if len(held) == 1 else 'ies'} for this architecture, "
                     "none for these settings (dsplan calibrate MODEL_DIR with these flags makes one)")
    return lines


# ---------------------------------------------------------------------------- dsplan calibrate MODEL_DIR
@dataclass
class Traced:
    """One ZeRO stage's comparison: the estimate's parts, the trace's, and the entry made of them."""

    stage: int
    estimated: dict[str, int]
    traced: dict[str, int]
    entry: ModelEntry
    seconds: float = 0.0


def _stage_job(config: dict, spec_r, inputs, w: Workload, stage: int):
    """The estimate's parts and the worker's job for one ZeRO stage (the reduced config's spec)."""
    from dsplan.estimate.estimate import estimate
    from dsplan.plan.tiers import get_tier
    from dsplan.schema.ds import ZeroOptimization

    tier, zo = get_tier(f"zero{stage}"), ZeroOptimization(stage=stage)
    est = estimate(spec_r, inputs.profile, tier, w, zo)
    job = worker_job(config, w, stage, inputs.profile.world_size, None, spec_r.hidden_size ** 2)
    return estimated_parts(est, spec_r, tier, zo), job


def calibrate_model(inputs, config: dict, layers: int | None = None, stages=(2, 3), python: str | None = None,
                    path: Path | None = None) -> tuple[list[Traced], Path]:
    """Trace ``config`` (the model's config.json) with ``inputs``' settings at each ZeRO stage, compare
    with the estimate, and write one entry per stage into the calibration file."""
    from dsplan.inputs.model import spec_from_config
    from dsplan.plan.planner import workload_from

    w = workload_from(inputs.settings)
    if untraceable(w):
        raise UserError(f"dsplan calibrate traces pt, sft, dpo and kto with LoRA, QLoRA, full or freeze tuning; "
                        f"not {', '.join(untraceable(w))}")
    reduced = reduced_config(config, layers)
    spec_r = spec_from_config(reduced, name=inputs.spec.name)
    prepared = [_stage_job(reduced, spec_r, inputs, w, s) for s in stages]
    results = run_worker([job for _, job in prepared], python=python)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = []
    for stage, (est, job), res in zip(stages, prepared, results):
        if not res.get("ok"):
            raise UserError(f"the trace of {inputs.spec.name} at ZeRO-{stage} failed: {res.get('error')}")
        got = traced_parts(res, job)
        if w.method == "qlora" or w.quantization_bit:  # bitsandbytes needs a GPU: the 4-bit weights are counted
            got["total"] += est["weights"] - got["weights"]
            got["weights"] = est["weights"]
        at = {"layers": layers or spec_r.num_layers, "seq_len": w.seq_len, "micro_batch": w.micro_batch,
              "world_size": inputs.profile.world_size}
        entry = ModelEntry(model_key(inputs.spec, w, stage), label(inputs.spec, w, stage), stage, factors(got, est),
                           got, est, key_settings(inputs.spec, w, stage), at, res.get("versions", {}), now)
        out.append(Traced(stage, est, got, entry, res.get("seconds", 0.0)))
    written = save_model_entries([t.entry for t in out], path)
    return [replace(t, entry=replace(t.entry, path=written)) for t in out], written


def describe_calibration(traced: list[Traced], written: Path, python: str) -> list[str]:
    """``dsplan calibrate MODEL_DIR``'s report: per stage, estimate against trace per part."""
    first = traced[0].entry
    at, v = first.measured_at, first.versions
    lines = [f"traced {first.label.rsplit(', ZeRO', 1)[0]}: {at.get('layers')} layers, {at.get('micro_batch')} x "
             f"{at.get('seq_len')} tokens, world size {at.get('world_size')}",
             f"  under {python}: " + ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "peft") if v.get(k))]
    for t in traced:
        errs = errors(t.traced, t.estimated)
        lines.append(f"  ZeRO-{t.stage}        estimate      trace    error   factor   ({t.seconds:.0f} s)")
        for part in PARTS:
            f = t.entry.factors.get(part)
            err = f"{errs[part]:+7.1%}" if errs[part] is not None else "    n/a"
            lines.append(f"    {part:10s} {t.estimated[part] / GiB:8.3f} G {t.traced[part] / GiB:8.3f} G {err}"
                         + (f"   {f:.3f}" if f is not None else ""))
    keys = ", ".join(f"{t.entry.key} (ZeRO-{t.stage})" for t in traced)
    lines.append(f"wrote {written}: model entries {keys}; plan, render and run use them for this architecture "
                 "and these settings")
    return lines


def _model_config(spec) -> dict:
    """config.json of a local folder or of the Hugging Face cache (catalog configs are abridged)."""
    from dsplan.inputs.reading import read_json

    source = Path(spec.source) if spec.source and not spec.source.startswith("catalog:") else None
    if source is None or source.name != "config.json":
        raise UserError(f"dsplan calibrate needs the model's own config.json: give the folder that holds it "
                        f"({excerpt(spec.name)} resolved to {excerpt(spec.source or 'the catalog')})")
    cfg = read_json(source, str(source))
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: expected a JSON object")
    return cfg


def calibrate_command(model_dir: str, options: dict, python: str | None, layers: int | None, as_json: bool,
                      echo=print) -> int:
    """``dsplan calibrate MODEL_DIR [plan flags]``: resolve the inputs as ``plan`` does (hardware flags
    only set the world size; one GPU when none is given), trace, compare, write, report."""
    from dsplan.inputs.request import Request, resolve

    opts = dict(options)
    if opts.get("model") not in (None, model_dir):
        raise UserError("give the model once: MODEL_DIR or --model")
    opts["model"] = model_dir
    if not opts.get("gpus") and not opts.get("preset"):
        opts["gpus"] = "1x80G"  # the card's size does not enter a trace; the world size does
    inputs = resolve(Request.from_options(None, opts))
    config = _model_config(inputs.spec)
    traced, written = calibrate_model(inputs, config, layers=layers, python=python)
    if as_json:
        echo(json.dumps({"path": str(written), "entries": [
            {"key": t.entry.key, "label": t.entry.label, "zero_stage": t.stage, "estimated": t.estimated,
             "traced": t.traced, "errors": errors(t.traced, t.estimated), "factors": t.entry.factors,
             **t.entry.measured_at, "versions": t.entry.versions} for t in traced]}, indent=2))
    else:
        for line in describe_calibration(traced, written, train_python(python)):
            echo(line)
    return 0
