#!/usr/bin/env python3
"""dsplan's estimate beside the GPU memory a real LLaMA-Factory + DeepSpeed run used, case by case.

Each case is one real ``llamafactory-cli train`` of a real architecture (Qwen2.5-0.5B/1.5B/7B,
Llama-3-8B: the shapes in dsplan's catalog), with random weights drawn into a scratch model
folder (config.json, safetensors and a small locally trained tokenizer; no hub), on one GPU:

1. dsplan plans the case's tier at the case's micro-batch (``make_plan`` with the tier forced;
   the estimate is the one for exactly the tier, micro-batch and DeepSpeed block it renders)
   and renders its DeepSpeed JSON and LF YAML (``render_plan``);
2. the run is ``max_steps`` (3) optimizer steps with ``RECORD_VRAM=1``, in bf16, supervised by
   dsplan's own attempt runner (the classifier gives the verdict and kills at once on an OOM);
3. one JSON line per case is appended to ``--out`` (format ``dsplan-sample/1``, which
   ``dsplan calibrate`` reads): the estimate as ``dsplan run`` records it in its ledger
   (``gpu_bytes``, breakdowns, ``transient_bytes``, and what it assumed: the context and NCCL
   share, the rows' length), the measured peaks, the OOM figures of a failed case, the wall time.

What is measured.  ``measured.vram_allocated_bytes``/``vram_reserved_bytes`` are LLaMA-Factory's
own ``vram_allocated``/``vram_reserved`` from ``trainer_log.jsonl``: ``torch.cuda.max_memory_allocated()``
and ``max_memory_reserved()`` of rank 0, read after every optimizer step (LF 0.9.5
``train/callbacks.py`` ``on_log`` -> ``extras/misc.py`` ``get_peak_memory``; never reset, so the
last line is the peak of model load plus every step; GiB rounded to 0.01).  That is the same
source ``dsplan run`` records, so both feed one calibration.  ``host_peak_bytes`` is the summed
resident high-water mark (VmHWM) of the case's processes, as ``dsplan run`` records it.  A small
``sitecustomize`` put on the training processes' ``PYTHONPATH`` also writes, at the training
worker's exit, the exact ``max_memory_allocated``/``max_memory_reserved`` (model save included),
what ``cudaMemGetInfo`` said was in use (so the CUDA context, which PyTorch's counters leave out,
can be told apart) and the worker's own ``ru_maxrss``: those go under ``case.process``.
Any figure nobody reported is ``null``, never 0.  ``verdict`` is the ledger's verdict for the
end (``success``, ``gpu_oom``, ``host_oom``, ``not_oom``, ``stalled``, ``unknown``; ``case.evidence``
keeps the classifier's line); a case stopped by the time budget writes no line.

The table's error is the one ``dsplan report`` gives (:mod:`dsplan.learn.compare`): the
measured reserved peak against the estimate less the context and NCCL buffers, which
PyTorch's caching allocator never holds (the ``est-ctx`` column).

Cases are named ``MODEL-METHOD-TIER-gc|nogc-cCUTOFF-mbN``, e.g. ``qwen2.5-7b-lora-zero3-gc-c1024-mb1``.
Without ``--cases`` the default list runs (cheapest first); ``--cases`` takes comma-separated
globs over the whole matrix (models x lora/full x four tiers x gc on/off x cutoff 512-4096 x
micro-batch 1/4), or ``default``/``all``.  ``--list`` prints the selection with the expected time.
``--budget-s``: a case starts only if its expected wall time fits in what is left of the budget
(the estimate learns from the cases already run); one that runs past the budget by ``--overrun-s``
is stopped.

``--dry``: the same path on a machine without a GPU.  Each architecture is shrunk (2 layers,
head_dim 16 with the real head counts, MLP scaled alike, vocabulary 8192; ``case.dry_shape``
says so), planned for a pretend 16 GiB card at fp32, and trained in fp32 by DeepSpeed's CPU
accelerator (gloo, world size 1; fp16 needs AVX512-FP16 or AMX, and LF refuses bf16 without a
GPU).  ``vram_*`` are null and ``host_peak_bytes`` is filled; ``hardware`` is the pretend card
with ``gpu_name`` null (as ``dsplan run`` records a CPU run) and ``case.dry`` is true, so
``dsplan calibrate`` skips these lines as CPU runs.  The default dry list (a Qwen2 LoRA case and
a Llama full-tuning case) takes 2-5 minutes on 2 busy cores; DeepSpeed's shm op is JIT-compiled
once (~1 min) into ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``, where
``dsplan demo`` and the tests build it; the variable is passed through unchanged).

The estimates are dsplan's defaults (``make_plan`` without a site calibration): the figures a
calibration is fitted from.

Usage (repo root)::

    .venv/bin/python scripts/gpu_check.py --dry --out /tmp/gpu_check.jsonl
    .venv/bin/python scripts/gpu_check.py --list
    .venv/bin/python scripts/gpu_check.py --cases 'qwen2.5-0.5b-*-zero2-gc-c1024-mb1' --out x.jsonl

On a lent GPU machine
---------------------
The device tool runs a command in a copy of this repo, offline.  Its Python 3.12 has torch 2.11
(CUDA 13) with torchvision/torchaudio, accelerate, numpy, pandas, pyarrow, safetensors,
huggingface_hub 1.33 and a newer transformers; the rest travels as wheels in ``.whl`` (ignored by
git; 22 MB of the 64 MiB that travels).  The list is what the training process imported here
(``--record-imports``) less what that image has, at this venv's versions.  Here, once::

    echo /.whl/ >> .git/info/exclude
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
      llamafactory==0.9.5 transformers==5.6.0 tokenizers==0.22.2 peft==0.18.1 trl==0.24.0 accelerate==1.11.0 \
      datasets==4.0.0 dill==0.3.8 multiprocess==0.70.16 fsspec==2025.3.0 torchdata==0.11.0 hjson==3.1.0 \
      pydantic==2.12.3 pydantic-core==2.41.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
      omegaconf==2.4.0 pytz==2026.6
    .venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8

(DeepSpeed publishes only a source archive; the wheel built here is pure Python and JIT-builds
its ops.)  Then one call of the device tool with ``carry: [".whl"]`` and ``timeout_s: 600``::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH && PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out $OUT/gpu_check.jsonl 2>&1 | tee $OUT/gpu_check.log; tar czf $OUT/runs.tgz -C /tmp/dsplan-gpu-check runs

``/tmp/site/bin`` holds the carried ``llamafactory-cli``; LF's bare ``torchrun`` is the image's.
The default list is planned to fit the default 500 s budget (``--list`` shows dsplan's estimate and
the expected time of each case), leaving the rest of the 600 s call for the install and a case
that runs over; the JSONL, the printed table and each case's ``train.log`` come back under ``$OUT``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's dsplan, whatever a venv's install points at

from dsplan.learn.samples import FORMAT  # after the sys.path line
from dsplan.units import GiB

SOURCE = "gpu_check"

#: Case key -> dsplan catalog name.  Random weights, real shapes.
MODELS = {"qwen2.5-0.5b": "Qwen2.5-0.5B", "qwen2.5-1.5b": "Qwen2.5-1.5B", "qwen2.5-7b": "Qwen2.5-7B",
          "llama-3-8b": "Llama-3-8B"}
METHODS = ("lora", "full")
TIER_NAMES = ("zero2", "zero3", "zero2_offload", "zero3_offload")
CUTOFFS = (512, 1024, 2048, 4096)
MICRO_BATCHES = (1, 4)

#: The default GPU list: LoRA and full on 0.5B/1.5B/7B at 1k tokens, gradient checkpointing on and
#: off, both ZeRO stages, plus a short cutoff grid on the smallest model; run cheapest first.
DEFAULT_GPU = (
    "qwen2.5-0.5b-lora-zero2-gc-c1024-mb1",
    "qwen2.5-0.5b-lora-zero2-nogc-c1024-mb1",
    "qwen2.5-0.5b-lora-zero2-nogc-c4096-mb1",
    "qwen2.5-0.5b-full-zero2-gc-c1024-mb1",
    "qwen2.5-1.5b-lora-zero3-gc-c1024-mb4",
    "qwen2.5-1.5b-full-zero2-nogc-c1024-mb1",
    "qwen2.5-7b-lora-zero2-gc-c1024-mb1",
    "qwen2.5-7b-lora-zero3-nogc-c1024-mb1",
    "qwen2.5-7b-full-zero3-gc-c1024-mb1",
)
#: The default ``--dry`` list: two cases, a couple of minutes on 2 CPU cores.
DEFAULT_DRY = ("qwen2.5-0.5b-lora-zero2-gc-c512-mb1", "llama-3-8b-full-zero3-nogc-c512-mb1")

#: ``--dry``: every architecture shrunk to this (heads and KV heads kept, head_dim 16).
DRY_LAYERS, DRY_HEAD_DIM, DRY_VOCAB = 2, 16, 8192
#: The demo tokenizer's size (dsplan.demo.assets.make_tokenizer); the model's vocabulary stays the real one.
TOKENIZER_VOCAB = 2048
#: Samples in the long dataset: enough for max_steps x the largest micro-batch.
DATASET_SAMPLES = 16
#: Each sample is at least this many words (about one token each with the demo tokenizer), so every
#: sequence is cut to exactly cutoff_len.
SAMPLE_WORDS = 5000
STAMP = "gpu_check_model.json"
PEAKS_ENV = "DSPLAN_GPU_CHECK_PEAKS"
IMPORTS_ENV = "DSPLAN_GPU_CHECK_IMPORTS"


# ---------------------------------------------------------------- the case matrix
@dataclass(frozen=True)
class Case:
    model: str  # a MODELS key
    method: str
    tier: str
    gc: bool
    cutoff: int
    micro_batch: int

    @property
    def name(self) -> str:
        return (f"{self.model}-{self.method}-{self.tier}-{'gc' if self.gc else 'nogc'}"
                f"-c{self.cutoff}-mb{self.micro_batch}")


def matrix() -> list[Case]:
    return [Case(*combo) for combo in product(MODELS, METHODS, TIER_NAMES, (True, False), CUTOFFS, MICRO_BATCHES)]


def select(patterns: str | None, dry: bool) -> list[Case]:
    """The cases ``--cases`` names: comma-separated globs over the matrix, ``default`` or ``all``.
    The default list keeps its own order; any other selection runs in expected-cost order."""
    by_name = {c.name: c for c in matrix()}
    default = DEFAULT_DRY if dry else DEFAULT_GPU
    if not patterns or patterns.strip() == "default":
        return [by_name[n] for n in default]
    chosen: dict[str, Case] = {}
    for pat in (p.strip() for p in patterns.split(",")):
        if not pat:
            continue
        names = list(by_name) if pat == "all" else default if pat == "default" else fnmatch.filter(by_name, pat)
        if not names:
            raise SystemExit(f"gpu_check: --cases {pat!r} matches no case (see --list --cases all)")
        chosen.update((n, by_name[n]) for n in names)
    return sorted(chosen.values(), key=lambda c: expected_seconds(c, {}, set(), dry))


# ---------------------------------------------------------------- time budget
#: Expected wall time of one case before any has run: a fixed part (imports, torchrun, dataset,
#: DeepSpeed set-up, 3 steps) plus reading the checkpoint (and, for full fine-tuning, writing the
#: model back), per GB of 16-bit weights; a model not built yet adds its drawing and writing.
BASE_S = {"gpu": 30.0, "dry": 50.0}
PER_GB_S = 2.0
BUILD_S = {"gpu": 10.0, "dry": 15.0}
OFFLOAD_S = 30.0  # CPU Adam steps (its JIT build, once, is about a minute more)
#: The device tool gives one command 600 s: 500 s of cases, 45 s of overrun, the rest for the install.
DEFAULT_BUDGET_S = {"gpu": 500.0, "dry": 900.0}


def checkpoint_gb(case: Case) -> float:
    from dsplan.inputs.catalog import lookup
    from dsplan.inputs.model import spec_from_config

    name = MODELS[case.model]
    return 2 * spec_from_config(lookup(name)[1]["config"], name).total_params / 1e9


def expected_seconds(case: Case, observed: dict[str, float], built: set[str], dry: bool) -> float:
    """What ``case`` should take: the fixed part as observed so far (the smallest of the finished
    cases' wall times less their size and build terms), else the prior; plus this case's own terms."""
    base = min(observed.values(), default=BASE_S["dry" if dry else "gpu"])
    return base + size_term(case, dry) + build_term(case, built, dry)


def size_term(case: Case, dry: bool) -> float:
    gb = 0.0 if dry else checkpoint_gb(case)
    return PER_GB_S * gb * (2 if case.method == "full" else 1) + (OFFLOAD_S if "offload" in case.tier else 0)


def build_term(case: Case, built: set[str], dry: bool) -> float:
    """Drawing and writing the case's model, unless an earlier case (or invocation) built it."""
    if case.model in built:
        return 0.0
    return BUILD_S["dry" if dry else "gpu"] + PER_GB_S * (0.0 if dry else checkpoint_gb(case))


# ---------------------------------------------------------------- model and data
def model_config(case_model: str, dry: bool) -> dict:
    """The config.json fields of the case's architecture (the catalog's), shrunk for ``--dry``."""
    from dsplan.inputs.catalog import lookup

    cfg = dict(lookup(MODELS[case_model])[1]["config"])
    if dry:
        ratio = DRY_HEAD_DIM * cfg["num_attention_heads"] / cfg["hidden_size"]
        cfg.update(hidden_size=DRY_HEAD_DIM * cfg["num_attention_heads"], num_hidden_layers=DRY_LAYERS,
                   intermediate_size=max(16, round(cfg["intermediate_size"] * ratio / 16) * 16),
                   vocab_size=DRY_VOCAB)
        cfg.pop("head_dim", None)
    return cfg


def build_params(case_model: str, dry: bool) -> dict:
    return {"stamp_version": 1, "catalog": MODELS[case_model], "config": model_config(case_model, dry),
            "dtype": "float32" if dry else "bfloat16", "seed": 0, "tokenizer_vocab": TOKENIZER_VOCAB}


def ensure_model(workdir: Path, case_model: str, dry: bool) -> Path:
    """The model folder for ``case_model``, built (in a subprocess: no CUDA context in this one)
    unless a folder stamped with the same parameters is there."""
    params = build_params(case_model, dry)
    dest = workdir / "models" / (case_model + ("-dry" if dry else ""))
    if _stamp(dest) == params:
        return dest
    if dest.exists():
        if _stamp(dest) is None and any(dest.iterdir()):
            raise RuntimeError(f"{dest} exists and was not made by gpu_check; remove it")
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, __file__, "--build-model", json.dumps(params), str(dest)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"building {dest} failed: {r.stderr.strip()[-1500:]}")
    return dest


def _stamp(dest: Path) -> dict | None:
    try:
        return json.loads((dest / STAMP).read_text())
    except (OSError, ValueError):
        return None


def build_model(params: dict, dest: Path) -> None:
    """Draw the weights (normal(0, 0.02), norms 1, biases 0; on the GPU when there is one) and
    save config, safetensors, tokenizer and stamp into a temp folder renamed to ``dest``."""
    import torch

    from dsplan.demo.assets import PAD_TOKEN, _save_weights, make_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tokenizer = make_tokenizer(params["tokenizer_vocab"])
        config = hf_config(params, tokenizer.convert_tokens_to_ids(PAD_TOKEN), tokenizer.eos_token_id,
                           tokenizer.pad_token_id)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        state = draw_state(config, params["seed"], getattr(torch, params["dtype"]), device)
        _save_weights(state, tmp, 4000)  # shards of at most 4 GB, as published checkpoints are
        del state
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps(params, indent=2) + "\n")
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hf_config(params: dict, bos: int, eos: int, pad: int):
    import transformers

    cfg = params["config"]
    kind = cfg["model_type"]
    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[kind]
    kw = {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "vocab_size", "tie_word_embeddings")}
    if "head_dim" in cfg:
        kw["head_dim"] = cfg["head_dim"]
    if kind == "llama":
        kw["attention_bias"] = cfg.get("attention_bias", False)
    else:
        kw["use_sliding_window"] = False
    config = cls(**kw, max_position_embeddings=32768, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                 torch_dtype=params["dtype"])
    config.architectures = [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[kind]]
    return config


def draw_state(config, seed: int, dtype, device: str) -> dict:
    """A state dict for ``config``'s model, drawn tensor by tensor (the module is built on the meta
    device only for names and shapes); a tied ``lm_head`` is left to the embedding."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, meta in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith(".bias"):
            t = torch.zeros(meta.shape, dtype=dtype)
        elif "norm" in name.rsplit(".", 2)[-2]:
            t = torch.ones(meta.shape, dtype=dtype)
        else:
            t = torch.empty(meta.shape, device=device).normal_(0.0, 0.02, generator=gen).to(dtype).cpu()
        state[name] = t.contiguous()
    return state


def long_records(n: int, words: int = SAMPLE_WORDS) -> list[dict]:
    """Alpaca records whose answers run past every cutoff in the matrix (the demo's text, which
    the demo tokenizer was trained on, joined until ``words`` long)."""
    from dsplan.demo.assets import demo_sample

    out = []
    for i in range(n):
        parts, count, j = [], 0, i
        while count < words:
            text = demo_sample(j)["output"]
            parts.append(text)
            count += len(text.split())
            j += 1
        out.append({"instruction": "Copy these notes.", "input": "", "output": "\n".join(parts)})
    return out


def ensure_dataset(workdir: Path) -> tuple[Path, str]:
    from dsplan.fsutil import atomic_write

    name = "gpu_check_long"
    data_dir = workdir / "data"
    files = {data_dir / f"{name}.json": json.dumps(long_records(DATASET_SAMPLES), indent=1) + "\n",
             data_dir / "dataset_info.json": json.dumps({name: {
                 "file_name": f"{name}.json", "formatting": "alpaca",
                 "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}, indent=2) + "\n"}
    for path, text in files.items():
        if not path.is_file() or path.read_text() != text:
            atomic_write(path, text)
    return data_dir, name


# ---------------------------------------------------------------- plan and render
def case_yaml(case: Case, model_dir: Path, data_dir: Path, dataset: str, max_steps: int) -> dict:
    """The user's LF YAML for the case; dsplan's render adds the tier's memory knobs."""
    user = {
        "model_name_or_path": str(model_dir), "stage": "sft", "do_train": True,
        "finetuning_type": case.method, "dataset": dataset, "dataset_dir": str(data_dir),
        "template": "qwen",  # the demo tokenizer speaks the Qwen chat format, whatever the architecture
        "cutoff_len": case.cutoff, "per_device_train_batch_size": case.micro_batch,
        "gradient_accumulation_steps": 1, "max_steps": max_steps, "logging_steps": 1,
        "save_strategy": "no",  # no DeepSpeed checkpoint (optimizer states) at the end; LF still saves the model
        "learning_rate": 1.0e-5, "report_to": "none", "flash_attn": "sdpa", "plot_loss": False,
        "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "overwrite_output_dir": True,
        "overwrite_cache": True,
    }
    if case.method == "lora":
        user.update(lora_rank=8, lora_target="all", learning_rate=1.0e-4)
    if not case.gc:
        user["disable_gradient_checkpointing"] = True
    return user


def plan_case(case: Case, profile, spec, user: dict, precision: str, user_path: Path):
    """(plan, TierConfig, Estimate, user) for exactly this tier at this micro-batch.  The user's YAML
    is written to ``user_path`` and read back through dsplan's own reader (its key and value checks)."""
    import yaml

    from dsplan.inputs.settings import load_user_yaml, merge_settings
    from dsplan.plan.planner import estimate_at, make_plan

    user_path.parent.mkdir(parents=True, exist_ok=True)
    user_path.write_text(yaml.safe_dump(user, sort_keys=False))
    user = load_user_yaml(user_path)
    settings = merge_settings(user, model_name_or_path=user["model_name_or_path"], default_template="qwen",
                              precision_supported=precision)
    plan = make_plan(profile, spec, settings, tier=case.tier)
    tc = replace(plan.get(case.tier).tier_config(), micro_batch=case.micro_batch, grad_accum=1)
    return plan, tc, estimate_at(plan, case.tier, case.micro_batch), user


def render_case(plan, tc, user: dict, run_dir: Path) -> Path:
    from dsplan.emit.render import lf_filename, render_plan
    from dsplan.fsutil import write_new_files

    settings = replace(plan.settings, output_dir=str(run_dir / "output"))
    bundle = render_plan(plan, [tc], run_dir, user, settings=settings)
    write_new_files(bundle.files, overwrite=True)
    return run_dir / lf_filename(tc.tier)


def estimate_record(est, assumed: dict | None = None) -> dict:
    """The line's ``estimate``: the ledger's own field (``assumed``: ``plan_assumptions`` of its plan)."""
    from dsplan.launch.measure import estimate_fields

    return estimate_fields(est, assumed)


# ---------------------------------------------------------------- the training processes' hook
HOOK = '''"""Written by dsplan's scripts/gpu_check.py.  At exit, a torchrun worker (LOCAL_RANK set) writes its
peak memory to $DSPLAN_GPU_CHECK_PEAKS/<pid>.json.  A sitecustomize this one shadows still runs."""
import atexit
import os
import sys


def _dsplan_gpu_check_peaks():
    out = os.environ.get("DSPLAN_GPU_CHECK_PEAKS")
    if not out or os.environ.get("LOCAL_RANK") is None:
        return
    import json
    import resource
    rec = {"pid": os.getpid(), "rank": int(os.environ.get("RANK", "0")),
           "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            free, total = torch.cuda.mem_get_info()
            rec.update(max_allocated_bytes=torch.cuda.max_memory_allocated(),
                       max_reserved_bytes=torch.cuda.max_memory_reserved(),
                       reserved_at_exit_bytes=torch.cuda.memory_reserved(),
                       device_used_at_exit_bytes=total - free, device_total_bytes=total)
    except Exception as e:  # a broken CUDA state at exit: say so, keep the rest
        rec["cuda_error"] = repr(e)[:300]
    if os.environ.get("DSPLAN_GPU_CHECK_IMPORTS") == "1":
        from importlib.metadata import packages_distributions
        dists = packages_distributions()
        tops = {m.split(".")[0] for m in list(sys.modules)}
        rec["distributions"] = sorted({d for t in tops for d in dists.get(t, ())})
    path = os.path.join(out, "%d.json" % os.getpid())
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(path + ".tmp", path)


atexit.register(_dsplan_gpu_check_peaks)


def _dsplan_chain():
    import importlib.machinery
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


try:
    _dsplan_chain()
except Exception as e:
    sys.stderr.write("gpu_check sitecustomize: the shadowed sitecustomize failed: %r\\n" % (e,))
'''


def write_hook(workdir: Path) -> Path:
    from dsplan.fsutil import atomic_write

    hook_dir = workdir / "hook"
    path = hook_dir / "sitecustomize.py"
    if not path.is_file() or path.read_text() != HOOK:
        atomic_write(path, HOOK)
    return hook_dir


def read_peaks(peaks_dir: Path) -> dict | None:
    """Rank 0's exit record (world size 1: the one worker), or None."""
    recs = []
    for p in sorted(peaks_dir.glob("*.json")):
        try:
            recs.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    recs.sort(key=lambda r: r.get("rank", 0))
    return recs[0] if recs else None


# ---------------------------------------------------------------- one case
@dataclass
class Context:
    """What every case of one invocation shares."""

    workdir: Path
    out: Path
    dry: bool
    profile: object  # dsplan HardwareProfile the cases are planned for
    hardware: dict  # the JSONL's hardware block
    precision: str  # bf16 on the GPU, fp32 with --dry
    versions: dict
    lf_cli: str
    max_steps: int
    stall_timeout: float
    record_imports: bool
    keep_output: bool
    deadline: float  # time.monotonic() past which a running case is stopped


def child_env(ctx: Context, hook_dir: Path, peaks_dir: Path) -> dict[str, str]:
    from dsplan.demo.demo import cpu_env
    from dsplan.launch.node_env import node_env

    base = cpu_env(ctx.lf_cli) if ctx.dry else dict(os.environ, HF_HUB_OFFLINE="1")
    if not ctx.dry:
        base["PATH"] = str(Path(ctx.lf_cli).parent) + os.pathsep + base.get("PATH", "")
    base.update(HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RECORD_VRAM="1",
                **{PEAKS_ENV: str(peaks_dir), IMPORTS_ENV: "1" if ctx.record_imports else "0"})
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook_dir), base.get("PYTHONPATH")) if p)
    env, _ = node_env(ctx.profile, base)
    return env


def train(ctx: Context, yaml_path: Path, run_dir: Path, env: dict) -> tuple[object, float]:
    """Run ``llamafactory-cli train`` under dsplan's supervisor; (outcome, wall seconds).
    A timer sets the stop flag at the budget's hard line (verdict ``interrupted``)."""
    from dsplan.launch.attempt import run_attempt
    from dsplan.logs.classifier import Classifier

    stop = threading.Event()
    timer = threading.Timer(max(1.0, ctx.deadline - time.monotonic()), stop.set)
    timer.daemon = True
    timer.start()
    t0 = time.monotonic()
    try:
        outcome = run_attempt([ctx.lf_cli, "train", str(yaml_path)], env, run_dir, run_dir / "train.log",
                              run_dir / "output" / "trainer_log.jsonl", Classifier(),
                              stall_timeout=ctx.stall_timeout, echo=False, progress=False, stop_event=stop)
    finally:
        timer.cancel()
    return outcome, time.monotonic() - t0


def sample_verdict(dsplan_verdict: str) -> str:
    """The JSONL's verdict: the ledger's name for how the case ended (``unknown`` for anything else)."""
    from dsplan.codes import Verdict

    return dsplan_verdict if dsplan_verdict in {v.value for v in Verdict} else Verdict.UNKNOWN.value


def run_case(ctx: Context, case: Case) -> dict:
    """Plan, render, train and measure one case; returns its record (``line`` is None when the
    case wrote no JSONL line: stopped by the budget, or refused before training)."""
    from dsplan.errors import UserError
    from dsplan.inputs.model import load_model_spec
    from dsplan.launch.measure import plan_assumptions, vram_peaks
    from dsplan.logs.figures import oom_figures

    run_dir = ctx.workdir / "runs" / case.name
    shutil.rmtree(run_dir, ignore_errors=True)
    peaks_dir = run_dir / "peaks"
    peaks_dir.mkdir(parents=True)
    model_dir = ensure_model(ctx.workdir, case.model, ctx.dry)
    data_dir, dataset = ensure_dataset(ctx.workdir)
    user = case_yaml(case, model_dir, data_dir, dataset, ctx.max_steps)
    try:
        spec = load_model_spec(str(model_dir))
        plan, tc, est, user = plan_case(case, ctx.profile, spec, user, ctx.precision,
                                        run_dir / "user.yaml")
        yaml_path = render_case(plan, tc, user, run_dir)
    except UserError as e:
        return {"case": case, "line": None, "status": "refused", "evidence": str(e), "wall_s": 0.0}
    env = child_env(ctx, write_hook(ctx.workdir), peaks_dir)
    outcome, wall = train(ctx, yaml_path, run_dir, env)
    verdict = str(outcome.verdict)
    trainer_log = run_dir / "output" / "trainer_log.jsonl"
    measured = {**vram_peaks(trainer_log), "host_peak_bytes": outcome.host_peak_bytes}
    figures = oom_figures(outcome.finding.evidence or "") if verdict == "gpu_oom" else None  # null unless the GPU ran out
    tidy_output(run_dir / "output", ctx.keep_output)
    line = sample_line(ctx, case, est, measured, figures, verdict, outcome, wall, read_peaks(peaks_dir),
                       plan_assumptions(plan, case.micro_batch))
    if verdict == "interrupted":
        return {"case": case, "line": None, "status": "stopped (budget)", "evidence": "", "wall_s": wall,
                "record": line}
    append_line(ctx.out, line)
    return {"case": case, "line": line, "status": verdict, "evidence": outcome.finding.evidence or "",
            "wall_s": wall, "record": line}


def sample_line(ctx: Context, case: Case, est, measured: dict, figures, verdict: str, outcome, wall: float,
                peaks: dict | None, assumed: dict | None = None) -> dict:
    info = {"name": case.name, "model": MODELS[case.model], "method": case.method, "gc": case.gc,
            "precision": ctx.precision, "wall_s": round(wall, 1), "versions": ctx.versions,
            "max_steps": ctx.max_steps, "dsplan_verdict": verdict, "exit_code": outcome.exit_code,
            "evidence": (outcome.finding.evidence or "")[:500], "dry": ctx.dry,
            "process": {k: v for k, v in (peaks or {}).items() if k not in ("pid", "distributions")} or None}
    if ctx.dry:
        info["dry_shape"] = {k: v for k, v in model_config(case.model, True).items()
                             if k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads", "vocab_size")}
        info["planned_for"] = ctx.profile.spec
    return {"format": FORMAT, "source": SOURCE, "hardware": dict(ctx.hardware), "tier": case.tier,
            "micro_batch": case.micro_batch, "cutoff_len": case.cutoff, "verdict": sample_verdict(verdict),
            "estimate": estimate_record(est, assumed), "measured": measured, "oom_figures": figures, "case": info}


def tidy_output(output_dir: Path, keep: bool) -> None:
    """Remove the saved weights (a full 7B model is 15 GB); keep the logs and small files."""
    if keep or not output_dir.is_dir():
        return
    for p in output_dir.rglob("*"):
        if p.is_file() and (p.suffix in (".safetensors", ".bin", ".pt") or p.name.startswith("global_step")):
            p.unlink()


def append_line(path: Path, record: dict) -> None:
    """One whole line per write, appended (O_APPEND), then fsync: a reader never sees half a line."""
    data = (json.dumps(record, separators=(", ", ": ")) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:  # a regular file takes it in one write; the loop only guards a short one
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- hardware, versions
DIST_NAMES = ("torch", "deepspeed", "llamafactory", "transformers", "peft")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in DIST_NAMES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


_GPU_PROBE = ("import json, torch; ok = torch.cuda.is_available(); "
              "p = torch.cuda.get_device_properties(0) if ok else None; "
              "print(json.dumps({'count': torch.cuda.device_count() if ok else 0, "
              "'name': p.name if ok else None, 'total': p.total_memory if ok else None}))")


def gpu_info() -> dict:
    """Ask a child Python about GPU 0 (this process never makes a CUDA context: it would hold
    memory the training process then lacks)."""
    r = subprocess.run([sys.executable, "-c", _GPU_PROBE], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"gpu_check: could not ask torch about the GPU:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def hardware_block(profile, gpu_name: str | None) -> dict:
    """The JSONL's ``hardware``: the ledger's own field (the card the case ran on; for ``--dry``, the
    card it was planned for, as ``dsplan run`` records a CPU run), with the name torch reported."""
    from dsplan.launch.measure import hardware_fields

    return {**hardware_fields(profile), "gpu_name": gpu_name}


def make_hardware(dry: bool):
    """(the profile the cases are planned for, the JSONL's hardware block, the precision)."""
    import psutil

    from dsplan.inputs.hardware import HardwareProfile, find_gpu_model

    host = psutil.virtual_memory().total
    if dry:
        profile = HardwareProfile(nodes=1, gpus_per_node=1, gpu_mem=16 * GiB, backend="cuda", host_ram=host)
        return profile, hardware_block(profile, None), "fp32"
    g = gpu_info()
    if not g["count"]:
        raise SystemExit("gpu_check: torch sees no CUDA GPU here; use --dry on a machine without one")
    known = find_gpu_model(g["name"])
    profile = HardwareProfile(nodes=1, gpus_per_node=1, gpu_mem=int(g["total"]), backend="cuda", host_ram=host,
                              gpu_name=known.name if known else None)
    return profile, hardware_block(profile, known.name if known else g["name"]), profile.precision


# ---------------------------------------------------------------- the table
def _gib(x) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def reserved_estimate(line: dict | None) -> float | None:
    """The estimate a reserved peak is compared with: less the context and NCCL buffers, which PyTorch's
    caching allocator never holds (``dsplan report``'s rule, :mod:`dsplan.learn.compare`)."""
    from dsplan.learn.compare import RESERVED, recorded

    figures, _ = recorded((line or {}).get("estimate"), (line or {}).get("hardware"))
    return None if figures is None else figures.comparable(RESERVED)


def error_pct(line: dict | None) -> float | None:
    """(estimate - context - NCCL - measured reserved) / measured reserved, in percent; None without both."""
    if not line or line["verdict"] != "success":
        return None
    measured = line["measured"]["vram_reserved_bytes"]
    compared = reserved_estimate(line)
    return None if not measured or compared is None else 100.0 * (compared - measured) / measured


def context_bytes(line: dict | None) -> int | None:
    """What the GPU held beyond PyTorch's reserved memory at the worker's exit (CUDA context,
    cuBLAS/NCCL outside the caching allocator), from the exit hook's figures; None without them."""
    proc = (line or {}).get("case", {}).get("process") or {}
    used, reserved = proc.get("device_used_at_exit_bytes"), proc.get("reserved_at_exit_bytes")
    return None if used is None or reserved is None else used - reserved


def table(results: list[dict], dry: bool) -> list[str]:
    """The summary: per case the whole estimate, the part a reserved peak can show (est-ctx), the
    measured reserved and allocated peaks, the error of est-ctx against reserved, the memory outside
    PyTorch's allocator at exit (ctx), the host peak and the wall time."""
    head = (f"{'case':44} {'verdict':16} {'est GiB':>8} {'est-ctx':>8} {'resv GiB':>8} {'alloc GiB':>9} "
            f"{'err %':>7} {'ctx GiB':>7} {'host GiB':>8} {'wall s':>7}")
    lines = [head, "-" * len(head)]
    errors = []
    for r in results:
        line = r.get("record")
        est = line["estimate"]["gpu_bytes"] if line else None
        m = line["measured"] if line else {}
        reserved, allocated = m.get("vram_reserved_bytes"), m.get("vram_allocated_bytes")
        if line and line["oom_figures"] and reserved is None:
            reserved, allocated = line["oom_figures"].get("reserved"), line["oom_figures"].get("allocated")
        err = error_pct(r.get("line"))
        if err is not None:
            errors.append(err)
        lines.append(f"{r['case'].name:44} {r['status']:16} {_gib(est):>8} {_gib(reserved_estimate(line)):>8} "
                     f"{_gib(reserved):>8} {_gib(allocated):>9} "
                     f"{'-' if err is None else f'{err:+.1f}':>7} {_gib(context_bytes(line)):>7} "
                     f"{_gib(m.get('host_peak_bytes')):>8} "
                     f"{r['wall_s']:7.1f}")
    if errors:
        worst = max(errors, key=abs)
        lines.append(f"error of est-ctx vs measured reserved, {len(errors)} cases: median "
                     f"{statistics.median(errors):+.1f} %, worst {worst:+.1f} % (positive: dsplan estimated more)")
    else:
        lines.append("no GPU figure: " + ("a --dry run measures the host only" if dry else "no case measured one"))
    lines.append("(est-ctx: the estimate less the CUDA context and NCCL buffers it counts, which reserved never "
                 "holds; ctx: what the card held beyond reserved at exit; reserved/allocated of an OOM case are the "
                 "figures its OOM message stated)")
    return lines


# ---------------------------------------------------------------- --list
#: ``--list`` plans for the lent H200 (143771 MiB, as nvidia-smi showed it there); --dry for its pretend card.
LIST_GPU_MEM = 143771 * 2**20


def list_cases(cases: list[Case], dry: bool, budget: float) -> list[str]:
    """Each selected case with dsplan's estimate and its expected wall time (model builds counted
    once, in order), without training anything."""
    from dsplan.errors import UserError
    from dsplan.inputs.hardware import HardwareProfile
    from dsplan.inputs.model import spec_from_config

    profile = HardwareProfile(nodes=1, gpus_per_node=1, gpu_mem=16 * GiB if dry else LIST_GPU_MEM,
                              backend="cuda", gpu_name=None if dry else "H200")
    precision = "fp32" if dry else profile.precision
    card = "1x16G pretend card, fp32, shrunk models" if dry else profile.describe()
    lines = [f"{'case':44} {'est GiB':>8} {'expected s':>10} {'cumulative':>10}   (planned for {card})"]
    built: set[str] = set()
    total = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for c in cases:
            need = expected_seconds(c, {}, built, dry)
            built.add(c.model)
            total += need
            spec = spec_from_config(model_config(c.model, dry), MODELS[c.model])
            user = case_yaml(c, Path(MODELS[c.model]), Path(tmp), "gpu_check_long", 3)
            try:
                est = plan_case(c, profile, spec, user, precision, Path(tmp) / "user.yaml")[2]
                shown = f"{est.gpu_bytes / GiB:8.1f}"
            except UserError:
                shown = f"{'refused':>8}"
            over = "  past the budget" if total > budget else ""
            lines.append(f"{c.name:44} {shown} {need:10.0f} {total:10.0f}{over}")
    return lines


# ---------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="run on the CPU: shrunk models, fp32, no GPU figures")
    ap.add_argument("--cases", help="comma-separated globs over case names, or default / all")
    ap.add_argument("--budget-s", type=float, help="start no case expected to end past this many seconds "
                    f"(default {DEFAULT_BUDGET_S['gpu']:.0f}; {DEFAULT_BUDGET_S['dry']:.0f} with --dry)")
    ap.add_argument("--overrun-s", type=float, default=45.0, help="stop a case this long past the budget")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.jsonl"), help="JSONL to append to")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dsplan-gpu-check",
                    help="models, data and each case's run folder (kept between invocations)")
    ap.add_argument("--lf-cli", help="llamafactory-cli to run (default: on PATH, else beside this Python)")
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--stall-timeout", type=float, default=300.0, help="stop a case silent this long")
    ap.add_argument("--keep-output", action="store_true", help="keep the saved weights of each case")
    ap.add_argument("--record-imports", action="store_true",
                    help="the training process also lists the distributions it imported "
                    "(in WORKDIR/runs/CASE/peaks/PID.json)")
    ap.add_argument("--list", action="store_true", help="print the selected cases and their expected time")
    ap.add_argument("--build-model", nargs=2, metavar=("PARAMS", "DEST"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def run_all(ctx: Context, cases: list[Case], budget: float, t0: float, say=print, clock=time.monotonic,
            runner=None) -> list[dict]:
    """Run ``cases`` in order; a case starts only if its expected time fits in what is left of the
    budget (measured from ``t0`` on ``clock``).  ``runner`` runs one case (default :func:`run_case`)."""
    runner = runner or run_case
    observed: dict[str, float] = {}
    built = {c.model for c in cases if _stamp(ctx.workdir / "models" / (c.model + ("-dry" if ctx.dry else "")))
             == build_params(c.model, ctx.dry)}
    results = []
    for i, case in enumerate(cases, 1):
        left = budget - (clock() - t0)
        need = expected_seconds(case, observed, built, ctx.dry)
        if need > left:
            say(f"[{i}/{len(cases)}] {case.name}: skipped, expected {need:.0f} s > {max(left, 0):.0f} s left")
            results.append({"case": case, "line": None, "status": "skipped (budget)", "evidence": "",
                            "wall_s": 0.0})
            continue
        say(f"[{i}/{len(cases)}] {case.name}: running (expected {need:.0f} s, {left:.0f} s left)")
        start = clock()
        own = size_term(case, ctx.dry) + build_term(case, built, ctx.dry)
        try:
            r = runner(ctx, case)
        except Exception as e:  # noqa: BLE001 -- one broken case (a failed build, a full disk) ends only itself
            r = {"case": case, "line": None, "status": "error", "evidence": f"{type(e).__name__}: {e}",
                 "wall_s": clock() - start}
        built.add(case.model)
        if r["status"] == "success":
            observed[case.name] = max(1.0, clock() - start - own)
        say(f"[{i}/{len(cases)}] {case.name}: {r['status']} in {clock() - start:.0f} s"
            + (f" ({r['evidence'][:160]})" if r["status"] != "success" and r["evidence"] else ""))
        results.append(r)
    return results


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.build_model:
        build_model(json.loads(a.build_model[0]), Path(a.build_model[1]))
        return 0
    cases = select(a.cases, a.dry)
    budget = a.budget_s if a.budget_s is not None else DEFAULT_BUDGET_S["dry" if a.dry else "gpu"]
    if a.list:
        print("\n".join(list_cases(cases, a.dry, budget)))
        return 0
    t0 = time.monotonic()
    from dsplan.launch.loop import resolve_lf_cli

    profile, hardware, precision = make_hardware(a.dry)
    workdir = a.workdir.resolve()
    ctx = Context(workdir=workdir, out=a.out.resolve(), dry=a.dry, profile=profile, hardware=hardware,
                  precision=precision,
                  versions=versions(), lf_cli=resolve_lf_cli(a.lf_cli), max_steps=a.max_steps,
                  stall_timeout=a.stall_timeout, record_imports=a.record_imports, keep_output=a.keep_output,
                  deadline=t0 + budget + a.overrun_s)
    where = "dry run on the CPU, planned for a 16 GiB card" if a.dry else (
        f"{hardware['gpu_name']} ({_gib(hardware['gpu_mem_bytes'])} GiB)")
    print(f"gpu_check: {len(cases)} case(s), budget {budget:.0f} s, {where}, {precision}; out {ctx.out}; "
          f"workdir {workdir}")
    results = run_all(ctx, cases, budget, t0)
    print()
    print("\n".join(table(results, a.dry)))
    print(f"gpu_check: {sum(1 for r in results if r['line'])} line(s) appended to {ctx.out} "
          f"in {time.monotonic() - t0:.0f} s")
    return 0 if any(r["line"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
