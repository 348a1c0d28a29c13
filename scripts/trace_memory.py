#!/usr/bin/env python3
"""dsplan's estimate against the real code path: LLaMA-Factory + peft + HF's Trainer + DeepSpeed, traced.

Two parts, each printed as a table of estimate against measurement:

``facts`` -- the real path itself, on the CPU.  For a tiny member of each family (Qwen2, Llama, Qwen3-MoE,
Gemma 3 as the VLM; Qwen2-VL is refused, below) the script runs LF's own ``run_exp`` in a fresh
process: ``get_train_args`` on a YAML, LF's ``load_model`` (its upcast, its gradient checkpointing,
peft's LoRA with ``lora_target: all``), HF's Trainer, accelerate and the real ``deepspeed.initialize``
at world size 1 (gloo, bf16 with ``use_cpu``, the ``zero_optimization`` block dsplan renders), two
steps.  A callback records what the run holds, and every tensor storage the second step allocates or
frees is tracked by a dispatch-mode hook (the ones alive before it by a census of the garbage
collector's tensors).  Written to ``tests/data/real_path_facts.json`` with the versions.  Found with
torch 2.9.1, transformers 5.6.0, peft 0.18.1, accelerate 1.11.0, DeepSpeed 0.19.8, LF 0.9.5:

- parameter dtypes after ``deepspeed.initialize``: ZeRO-2 casts every parameter to bf16, LoRA adapters
  included (``_cast_module_mixed_precision``; LF had upcast them to fp32), so peft feeds the adapters
  bf16 inputs.  ZeRO-3 with zero.Init leaves the adapters fp32 (LF: "ZeRO3 detected, remaining
  trainable params in float32"; their partitions are fp32 too) and peft casts each adapted linear's
  input to fp32.  Full and freeze tuning: bf16 at both stages.
- the optimizer: HF builds ``torch.optim.AdamW(fused=True)`` -- transformers 5.6's ``training_args.py``
  defaults ``optim`` to ``adamw_torch_fused`` when torch >= 2.8 -- and accelerate hands it to
  DeepSpeed, which wraps it (``DeepSpeedOptimizerWrapper`` > ``DeepSpeedZeroOptimizer`` /
  ``DeepSpeedZeroOptimizer_Stage3`` > ``AdamW``); its states are fp32.
- autocast: off (``torch.is_autocast_enabled`` false in the model's forward); DeepSpeed's bf16 is
  parameters in bf16, not autocast.
- memory: between steps each trainable parameter costs 12 B / N (fp32 master, Adam's m and v); no
  fp32 gradient persists.  ZeRO-2 makes its 16-bit gradient partition (2 B / N) in backward and its
  reduce bucket there; at the step it flattens the partition and upcasts it, 8 B / N above the
  persistent states at its peak.  ZeRO-3 keeps the 16-bit partition and the bucket from init; its
  step adds 6 B / N.  The fused step itself makes no temporary.
- refused: Qwen2-VL (and every model with a Conv3d) -- LF 0.9.5's loader raises "Unsupported torch
  version detected: torch 2.9.x with Conv3D"; so the VLM of the real path is Gemma 3.
- not run: QLoRA (bitsandbytes is not installed and needs a GPU) and Liger (``liger_kernel`` is not
  installed); fp16 (DeepSpeed's CPU accelerator takes fp32 and bf16 only).

``table`` -- the same state at full width under ``FakeTensorMode`` (no memory is used), for the settings
of :data:`SETTINGS`: real transformers and peft modules, LF's checkpointing and ``get_batch_logps``,
DeepSpeed's partitions emulated from the facts above (``dsplan/learn/trace_worker.py`` says how), DPO
and KTO as LF's trainers run them, reduced layer counts.  What is emulated: world size 2 is the
partition sizes halved (one process, no communication); ZeRO-3's parameter partitions and gathered
working set are not traced (the partition is whole / N; the gather is left out of both sides);
QLoRA traces the dequantized 16-bit path and takes its 4-bit weights from the estimate; Liger is a
chunked fused linear cross-entropy (no full logits) when ``liger_kernel`` is absent; a VLM is traced
text-only.  Each row: weights, the optimizer's persistent states, the transient rest at the step's
peak, and the total (GiB, estimate/trace), left out on both sides what a one-process trace cannot
see (runtime overhead, ZeRO-3's gathered set, the allgather and prefetch buckets).

Usage::

    python scripts/trace_memory.py                 # the table (a few minutes on 2 cores)
    python scripts/trace_memory.py quick           # three settings
    python scripts/trace_memory.py facts           # the real path; writes tests/data/real_path_facts.json
    python scripts/trace_memory.py all --json out.json --traces /tmp/traces.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GiB = 1024**3
MiB = 1024**2
FACTS_JSON = REPO / "tests" / "data" / "real_path_facts.json"

# ============================================================== the real code path (tiny models)
#: Tiny members of each family for the real path: LF loads them from disk as it loads any model.
#: Wide enough (hidden 512) that the optimizer's states of a full fine-tune are tens of MiB.
_TEXT = dict(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
REAL_FAMILIES = {
    "qwen2": dict(_TEXT, model_type="qwen2", use_sliding_window=False),
    "llama": dict(_TEXT, model_type="llama"),
    "qwen3_moe": dict(_TEXT, model_type="qwen3_moe", head_dim=64, moe_intermediate_size=256, num_experts=8,
                      num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
    "gemma3": dict(model_type="gemma3", mm_tokens_per_image=16,
                   text_config=dict(_TEXT, model_type="gemma3_text", head_dim=64, sliding_window=128),
                   vision_config=dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16)),
    "qwen2_vl": dict(_TEXT, model_type="qwen2_vl", rope_scaling={"type": "mrope", "mrope_section": [16, 8, 8]},
                     vision_config=dict(depth=1, embed_dim=128, hidden_size=512, num_heads=2, mlp_ratio=2,
                                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2)),
}


def make_family_model(root: Path, family: str) -> Path:
    """A randomly initialised bf16 checkpoint of ``family`` with the demo tokenizer, saved as HF saves any
    model (config.json, safetensors, tokenizer files); made once per root."""
    dest = root / f"tiny-{family}"
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from dsplan.demo.assets import make_tokenizer

    tok = make_tokenizer(2048)
    fields = json.loads(json.dumps(REAL_FAMILIES[family]))
    ids = dict(bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if "text_config" in fields:
        fields["text_config"].update(ids)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields, **ids)
    vlm = "vision_config" in REAL_FAMILIES[family]
    torch.manual_seed(0)
    cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    model = cls.from_config(cfg, dtype=torch.bfloat16)
    tmp = root / f".tiny-{family}.{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, dest)
    return dest


def census(tracker) -> int:
    """Watch every live tensor storage the garbage collector knows (the model, DeepSpeed's flat buffers
    and partitions, the optimizer's states); returns the tracker's live total."""
    import torch

    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                tracker.add(obj.untyped_storage())
        except (RuntimeError, ReferenceError, NotImplementedError):
            continue
    return tracker.now


def _storage_keys(tensors) -> set[int]:
    return {id(t.untyped_storage()) for t in tensors if t is not None and t.numel()}


def classify_census(tracker, model, optimizer) -> dict[str, int]:
    """The live storages split into weights (the model's parameters, ZeRO-3's partitions included),
    master (DeepSpeed's fp32 partitions), adam (the torch optimizer's state) and other (gradient
    partitions, DeepSpeed's buckets, the batch, buffers)."""
    zero = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    basic = zero.optimizer
    weights = _storage_keys([p.data for p in model.parameters()]
                            + [getattr(p, "ds_tensor", None) for p in model.parameters()])
    master_list = list(getattr(zero, "single_partition_of_fp32_groups", None)
                       or getattr(zero, "fp32_partitioned_groups_flat", None) or [])
    master = _storage_keys(master_list)
    adam = _storage_keys([v for s in basic.state.values() for v in s.values() if hasattr(v, "untyped_storage")])
    parts = {"weights": 0, "master": 0, "adam": 0, "other": 0}
    for key, n in tracker.sizes.items():
        kind = ("weights" if key in weights else "master" if key in master else "adam" if key in adam
                else "other")
        parts[kind] += n
    return parts


def _dtype_facts(model) -> dict[str, list[str]]:
    """Parameter dtypes by kind (adapter or base, trainable or frozen), with ZeRO-3's partition dtype."""
    seen: dict[str, set] = {}
    for name, p in model.named_parameters():
        kind = ("adapter" if "lora_" in name else "base") + ("/trainable" if p.requires_grad else "/frozen")
        part = getattr(p, "ds_tensor", None)
        seen.setdefault(kind, set()).add(str(p.dtype).replace("torch.", "")
                                         + (f" (ZeRO-3 partition {str(part.dtype).replace('torch.', '')})"
                                            if part is not None else ""))
    return {k: sorted(v) for k, v in seen.items()}


def _optimizer_facts(optimizer, args) -> dict:
    chain, o = [], optimizer
    while o is not None and len(chain) < 5:
        chain.append(f"{type(o).__module__}.{type(o).__name__}")
        o = getattr(o, "optimizer", None)
    basic = optimizer
    while hasattr(basic, "optimizer"):
        basic = basic.optimizer
    d = basic.defaults
    return {"hf_optim": str(getattr(args.optim, "value", args.optim)), "chain": chain,
            "fused": d.get("fused"), "foreach": d.get("foreach"),
            "state_dtypes": sorted({str(v.dtype).replace("torch.", "") for s in basic.state.values()
                                    for v in s.values() if hasattr(v, "dtype") and v.dim()})}


def probe_callback(result: dict):
    """An HF TrainerCallback that records the real path's facts at the start of training and traces
    the second step (optimizer states exist by then): census at its start, then the live-bytes peak
    in forward (to the loss), backward and DeepSpeed's optimizer step."""
    import torch
    from transformers import TrainerCallback

    from dsplan.learn.trace_worker import LiveBytes

    tracker = LiveBytes()

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            result["dtypes"] = _dtype_facts(model)
            result["optimizer"] = _optimizer_facts(optimizer, args)
            result["gradient_checkpointing"] = bool(getattr(model, "is_gradient_checkpointing", False))
            zero = optimizer.optimizer
            step = zero.step

            def traced_step(*a, **k):
                tracker.enter("step")
                out = step(*a, **k)
                tracker.enter("after")
                return out

            zero.step = traced_step
            model.register_forward_pre_hook(self._pre, with_kwargs=True)
            model.register_forward_hook(lambda *a, **k: tracker.enter("backward"))
            lora = next((m for n, m in model.named_modules() if n.endswith("lora_A.default")), None)
            if lora is not None:
                lora.register_forward_pre_hook(lambda m, a: result.update(adapter_input_dtype=str(a[0].dtype)))

        def _pre(self, module, args, kwargs):
            ids = kwargs.get("input_ids")
            result["autocast_cpu"] = torch.is_autocast_enabled("cpu")
            if ids is not None:
                result["batch_shape"] = list(ids.shape)

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
            if state.global_step != 1:
                return
            gc.collect()
            census(tracker)
            result["census"] = classify_census(tracker, model, optimizer)
            result["baseline"] = tracker.now
            tracker.peaks = {}
            tracker.enter("forward")
            tracker.mode.__enter__()
            result["tracing"] = True

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            if not result.pop("tracing", False):
                return
            tracker.mode.__exit__(None, None, None)
            result["peaks"] = dict(tracker.peaks)
            result["end"] = tracker.now
            result["optimizer"]["state_dtypes"] = _optimizer_facts(optimizer, args)["state_dtypes"]

    return Probe()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_env() -> dict[str, str]:
    """One rank of a world of one, on the CPU (gloo), offline.  DeepSpeed's shm op is built once per
    ``TORCH_EXTENSIONS_DIR`` (keep it stable; see README)."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def real_args(job: dict, model_dir: Path, data_dir: Path, dataset: str, ds_path: Path, out: Path) -> dict:
    """The LF YAML of one real-path case (bf16 on the CPU needs ``use_cpu``)."""
    from dsplan.schema.ds import DsConfig, ZeroOptimization

    ds_path.write_text(json.dumps(DsConfig(zero_optimization=ZeroOptimization(stage=job["zero"])).to_dict()))
    args = dict(model_name_or_path=str(model_dir), stage="sft", do_train=True, finetuning_type=job["method"],
                lora_target="all", lora_rank=8, dataset=dataset, dataset_dir=str(data_dir), template="qwen",
                cutoff_len=job.get("cutoff", 256), per_device_train_batch_size=1, gradient_accumulation_steps=1,
                max_steps=2, logging_steps=1, save_strategy="no", output_dir=str(out), overwrite_output_dir=True,
                report_to="none", bf16=True, use_cpu=True, deepspeed=str(ds_path), preprocessing_num_workers=1,
                dataloader_num_workers=0, learning_rate=1e-4)
    if job["method"] == "freeze":
        args["freeze_trainable_layers"] = 1
    if not job.get("gc", True):
        args["disable_gradient_checkpointing"] = True
    return args


def real_case(job: dict) -> dict:
    """One real-path case, in this process: LF's run_exp (its loader, peft, HF's Trainer, accelerate and
    DeepSpeed) for two steps of a tiny model, with the probe."""
    from dsplan.demo.assets import make_dataset

    root = Path(job["root"])
    model_dir = make_family_model(root, job["family"])
    data_dir = root / "data"
    dataset = make_dataset(data_dir, 16)
    name = f"{job['family']}-{job['method']}-z{job['zero']}" + ("" if job.get("gc", True) else "-nogc")
    result: dict = {"job": job, "config": json.loads((model_dir / "config.json").read_text())}
    try:
        from llamafactory.train.tuner import run_exp

        run_exp(real_args(job, model_dir, data_dir, dataset, root / f"{name}.ds.json", root / name),
                callbacks=[probe_callback(result)])
    except Exception as e:  # noqa: BLE001 - what LF or DeepSpeed said is the finding
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return result


#: The real-path cases: (family, method, ZeRO stage, gradient checkpointing).
REAL_CASES = [
    ("qwen2", "lora", 2, True), ("qwen2", "lora", 3, True), ("qwen2", "full", 2, True), ("qwen2", "full", 3, True),
    ("qwen2", "freeze", 2, True), ("qwen2", "lora", 2, False), ("llama", "lora", 2, True), ("llama", "full", 3, True),
    ("qwen3_moe", "lora", 2, True), ("qwen3_moe", "lora", 3, True), ("gemma3", "lora", 2, True),
    ("qwen2_vl", "lora", 2, True),
]


def run_real_case(job: dict, timeout: float = 900) -> dict:
    """One real-path case in a fresh process (DeepSpeed and accelerate keep global state)."""
    proc = subprocess.run([sys.executable, __file__, "real-case", json.dumps(job)], env=real_env(), cwd=job["root"],
                          capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("REAL_RESULT "):
            return json.loads(line[len("REAL_RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"job": job, "error": f"exit {proc.returncode}: {' | '.join(tail)[:400]}"}


def real_jobs(root: Path, cases=REAL_CASES) -> list[dict]:
    return [{"root": str(root), "family": f, "method": m, "zero": z, "gc": g} for f, m, z, g in cases]



def real_estimate(r: dict) -> dict:
    """dsplan's estimate of one real-path case (the tiny model's own config.json, the batch it trained on)."""
    from dsplan.estimate.estimate import estimate
    from dsplan.estimate.workload import Workload
    from dsplan.inputs.hardware import make_profile
    from dsplan.inputs.model import spec_from_config
    from dsplan.learn.trace import estimated_parts
    from dsplan.plan.tiers import get_tier
    from dsplan.schema.ds import ZeroOptimization

    job = r["job"]
    spec = spec_from_config(r["config"], name=f"tiny-{job['family']}")
    rows, seq = r["batch_shape"]
    w = Workload(method=job["method"], cutoff_len=seq, micro_batch=rows, gradient_checkpointing=job.get("gc", True),
                 lora_rank=8, freeze_trainable_layers=1, optim=r["optimizer"]["hf_optim"])
    tier, zo = get_tier(f"zero{job['zero']}"), ZeroOptimization(stage=job["zero"])
    return estimated_parts(estimate(spec, make_profile("1x80G", "cuda"), tier, w, zo), spec, tier, zo)


def real_rows(results: list[dict]) -> list[dict]:
    """Each real-path case's measured parts beside the estimate: weights and optimizer from the census at
    the start of the traced step, total from the largest live total in it."""
    from dsplan.learn.trace import errors

    out = []
    for r in results:
        job = r["job"]
        name = f"{job['family']} {job['method']} z{job['zero']} {'gc' if job.get('gc', True) else 'no-gc'}"
        if "error" in r or "census" not in r:
            out.append({"case": name, "error": r.get("error", "no traced step")})
            continue
        c = r["census"]
        total = max(r["peaks"].values())
        got = {"weights": c["weights"], "optimizer": c["master"] + c["adam"]}
        got.update(transient=total - got["weights"] - got["optimizer"], total=total)
        est = real_estimate(r)
        out.append({"case": name, "trace": got, "estimate": est, "errors": errors(got, est),
                    "step_over_persistent": r["peaks"].get("step", 0) - r["baseline"]})
    return out


# ============================================================== the table: estimate against trace
#: (catalog model, layers (None: all), method, GC, seq, micro-batch, LF stage, liger, ZeRO stage, world size, extra)
SETTINGS = [
    ("Qwen2.5-0.5B", 4, "lora", True, 1024, 1, "sft", False, 2, 1, {}),
    ("Qwen2.5-0.5B", 4, "lora", False, 1024, 1, "sft", False, 2, 1, {}),
    ("Qwen2.5-0.5B", 4, "full", True, 512, 2, "sft", False, 2, 1, {}),
    ("Qwen2.5-0.5B", 4, "full", False, 512, 1, "sft", False, 2, 2, {}),
    ("Qwen2.5-0.5B", 4, "freeze", True, 1024, 1, "sft", False, 2, 1, {"freeze_trainable_layers": 2}),
    ("Qwen2.5-0.5B", 4, "lora", True, 1024, 1, "sft", False, 3, 1, {}),
    ("Qwen2.5-0.5B", 4, "lora", True, 512, 1, "dpo", False, 2, 1, {}),
    ("Qwen2.5-0.5B", 4, "lora", True, 512, 2, "kto", False, 2, 1, {}),
    ("Qwen2.5-0.5B", 4, "full", True, 512, 1, "dpo", False, 3, 2, {}),
    ("Qwen2.5-0.5B", 4, "lora", True, 2048, 1, "sft", True, 2, 1, {}),
    ("Qwen2.5-0.5B", 4, "full", True, 2048, 1, "sft", True, 2, 1, {}),
    ("Llama-3-8B", 2, "lora", True, 2048, 1, "sft", False, 2, 1, {}),
    ("Llama-3-8B", 2, "lora", False, 1024, 1, "sft", False, 3, 2, {}),
    ("Llama-3-8B", 2, "qlora", True, 2048, 1, "sft", False, 2, 1, {}),
    ("Llama-3-8B", 2, "full", False, 512, 1, "sft", False, 3, 2, {}),
    ("Llama-3-8B", 2, "full", True, 1024, 1, "sft", False, 2, 1, {"optim": "adamw_torch"}),
    ("Llama-3-8B", 2, "freeze", False, 1024, 1, "sft", False, 2, 2, {"freeze_trainable_layers": 1}),
    ("Llama-3-8B", 2, "lora", True, 1024, 1, "kto", False, 3, 1, {}),
    ("Qwen3-30B-A3B", 2, "lora", True, 1024, 1, "sft", False, 2, 1, {}),
    ("Qwen3-30B-A3B", 2, "lora", False, 512, 1, "sft", False, 3, 2, {}),
    ("Qwen3-30B-A3B", 2, "full", True, 512, 1, "sft", False, 3, 2, {}),
    ("Qwen2-VL-7B", 2, "lora", True, 1024, 1, "sft", False, 2, 1, {}),
    ("Qwen2-VL-7B", 2, "full", True, 512, 1, "sft", False, 3, 2, {}),
    ("Qwen3-8B", 2, "lora", True, 1024, 1, "dpo", False, 3, 1, {}),
    ("Qwen2.5-0.5B", 4, "full", True, 512, 1, "sft", False, 3, 1, {"optim": "adamw_torch"}),
    ("Llama-3-8B", 2, "lora", False, 1024, 1, "sft", False, 2, 1, {"attention": "eager"}),
    ("Qwen3-0.6B", 4, "full", False, 1024, 1, "sft", False, 2, 1, {}),
    ("Mixtral-8x7B-v0.1", 2, "lora", True, 1024, 1, "sft", False, 3, 2, {}),
    ("Qwen2.5-7B", None, "lora", False, 1024, 1, "sft", False, 2, 1, {}),
    ("Llama-3-8B", None, "full", True, 2048, 1, "sft", False, 2, 1, {}),
]
QUICK = [SETTINGS[1], SETTINGS[12], SETTINGS[15]]
#: config.json keys the catalog leaves out that transformers needs to build the model (public configs).
CONFIG_EXTRA = {"Qwen2-VL-7B": {"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}}


def setting_workload(row):
    from dsplan.estimate.workload import Workload

    name, layers, method, gc_on, seq, mb, stage, liger, zero, n, extra = row
    return Workload(method=method, cutoff_len=seq, micro_batch=mb, gradient_checkpointing=gc_on, stage=stage,
                    liger=liger, lora_rank=8, quantization_bit=4 if method == "qlora" else None,
                    optim=extra.get("optim", "adamw_torch_fused"), attention=extra.get("attention", "sdpa"),
                    freeze_trainable_layers=extra.get("freeze_trainable_layers", 2))


def setting_estimate(row):
    """dsplan's estimate of one setting (the catalog config with ``layers`` layers) and the worker's job."""
    from dsplan.estimate.estimate import estimate
    from dsplan.inputs.catalog import lookup
    from dsplan.inputs.hardware import make_profile
    from dsplan.inputs.model import spec_from_config
    from dsplan.learn.trace import estimated_parts, reduced_config, worker_job
    from dsplan.plan.tiers import get_tier
    from dsplan.schema.ds import ZeroOptimization

    name, layers, _, _, _, _, _, _, zero, n, _ = row
    config = reduced_config({**lookup(name)[1]["config"], **CONFIG_EXTRA.get(name, {})}, layers)
    spec = spec_from_config(config, name=name)
    w = setting_workload(row)
    tier, zo = get_tier(f"zero{zero}"), ZeroOptimization(stage=zero)
    est = estimate(spec, make_profile(f"{n}x80G", "cuda"), tier, w, zo)
    job = worker_job(config, w, zero, n, None, spec.hidden_size ** 2)
    return spec, est, estimated_parts(est, spec, tier, zo), job


def traces(jobs: list[dict], python: str | None, cache: Path | None) -> list[dict]:
    """The worker's results for ``jobs``: from ``cache`` when it holds exactly these jobs' results
    (re-estimating needs no re-tracing), else traced now in one worker process and cached."""
    from dsplan.learn.trace import run_worker

    if cache is not None and cache.is_file():
        held = json.loads(cache.read_text())
        by_job = {json.dumps(h["job"], sort_keys=True): h["result"] for h in held}
        if all(json.dumps(j, sort_keys=True) in by_job for j in jobs):
            return [by_job[json.dumps(j, sort_keys=True)] for j in jobs]
    results = run_worker(jobs, python=python)
    if cache is not None:
        cache.write_text(json.dumps([{"job": j, "result": r} for j, r in zip(jobs, results)]))
    return results


def table(rows, python: str | None = None, cache: Path | None = None) -> list[dict]:
    """Trace every setting and set each beside dsplan's estimate."""
    from dsplan.learn.trace import errors, traced_parts

    prepared = [setting_estimate(r) for r in rows]
    results = traces([job for _, _, _, job in prepared], python, cache)
    out = []
    for row, (spec, est, est_parts, job), res in zip(rows, prepared, results):
        if not res.get("ok"):
            out.append({"setting": row_name(row), "error": res.get("error"), "trace": res.get("trace")})
            continue
        got = traced_parts(res, job)
        if job["method"] == "qlora":  # bitsandbytes needs a GPU: the dequantized path is traced, the
            got["total"] += est_parts["weights"] - got["weights"]  # 4-bit weights are the estimate's
            got["weights"] = est_parts["weights"]
        out.append({"setting": row_name(row), "row": list(row[:10]), "trace": got, "estimate": est_parts,
                    "error": errors(got, est_parts), "trainable": res["trainable"], "seconds": res["seconds"],
                    "breakdown": {str(k): v for k, v in est.gpu.items()}})
    return out


def row_name(row) -> str:
    name, layers, method, gc_on, seq, mb, stage, liger, zero, n, extra = row
    bits = [f"{name} L{layers or 'all'}", method, stage, "gc" if gc_on else "no-gc", f"{seq}x{mb}", f"z{zero}/{n}"]
    if liger:
        bits.append("liger")
    bits += [extra[k] for k in ("optim", "attention") if k in extra]
    return " ".join(bits)


def print_table(results: list[dict]) -> dict:
    import statistics

    hdr = (f"{'setting':54s} | {'weights':>15s} | {'optimizer':>15s} | {'transient est/trace':>21s} {'err':>6s}"
           f" | {'total est/trace':>17s} {'err':>6s}")
    print(hdr)
    print("-" * len(hdr))
    tot, tra = [], []
    for r in results:
        if "trace" not in r or not isinstance(r.get("trace"), dict):
            print(f"{r['setting']:54s} | failed: {r.get('error')}")
            continue
        t, e, err = r["trace"], r["estimate"], r["error"]
        g = lambda x: f"{x / GiB:6.2f}"  # noqa: E731
        print(f"{r['setting']:54s} | {g(e['weights'])}/{g(t['weights'])} | {g(e['optimizer'])}/{g(t['optimizer'])}"
              f" | {g(e['transient'])}/{g(t['transient'])}G    {err['transient']:+6.1%}"
              f" | {g(e['total'])}/{g(t['total'])}G {err['total']:+6.1%}", flush=True)
        tot.append(err["total"])
        tra.append(err["transient"])
    summary = {"settings": len(tot), "total_median": statistics.median(abs(x) for x in tot) if tot else None,
               "total_worst": max(tot, key=abs) if tot else None,
               "transient_median": statistics.median(abs(x) for x in tra) if tra else None,
               "transient_worst": max(tra, key=abs) if tra else None}
    if tot:
        print(f"{len(tot)} settings; total: median |error| {summary['total_median']:.1%}, worst "
              f"{summary['total_worst']:+.1%}; transient: median {summary['transient_median']:.1%}, worst "
              f"{summary['transient_worst']:+.1%}  (GiB, estimate/trace; error = (estimate - trace) / trace)")
    return summary



# ============================================================== facts, output and main
VERSIONED = ("torch", "transformers", "peft", "accelerate", "deepspeed", "llamafactory", "trl", "liger_kernel",
             "bitsandbytes")


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def summarize_facts(results: list[dict]) -> dict:
    """What the real path showed, in a few fields (the per-case records stay beside them)."""
    ok = [r for r in results if "census" in r]
    by = {(r["job"]["family"], r["job"]["method"], r["job"]["zero"]): r for r in ok}
    lora2, lora3 = by.get(("qwen2", "lora", 2)), by.get(("qwen2", "lora", 3))
    full2, full3 = by.get(("qwen2", "full", 2)), by.get(("qwen2", "full", 3))

    def step_per_param(r):  # the step's peak above the persistent states, per trainable parameter
        return round((r["peaks"]["step"] - r["baseline"]) / (r["census"]["weights"] / 2), 2) if r else None

    return {
        "optimizer_hf_builds": sorted({r["optimizer"]["hf_optim"] for r in ok}),
        "optimizer_chain": ok[0]["optimizer"]["chain"] if ok else None,
        "fused": sorted({str(r["optimizer"]["fused"]) for r in ok}),
        "autocast_active": sorted({r.get("autocast_cpu") for r in ok}),
        "adapter_dtype_zero2": lora2 and lora2["dtypes"].get("adapter/trainable"),
        "adapter_dtype_zero3": lora3 and lora3["dtypes"].get("adapter/trainable"),
        "adapter_input_dtype": {"zero2": lora2 and lora2.get("adapter_input_dtype"),
                                "zero3": lora3 and lora3.get("adapter_input_dtype")},
        "full_dtype": {"zero2": full2 and full2["dtypes"], "zero3": full3 and full3["dtypes"]},
        "persistent_bytes_per_trainable": full2 and round((full2["census"]["master"] + full2["census"]["adam"])
                                                          / (full2["census"]["weights"] / 2), 2),
        "step_bytes_per_trainable": {"zero2": step_per_param(full2), "zero3": step_per_param(full3)},
        "refused": {f"{r['job']['family']} {r['job']['method']} z{r['job']['zero']}": r["error"]
                    for r in results if "error" in r},
    }


def run_facts(root: Path, out: Path | None) -> list[dict]:
    """Every real-path case, each in its own process; the facts file when ``out`` is given."""
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for job in real_jobs(root):
        t0 = time.time()
        r = run_real_case(job)
        r["seconds"] = round(time.time() - t0)
        results.append(r)
        print(f"  real path: {job['family']} {job['method']} ZeRO-{job['zero']}: "
              f"{r.get('error') or 'traced'} ({r['seconds']} s)", flush=True)
    if out is not None:
        facts = {"versions": versions(), "summary": summarize_facts(results),
                 "cases": [{k: v for k, v in r.items() if k != "config"} for r in results]}
        out.write_text(json.dumps(facts, indent=1, default=str) + "\n")
        print(f"wrote {out}")
    return results


def print_real(rows: list[dict]) -> None:
    print(f"{'real path (LF + peft + HF Trainer + DeepSpeed, CPU)':36s} | {'weights':>17s} | {'optimizer':>17s} | "
          f"{'transient':>24s} | {'total':>24s}   (MiB, estimate/measured)")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:36s} | refused: {r['error'][:110]}")
            continue
        t, e, err = r["trace"], r["estimate"], r["errors"]
        cells = [f"{e[k] / MiB:7.2f}/{t[k] / MiB:7.2f}" + (f" {err[k]:+6.1%}" if k in ("transient", "total") else "")
                 for k in ("weights", "optimizer", "transient", "total")]
        print(f"{r['case']:36s} | " + " | ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="table", choices=("table", "quick", "facts", "all"))
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument("--python", help="interpreter with torch/transformers/peft for the trace worker")
    ap.add_argument("--traces", metavar="PATH", help="cache of the worker's results (re-estimate without re-tracing)")
    ap.add_argument("--root", default="/tmp/dsplan-real-path", help="where the real path's tiny models and runs go")
    ap.add_argument("--facts-out", default=str(FACTS_JSON), help="facts file the real path writes")
    args = ap.parse_args()
    out: dict = {"versions": versions()}
    print("versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items()))
    if args.what in ("facts", "all"):
        out["real"] = real_rows(run_facts(Path(args.root), Path(args.facts_out)))
        print_real(out["real"])
    if args.what in ("table", "quick", "all"):
        rows = QUICK if args.what == "quick" else SETTINGS
        out["table"] = table(rows, args.python, Path(args.traces) if args.traces else None)
        out["summary"] = print_table(out["table"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["real-case"]:
    print("REAL_RESULT " + json.dumps(real_case(json.loads(sys.argv[2]))), flush=True)
elif __name__ == "__main__":
    sys.exit(main())
