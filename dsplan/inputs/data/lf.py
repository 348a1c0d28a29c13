"""Exact lengths from LF's own data pipeline, run in :mod:`dsplan.inputs.data.worker`.

One job: hand the specs' LF arguments to the worker under the Python that has
llamafactory (one process for all specs: importing LF takes seconds), read its answers
back, cache them per cutoff, and turn them into :class:`~dsplan.inputs.data.result.DataProfile`
objects, rows mapped to the dataset files where this Python can read them too.  Any
failure is a note and ``None``: the caller falls back to its estimate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dsplan.errors import one_line, shorten
from dsplan.inputs.data.cache import CACHE_VERSION, cache_write, files_key, key_digest, stat_files
from dsplan.inputs.data.formats import convert, valid
from dsplan.inputs.data.result import METHODS, DataProfile
from dsplan.inputs.data.sources import Source, read_source
from dsplan.inputs.data.spec import DataSpec

#: Marks the worker's answer lines on its stdout (LF's own output goes there too).
_WORKER_TAG = "DSPLAN-LENGTHS "


def lf_available(python: str) -> bool:
    """Whether ``python`` can import llamafactory (asked without importing it)."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        import importlib.util

        return importlib.util.find_spec("llamafactory") is not None
    code = "import importlib.util as u; print(u.find_spec('llamafactory') is not None)"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip().endswith("True")


# ---------------------------------------------------------------- keys and answers
def _lf_args(spec: DataSpec) -> dict:
    """The LF arguments the worker hands to get_train_args: the user's data options, no packing
    (per-sample lengths are wanted; the cutoff is lowered as packing would lower it)."""
    args = {"model_name_or_path": spec.model_name_or_path, "dataset": ",".join(spec.names),
            "dataset_dir": spec.dataset_dir, "cutoff_len": spec.sample_cutoff, "stage": spec.stage,
            "do_train": True, "finetuning_type": "lora", "packing": False, "neat_packing": False,
            "overwrite_cache": True, "report_to": "none", "enable_thinking": spec.enable_thinking,
            "preserve_thinking": spec.preserve_thinking, "mask_history": spec.mask_history}
    for key in ("template", "max_samples", "tool_format", "default_system"):
        if getattr(spec, key) is not None:
            args[key] = getattr(spec, key)
    return args


def lf_key(spec: DataSpec, sources: list[Source], python: str) -> dict:
    """The cache key of LF's lengths: the interpreter, the data files, the tokenizer files, LF's arguments."""
    model = spec.model_name_or_path
    model_files = stat_files(Path(model), ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                           "vocab.json", "merges.txt")) if model and Path(model).is_dir() else model
    return {"v": CACHE_VERSION, "what": "lf", "python": os.path.abspath(python), "files": files_key(sources),
            "model": model_files, "args": _lf_args(spec)}


def measure_lf(spec, sources, python, fresh, hits, notes, t0) -> DataProfile | None:
    """LF's lengths (from the cache, or from this call's worker run), or None with a note."""
    digest = key_digest(lf_key(spec, sources, python))
    cached = digest in hits
    data, note = (hits[digest], "") if cached else fresh.get(digest, (None, ""))
    if data is None:
        notes.append(note or "LLaMA-Factory's data pipeline did not answer: lengths estimated instead")
        return None
    lengths, rejected, local = data["lengths"], data.get("rejected"), data["local"]
    sources_map = (tuple((n, r, tuple(d)) for n, r, d in local)
                   if local and sum(r - len(d) for _, r, d in local) == len(lengths) else None)
    rows_read = sum(r for _, r, _ in local) if local else None
    rows = [max(c, r) for c, r in zip(lengths, rejected)] if rejected is not None else lengths
    return DataProfile(spec=spec, method="lf", method_note=METHODS["lf"][1].format(python=python),
                       lengths=tuple(lengths), rejected=tuple(rejected) if rejected is not None else None,
                       truncated=sum(n >= spec.sample_cutoff for n in rows),
                       dropped=rows_read - len(lengths) if rows_read is not None else None, rows_read=rows_read,
                       notes=tuple(notes + data.get("notes", [])), cached=cached,
                       seconds=time.monotonic() - t0, sources=sources_map)


def _local_rows(spec: DataSpec, sources: list[Source]):
    """(name, rows, dropped rows) per dataset, read here; None when this Python cannot read them."""
    out = []
    for src in sources:
        try:
            rows = read_source(src, spec.max_samples)
        except (OSError, ValueError, UnicodeDecodeError, ImportError):
            return None
        out.append([src.name, len(rows), [i for i, row in enumerate(rows)
                                           if not valid(convert(row, src), spec.stage)]])
    return out


# ---------------------------------------------------------------- running the worker
def run_lf(python: str, todo: list[tuple[DataSpec, list[Source]]], hits: dict, cache: Path | None,
           timeout: float) -> dict[str, tuple[dict | None, str]]:
    """Run LF's pipeline once for every spec not in ``hits``; {key digest: (data, note)}.
    Answers are written to the cache."""
    jobs, keys = [], []
    for spec, sources in todo:
        key = lf_key(spec, sources, python)
        if key_digest(key) not in hits and key_digest(key) not in {key_digest(k) for k, _, _ in keys}:
            keys.append((key, spec, sources))
            jobs.append({"args": _lf_args(spec), "pairwise": spec.pairwise})
    if not jobs:
        return {}
    private = all(s.load_from == "file" for _, _, sources in keys for s in sources)
    answers, note = _run_worker(python, {"private_cache": private, "jobs": jobs}, timeout)
    out: dict[str, tuple[dict | None, str]] = {}
    for i, (key, spec, sources) in enumerate(keys):
        result = answers.get(i)
        if result is None:
            out[key_digest(key)] = (None, note)
        elif not result.get("ok"):
            out[key_digest(key)] = (None, one_line(f"LLaMA-Factory's data pipeline failed ({result.get('error')}): "
                                                   "lengths estimated instead"))
        else:
            data = {"lengths": result["lengths"], "rejected": result.get("rejected"),
                    "notes": result.get("notes", []), "local": _local_rows(spec, sources)}
            cache_write(cache, key, data)
            out[key_digest(key)] = (data, "")
    return out


def _run_worker(python: str, request: dict, timeout: float) -> tuple[dict[int, dict], str]:
    """The worker's answers by job index, and a note for the jobs it did not answer."""
    worker = Path(__file__).with_name("worker.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    try:
        proc = subprocess.run([python, str(worker)], input=json.dumps(request), capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {}, f"LLaMA-Factory's data pipeline took over {timeout:.0f} s: lengths estimated instead"
    except OSError as e:
        return {}, f"cannot start {python} ({e.strerror or e}): lengths estimated instead"
    answers = {}
    for line in proc.stdout.splitlines():
        if line.startswith(_WORKER_TAG):
            try:
                result = json.loads(line[len(_WORKER_TAG):])
                answers[int(result["index"])] = result
            except (ValueError, KeyError, TypeError):
                continue
    tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
    return answers, one_line(f"LLaMA-Factory's data pipeline died (exit {proc.returncode}: {shorten(tail, 300)}): "
                             "lengths estimated instead")
