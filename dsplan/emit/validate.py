"""``dsplan validate``: prove rendered files valid with DeepSpeed's and LLaMA-Factory's own checks.

dsplan's own checks (parse, types and enums LF does not check, the ``deepspeed:``
file exists) run here.  The real validators run in a subprocess (see
:mod:`dsplan.emit.validate_worker`) under the Python that has deepspeed and
llamafactory; when they are not installed, dsplan says so plainly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dsplan.errors import UserError, excerpt, shorten
from dsplan.emit.render import MANIFEST
from dsplan.inputs.reading import path_kind, read_json, read_yaml
from dsplan.schema.lf import check_values


@dataclass
class Result:
    path: str
    kind: str  # "deepspeed" | "lf"
    ok: bool | None  # None = skipped
    detail: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe_python(python: str) -> dict[str, bool]:
    """Which of deepspeed/llamafactory the given interpreter can import (without importing them)."""
    modules = ("deepspeed", "llamafactory", "torch")
    if os.path.abspath(python) == os.path.abspath(sys.executable):  # not realpath: a venv links its base
        import importlib.util

        return {m: importlib.util.find_spec(m) is not None for m in modules}
    code = ("import importlib.util as u, json; "
            "print(json.dumps({m: u.find_spec(m) is not None for m in ('deepspeed', 'llamafactory', 'torch')}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"deepspeed": False, "llamafactory": False, "torch": False}


def _read_manifest(folder: Path) -> dict | None:
    """The folder's dsplan.json, checked to be one this version can read; None when absent."""
    path = folder / MANIFEST
    if path_kind(path) != "file":
        return None
    manifest = read_json(path, f"{shorten(str(path), 120)}: unreadable manifest")
    tiers = manifest.get("tiers") if isinstance(manifest, dict) else None
    ok = (isinstance(tiers, list) and all(isinstance(manifest.get(k), dict) for k in ("hardware", "model", "settings"))
          and all(isinstance(e, dict) and all(k in e for k in _ENTRY_KEYS) for e in tiers))
    if not ok:
        raise UserError(f"{shorten(str(path), 120)}: not a dsplan manifest (render it again)")
    return manifest


_ENTRY_KEYS = ("deepspeed", "lf_yaml", "micro_batch", "grad_accum")


def collect_jobs(target: Path, world_size: int | None, hidden_size: int | None) -> list[dict]:
    """Jobs for a rendered folder (from its manifest) or a single file."""
    kind_of_target = path_kind(target)
    if kind_of_target is None:
        raise UserError(f"{excerpt(str(target))} does not exist")
    folder = target if kind_of_target == "dir" else target.parent
    manifest = _read_manifest(folder)
    jobs = []
    if manifest:
        hw, model, settings = manifest["hardware"], manifest["model"], manifest["settings"]
        for entry in manifest["tiers"]:
            common = dict(world_size=world_size or hw.get("world_size"), micro_batch=entry["micro_batch"],
                          grad_accum=entry["grad_accum"], precision=settings.get("precision"),
                          hidden_size=hidden_size or model.get("hidden_size"))
            for kind, name in (("deepspeed", entry["deepspeed"]), ("lf", entry["lf_yaml"])):
                path = folder / str(name)
                if kind_of_target == "dir" or path.resolve() == target.resolve():
                    jobs.append({"kind": kind, "path": str(path.resolve()), **common})
        if jobs:
            return jobs
    if kind_of_target == "dir":
        raise UserError(f"{excerpt(str(target))} has no {MANIFEST}: validate single files, or a folder dsplan "
                        "rendered")
    kind = "deepspeed" if target.suffix == ".json" else "lf"
    return [{"kind": kind, "path": str(target.resolve()), "world_size": world_size or 1, "micro_batch": 1,
             "grad_accum": 1, "precision": "bf16", "hidden_size": hidden_size or 4096}]


def local_checks(job: dict) -> str | None:
    """dsplan's own checks; returns an error text or None."""
    path = Path(job["path"])
    try:
        if job["kind"] == "deepspeed":
            cfg = read_json(path, path.name)
            if not isinstance(cfg, dict) or not isinstance(cfg.get("zero_optimization"), dict):
                return "no zero_optimization block"
            return None
        data = read_yaml(path, path.name)
        if not isinstance(data, dict):
            return "expected a mapping of LLaMA-Factory arguments"
        check_values(data, where=path.name)
    except UserError as e:
        return str(e)
    ds = data.get("deepspeed")
    if ds and path_kind(str(ds)) != "file" and path_kind(path.parent / str(ds)) != "file":
        return f"deepspeed: {excerpt(ds)} does not exist"
    return None


def run_validation(targets: list[Path], python: str | None = None, world_size: int | None = None,
                   hidden_size: int | None = None) -> tuple[list[Result], list[str]]:
    """Validate folders/files in one worker process (LLaMA-Factory's import alone takes
    seconds); returns per-file results and notes about what could not be checked."""
    jobs = [job for target in targets for job in collect_jobs(target, world_size, hidden_size)]
    results: dict[str, Result] = {}
    remote = []
    for job in jobs:
        err = local_checks(job)
        if err:
            results[job["path"]] = Result(job["path"], job["kind"], False, err)
        else:
            remote.append(job)
    notes: list[str] = []
    python = python or os.environ.get("DSPLAN_TRAIN_PYTHON") or sys.executable
    have = probe_python(python)
    runnable = []
    for job in remote:
        need = "deepspeed" if job["kind"] == "deepspeed" else "llamafactory"
        if have.get(need):
            runnable.append(job)
        else:
            results[job["path"]] = Result(job["path"], job["kind"], None, f"{need} not installed; only dsplan's checks ran")
    for need in ("deepspeed", "llamafactory"):
        if not have.get(need) and any((j["kind"] == "deepspeed") == (need == "deepspeed") for j in remote):
            notes.append(f"{need} is not installed for {python}: its own validator was not run "
                         f"(pip install 'dsplan[train]', or point --python at an environment that has it)")
    if runnable:
        for r in _run_worker(python, runnable):
            results[r.path] = r
    order = [j["path"] for j in jobs]
    return [results[p] for p in order], notes


def _run_worker(python: str, jobs: list[dict]) -> list[Result]:
    worker = Path(__file__).with_name("validate_worker.py")
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), PYTHONUNBUFFERED="1")
    proc = subprocess.run([python, str(worker)], input=json.dumps(jobs), capture_output=True, text=True,
                          env=env, timeout=1800)
    out = []
    for line in proc.stdout.splitlines():
        if line.startswith("DSPLAN-RESULT "):
            d = json.loads(line[len("DSPLAN-RESULT "):])
            out.append(Result(d["path"], d["kind"], d["ok"], d["detail"]))
    seen = {r.path for r in out}
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    for job in jobs:
        if job["path"] not in seen:
            out.append(Result(job["path"], job["kind"], False, f"validator process died (exit {proc.returncode}): {tail}"))
    return out
