#!/usr/bin/env python3
"""Real LLaMA-Factory + DeepSpeed training of dsplan's tiny demo model on this (CPU) machine.

Reproduces the facts the end-to-end tests and ``dsplan demo`` are built on:

* ``matrix``: for each tier x nproc, render with ``dsplan render``, patch the YAML for a
  CPU run (see CPU_KEYS), run ``FORCE_TORCHRUN=1 NPROC_PER_NODE=n llamafactory-cli train``
  and print wall time, exit code, steps in ``trainer_log.jsonl`` and peak memory.
* ``oom``: run big and small configurations under one address-space cap
  (``prlimit --as=BYTES``, inherited by torchrun's children) and, with ``--cgroup-mem``,
  under a memory cgroup whose OOM killer SIGKILLs; print which die, with the error
  lines and exit code.  Any cap under ~5 GiB kills llamafactory-cli while importing
  (MemoryError), before training.
* ``run``: one tier at one micro-batch, optionally under ``--cap`` (RLIMIT_AS) or
  ``--data-cap`` (RLIMIT_DATA), with a model of ``--shape``; prints each rank's VmHWM and
  VmPeak (the kernel's high-water marks) and its sampled maxima of VmData and RssAnon.
* ``tiers``: ZeRO-2 against ZeRO-3 at 2 ranks on a wide model whose frozen weights
  dominate (WIDE_SHAPE, TIERS_LF, TIERS_ZERO3_DS), uncapped; prints the largest rank's
  peak per tier in each of those four figures, the gap and a cap halfway between.

Usage (from the repo root, with the venv that has llamafactory/deepspeed)::

    .venv/bin/python scripts/probe_tiny_training.py matrix --tiers zero2,zero3 --nprocs 1,2
    .venv/bin/python scripts/probe_tiny_training.py oom --cap 8G --cgroup-mem 2G
    .venv/bin/python scripts/probe_tiny_training.py run --tier zero3 --nproc 1 --micro-batch 16 --cap 8G
    .venv/bin/python scripts/probe_tiny_training.py run --tier zero2 --set use_cpu=true --set bf16=true
    .venv/bin/python scripts/probe_tiny_training.py run --tier zero2 --nproc 1 --micro-batch 64
    .venv/bin/python scripts/probe_tiny_training.py tiers --root /tmp/dsplan-tiers

Everything is written under ``--root`` (default /tmp/dsplan-probe); each run's full log is
kept there as ``<name>.log``.  Timings are noisy on a shared 2-core machine.

Recorded on the 2-core / 24 GiB CPU machine (LF 0.9.5, DeepSpeed 0.19.8, torch 2.9.1+cu128,
transformers 5.6.0), 3 steps, micro-batch 1, grad-accum 1, cutoff 256, fp32, JIT ops cached:

    tier           nproc=1  nproc=2      (wall seconds of llamafactory-cli, all rc 0, 3 steps logged)
    zero2            20.8     19.5
    zero2_offload    19.6     22.1
    zero3            18.5     20.5
    zero3_offload    21.1     22.2

First use of DeepSpeed's JIT ops adds ~75 s each (deepspeed_shm_comm on every CPU run,
cpu_adam on the first offload run), built into ~/.cache/torch_extensions/py311_cu128/.

Under ``--cap 8G`` (one process, cutoff 256):
    zero2 / zero3, micro-batch 64                  -> rc 1, "DefaultCPUAllocator: can't allocate
                                                      memory: you tried to allocate 536870912 bytes"
    zero2, micro-batch 1, reduce_bucket_size 5e8   -> rc 1, "... you tried to allocate 2000000000 bytes"
    zero3 / zero3_offload, micro-batch 1           -> rc 0
Under ``--cgroup-mem 2G``: zero2 micro-batch 64 -> rc 1, torchrun "exitcode: -9" and
"Signal 9 (SIGKILL) received by PID"; zero3 micro-batch 1 -> rc 0 (cgroup peak 1.4 GiB).

The demo's cap (``run --tier zero2 --nproc 1 --micro-batch N``, fp32, cutoff 256; recorded
on a 2-core AMD EPYC without AVX-512, so without oneDNN fp16): VmPeak of the training rank
7.11 GiB at micro-batch 1, 7.44 at 16, 7.98 at 32, 9.16 at 64; llamafactory-cli 4.96,
torchrun 4.53.  dsplan.demo.demo.DEMO_CAP_BYTES (8.5 GiB) sits between 32 and 64.

``tiers`` (recorded there too, twice: 2 steps under a load average of 5, then 3 steps;
the four figures of the largest rank, GiB):

    figure                               zero2        zero3        gap
    VmData (sampled; RLIMIT_DATA)        4.45 / 4.46  3.49 / 3.57  0.96 / 0.89
    VmPeak (kernel mark; RLIMIT_AS)      9.19 / 9.20  8.18 / 8.20  1.01 / 1.00
    RssAnon (sampled)                    2.84 / 2.86  1.68 / 1.73  1.16 / 1.13
    VmHWM (kernel mark)                  3.24 / 3.26  2.19 / 2.14  1.05 / 1.12
    wall seconds of llamafactory-cli     76 / 55      122 / 76

What shapes these: a float32 checkpoint is mapped private and writable (``rw-p``) by
safetensors, so RLIMIT_DATA counts it whole, and transformers' ZeRO-3 loader maps every
shard at once beside the rank's new partition: with a float32 checkpoint the ZeRO-3 load
(4.17 GiB VmData) came within 0.3 GiB of ZeRO-2's peak.  Stored in bf16 and loaded as
fp32, each ZeRO-2 rank holds its own fp32 copy while ZeRO-3 holds half.  With gradient
checkpointing on, ZeRO-3 keeps gathered layers until the step ends (RssAnon 2.4 GiB, no
better than ZeRO-2); dsplan's rendered stage3_max_live_parameters / max_reuse_distance of
1e9 keep every gathered weight of a model this size live.  ZeRO-2's VmData peak comes in
the training steps and at the checkpoint save (DeepSpeed clones the module state), not
at load (3.6 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsplan.demo.assets import make_demo_assets  # after the sys.path line

BIN = Path(sys.executable).parent

#: Keys added to dsplan's rendered YAML for a run on a CPU-only machine.
CPU_KEYS = {
    # fp32 on the CPU.  bf16: true alone fails in TrainingArguments ("Your setup doesn't support
    # bf16/gpu. You need to assign use_cpu if you want to train the model on CPU."); bf16 with
    # use_cpu: true trains at nproc 1, but with nproc 2 every ZeRO-3 tier dies in zero.Init
    # ("train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size
    # 2 != 1 * 1 * 1"): use_cpu makes HF skip deepspeed.init_distributed, so DeepSpeed sees world 1.
    "bf16": False,
    "fp16": False,
    "cutoff_len": 256,             # demo samples are 150-350 tokens: every sequence is cut to 256
    "max_steps": 3,
    "logging_steps": 1,            # one trainer_log.jsonl line per optimizer step
    "save_steps": 100000,          # no intermediate checkpoint (the final save still happens)
    "gradient_accumulation_steps": 1,
    "dataloader_num_workers": 0,
    "preprocessing_num_workers": 1,
    "overwrite_cache": True,
    "overwrite_output_dir": True,
    "plot_loss": False,
}

#: Error lines worth showing from a failed run (first match per pattern is printed).
ERROR_PATTERNS = (
    r"can't allocate memory", r"bad_alloc", r"MemoryError", r"Cannot allocate memory", r"OutOfMemory",
    r"out of memory", r"Killed", r"SIGKILL", r"Signal \d+", r"exitcode\s*:", r"Error:", r"returned non-zero",
    r"Resource temporarily unavailable",
)


def _bytes(text: str) -> int:
    """``4.5G`` / ``4500M`` / ``4831838208`` -> bytes (binary units)."""
    m = re.fullmatch(r"([\d.]+)\s*([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise SystemExit(f"bad size {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def torch_extension_locks() -> list[Path]:
    """``lock`` files in torch's JIT-extension cache (DeepSpeed's shm_comm and cpu_adam ops).

    torch's FileBaton makes every process that loads the op wait, forever, while
    ``<ext>/lock`` exists; a run killed while it held the lock (even one only loading
    an op that was already built) leaves it behind and every later run hangs at
    ``No CUDA runtime is found, using CUDA_HOME=...``.  Removing a lock no live
    build holds is the cure.
    """
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return sorted(root.glob("*/*/lock")) if root.is_dir() else []


def env_for(nproc: int) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        FORCE_TORCHRUN="1",            # LF only uses torchrun (and so DeepSpeed) with >1 device or this
        NPROC_PER_NODE=str(nproc),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # LF's launcher runs a bare `torchrun`
        TOKENIZERS_PARALLELISM="false",
        DISABLE_VERSION_CHECK="1",
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


class MemPoller(threading.Thread):
    """Polls /proc for the process tree under ``pid``: max VmPeak (address space) and
    max VmHWM (peak RSS) over all processes, and their sum of RSS at the worst moment."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.max_vm = 0
        self.max_hwm = 0
        self.max_total_rss = 0
        self.per_process: dict[int, tuple[str, int, int]] = {}  # pid -> (role, VmPeak, VmHWM) bytes
        #: pid -> (max VmData, max RssAnon) bytes, as sampled: VmData is what RLIMIT_DATA limits,
        #: and the kernel keeps no high-water mark of it, so a peak shorter than ``every`` can be missed.
        self.data_anon: dict[int, tuple[int, int]] = {}
        #: pid -> [(seconds since start, VmData, RssAnon, RssFile)] for training ranks, to see *when* a peak is
        self.series: dict[int, list[tuple[float, int, int, int]]] = {}
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(d))
                except (OSError, ValueError, IndexError):
                    pass
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(children.get(p, []))
        return out

    def run(self):
        while not self._halt.is_set():
            total = 0
            for p in self._tree():
                try:
                    with open(f"/proc/{p}/status") as f:
                        st = dict(line.split(":", 1) for line in f if ":" in line)
                except OSError:
                    continue

                def kb(key: str, st: dict = st) -> int:
                    return int(st.get(key, "0 kB").split()[0])

                if p not in self.per_process:
                    try:
                        with open(f"/proc/{p}/cmdline", "rb") as f:
                            args = f.read().split(b"\0")
                        role = " ".join(Path(x.decode()).name for x in args[1:3] if x)
                    except OSError:
                        role = "?"
                    self.per_process[p] = (role, 0, 0)
                role, vm0, hwm0 = self.per_process[p]
                self.per_process[p] = (role, max(vm0, kb("VmPeak") * 1024), max(hwm0, kb("VmHWM") * 1024))
                if "launcher.py" in role:
                    self.series.setdefault(p, []).append((round(time.monotonic() - self.t0, 2), kb("VmData") * 1024,
                                                          kb("RssAnon") * 1024, kb("RssFile") * 1024))
                d0, a0 = self.data_anon.get(p, (0, 0))
                self.data_anon[p] = (max(d0, kb("VmData") * 1024), max(a0, kb("RssAnon") * 1024))
                self.max_vm = max(self.max_vm, kb("VmPeak") * 1024)
                self.max_hwm = max(self.max_hwm, kb("VmHWM") * 1024)
                total += kb("VmRSS") * 1024
            self.max_total_rss = max(self.max_total_rss, total)
            self._halt.wait(self.every)

    def stop(self):
        self._halt.set()
        self.join()


def render(root: Path, model: Path, data_dir: Path, dataset: str, nproc: int) -> Path:
    out = root / f"render-{nproc}gpu-{model.name}"
    if not (out / "dsplan.json").is_file():
        # this checkout's dsplan (cwd first on sys.path), whatever the venv's editable install points at
        cmd = [sys.executable, "-m", "dsplan", "render", "--gpus", f"{nproc}x16G", "--model", str(model), "--method", "lora",
               "--tier", "all", "--dataset", dataset, "--dataset-dir", str(data_dir), "--template", "qwen",
               "-o", str(out), "--output-dir", str(root / "saves" / "unused")]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
        if r.returncode:
            raise SystemExit(f"dsplan render failed: {r.stderr}")
    return out


def patch_yaml(src: Path, dst: Path, output_dir: Path, extra: dict) -> dict:
    lf = yaml.safe_load(src.read_text())
    lf.update(CPU_KEYS)
    lf["output_dir"] = str(output_dir)
    lf.update(extra)
    dst.write_text(yaml.safe_dump(lf, sort_keys=False))
    return lf


def patch_ds(src: Path, dst: Path, ds_extra: dict) -> None:
    ds = json.loads(src.read_text())
    ds["zero_optimization"].update(ds_extra)
    dst.write_text(json.dumps(ds, indent=2))


CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def make_cgroup(limit: int) -> Path:
    """A cgroup-v1 memory cgroup limited to ``limit`` bytes (root only): the kernel's OOM
    killer SIGKILLs a process of the group that goes over, as on a real host."""
    cg = CGROUP_V1 / f"dsplan-probe-{os.getpid()}"
    cg.mkdir(exist_ok=True)
    (cg / "memory.limit_in_bytes").write_text(str(limit))
    return cg


def remove_cgroup(cg: Path) -> None:
    for _ in range(50):
        try:
            cg.rmdir()
            return
        except OSError:
            time.sleep(0.2)


def run_one(root: Path, assets, tier: str, nproc: int, name: str | None = None, cap: int | None = None,
            lf_extra: dict | None = None, ds_extra: dict | None = None, timeout: float = 1800,
            cgroup_mem: int | None = None, data_cap: int | None = None, every: float = 0.25) -> dict:
    model, data_dir, dataset = assets
    rdir = render(root, model, data_dir, dataset, nproc)
    name = name or f"{tier}-n{nproc}"
    out_dir = root / "saves" / name
    shutil.rmtree(out_dir, ignore_errors=True)
    lf_extra = dict(lf_extra or {})
    if ds_extra:
        ds_path = root / f"{name}.ds.json"
        patch_ds(rdir / f"ds_{tier}.json", ds_path, ds_extra)
        lf_extra["deepspeed"] = str(ds_path)
    yml = root / f"{name}.yaml"
    patch_yaml(rdir / f"lf_{tier}.yaml", yml, out_dir, lf_extra)
    cmd = [str(BIN / "llamafactory-cli"), "train", str(yml)]
    if cap:
        cmd = ["prlimit", f"--as={cap}", "--"] + cmd
    if data_cap:
        cmd = ["prlimit", f"--data={data_cap}", "--"] + cmd
    cg = None
    if cgroup_mem:
        cg = make_cgroup(cgroup_mem)
        cmd = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"] + cmd
    log = root / f"{name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env_for(nproc), cwd=root)
        poller = MemPoller(p.pid, every)
        poller.start()
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        poller.stop()
    wall = time.monotonic() - t0
    oom_kills = None
    if cg:
        try:
            ctl = (cg / "memory.oom_control").read_text()
            kills = re.search(r"oom_kill (\d+)", ctl)
            oom_kills = {"oom_kill": int(kills.group(1)) if kills else None,
                         "failcnt": int((cg / "memory.failcnt").read_text()),
                         "max_usage_gib": round(int((cg / "memory.max_usage_in_bytes").read_text()) / 2**30, 2)}
        except (OSError, AttributeError):
            pass
        remove_cgroup(cg)
    text = log.read_text(errors="replace")
    steps = []
    tl = out_dir / "trainer_log.jsonl"
    if tl.is_file():
        steps = [json.loads(x) for x in tl.read_text().splitlines() if x.strip()]
    errors = []
    for pat in ERROR_PATTERNS:
        for line in text.splitlines():
            if re.search(pat, line):
                line = re.sub(r".*\r", "", line).strip()  # drop tqdm's carriage-return prefix
                if line not in errors:
                    errors.append(line[:300])
                break
    return {
        "name": name, "tier": tier, "nproc": nproc, "cap": cap or cgroup_mem or data_cap, "rc": rc, "oom_kills": oom_kills, "wall_s": round(wall, 1),
        "logged_steps": len([s for s in steps if "loss" in s]), "trainer_log_lines": len(steps),
        "peak_vm_gib": round(poller.max_vm / 2**30, 2), "peak_rss_gib": round(poller.max_hwm / 2**30, 2),
        "peak_tree_rss_gib": round(poller.max_total_rss / 2**30, 2),
        "per_process": {f"{pid} {role}": {"VmPeak_gib": round(vm / 2**30, 2), "VmHWM_gib": round(hwm / 2**30, 2),
                                          "VmData_gib": round(poller.data_anon.get(pid, (0, 0))[0] / 2**30, 2),
                                          "RssAnon_gib": round(poller.data_anon.get(pid, (0, 0))[1] / 2**30, 2)}
                        for pid, (role, vm, hwm) in poller.per_process.items() if vm},
        "errors": errors, "log": str(log), "first_log_line": steps[0] if steps else None,
        "series": {str(pid): s for pid, s in poller.series.items()}, "t0_wall": time.time() - wall,
    }


#: ``tiers``: a wide random model whose frozen weights are most of a LoRA rank's memory
#: (0.30 B parameters, 1.18 GB in fp32), stored in bf16 so that every rank makes its own
#: fp32 copy when loading (a float32 checkpoint stays a private file mapping in ZeRO-2).
WIDE_SHAPE = {"hidden": 1536, "intermediate": 6144, "layers": 8, "heads": 12, "kv_heads": 2, "dtype": "bfloat16"}
#: ``tiers``: LF keys for both tiers: no gradient checkpointing (with it, ZeRO-3 holds every
#: gathered layer until the step ends), one short sequence per rank.
TIERS_LF = {"cutoff_len": 64, "per_device_train_batch_size": 1, "disable_gradient_checkpointing": True}
#: ``tiers``: ZeRO-3 knobs that release each gathered layer after use (dsplan renders 1e9 for both,
#: which on a model this small keeps every gathered weight live).
TIERS_ZERO3_DS = {"stage3_max_live_parameters": 1_000_000, "stage3_max_reuse_distance": 0}
#: Per-rank figures ``tiers`` compares: (key in per_process, what it is).
TIERS_METRICS = (("VmData_gib", "VmData, sampled: what RLIMIT_DATA limits"),
                 ("VmPeak_gib", "VmPeak, the kernel's mark: what RLIMIT_AS limits"),
                 ("RssAnon_gib", "RssAnon, sampled: anonymous resident memory"),
                 ("VmHWM_gib", "VmHWM, the kernel's mark: resident, file pages included"))


def tiers_report(z2: dict, z3: dict) -> None:
    """Largest rank of each tier, per metric; the gap; a cap halfway between."""
    print(f"\nper-rank peaks, largest rank (GiB); zero2 {z2['wall_s']} s, zero3 {z3['wall_s']} s of wall time")
    for key, what in TIERS_METRICS:
        hi = [max((m[key] for who, m in r["per_process"].items() if "launcher.py" in who), default=0.0)
              for r in (z2, z3)]
        gap = hi[0] - hi[1]
        cap = (hi[0] + hi[1]) / 2
        print(f"  {what:52} zero2 {hi[0]:5.2f}  zero3 {hi[1]:5.2f}  gap {gap:+5.2f} "
              f"({gap / hi[1] * 100 if hi[1] else 0:+.0f} %)  halfway cap {cap:5.2f}")


def show(rows: list[dict]) -> None:
    print(f"{'run':28} {'tier':14} {'n':>2} {'cap':>6} {'rc':>4} {'wall_s':>7} {'steps':>5} "
          f"{'VmPeak':>7} {'RSSmax':>7} {'treeRSS':>7}")
    for r in rows:
        cap = f"{r['cap'] / 2**30:.2f}G" if r["cap"] else "-"
        print(f"{r['name']:28} {r['tier']:14} {r['nproc']:>2} {cap:>6} {r['rc']:>4} {r['wall_s']:>7} "
              f"{r['logged_steps']:>5} {r['peak_vm_gib']:>6}G {r['peak_rss_gib']:>6}G {r['peak_tree_rss_gib']:>6}G")
        for who, m in r["per_process"].items():
            if "launcher.py" in who:  # a training rank: VmHWM exact, VmData and RssAnon sampled maxima
                print(f"      rank pid {who.split()[0]}: VmHWM {m['VmHWM_gib']}G VmData {m['VmData_gib']}G "
                      f"RssAnon {m['RssAnon_gib']}G VmPeak {m['VmPeak_gib']}G")
        if r["rc"]:
            for e in r["errors"][:8]:
                print(f"      | {e}")
    sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["matrix", "oom", "run", "tiers"])
    ap.add_argument("--root", type=Path, default=Path("/tmp/dsplan-probe"))
    ap.add_argument("--tiers", default="zero2,zero2_offload,zero3,zero3_offload")
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--tier", default="zero3")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--cap", help="address-space cap per process (prlimit --as), e.g. 4.5G")
    ap.add_argument("--data-cap", help="private writable memory cap per process (prlimit --data), e.g. 3G")
    ap.add_argument("--shape", default="{}", help="demo model shape as JSON, e.g. "
                    "'{\"hidden\": 1536, \"intermediate\": 6144, \"layers\": 8, \"heads\": 12}'")
    ap.add_argument("--every", type=float, default=0.25, help="seconds between /proc samples")
    ap.add_argument("--cgroup-mem", help="instead of --cap: run in a memory cgroup (v1) of this size; "
                    "the kernel OOM killer SIGKILLs (root only)")
    ap.add_argument("--big-batch", type=int, default=64)
    ap.add_argument("--ds", default="{}", help="JSON merged into zero_optimization, e.g. "
                    "'{\"reduce_bucket_size\": 1e6}'")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an LF YAML key (value parsed as YAML), e.g. --set bf16=false")
    ap.add_argument("--name", help="run name (log and output folder)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    a = ap.parse_args(argv)
    a.root.mkdir(parents=True, exist_ok=True)
    for lock in torch_extension_locks():
        age = time.time() - lock.stat().st_mtime
        print(f"warning: {lock} exists ({age:.0f} s old): if no build is running, remove it or runs hang")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    shape = json.loads(a.shape)
    if a.what == "tiers" and not shape:
        shape = dict(WIDE_SHAPE)
    t0 = time.monotonic()
    assets = make_demo_assets(a.root / "assets", **shape)
    print(f"assets ready in {time.monotonic() - t0:.1f} s: {assets[0]}")
    rows: list[dict] = []
    base = {"max_steps": a.max_steps}
    for kv in a.set:
        key, _, value = kv.partition("=")
        base[key] = yaml.safe_load(value)
    if a.what == "matrix":
        for nproc in [int(x) for x in a.nprocs.split(",")]:
            for tier in a.tiers.split(","):
                name = f"{a.name}-{tier}-n{nproc}" if a.name else None
                rows.append(run_one(a.root, assets, tier, nproc, name=name, lf_extra=base))
                show(rows[-1:])
    elif a.what == "run":
        cap = _bytes(a.cap) if a.cap else None
        extra = {**base, "per_device_train_batch_size": a.micro_batch}
        name = a.name or f"{a.tier}-n{a.nproc}-mb{a.micro_batch}" + (f"-cap{a.cap}" if a.cap else "")
        rows.append(run_one(a.root, assets, a.tier, a.nproc, name=name, cap=cap, lf_extra=extra,
                            cgroup_mem=_bytes(a.cgroup_mem) if a.cgroup_mem else None,
                            data_cap=_bytes(a.data_cap) if a.data_cap else None,
                            ds_extra=json.loads(a.ds), every=a.every))
    elif a.what == "tiers":
        # ZeRO-2 against ZeRO-3 at 2+ ranks on a wide model: each rank's peaks, uncapped.
        nproc = max(a.nproc, 2)
        for tier, ds in (("zero2", {}), ("zero3", TIERS_ZERO3_DS)):
            name = f"{a.name or 'tiers'}-{tier}-n{nproc}"
            rows.append(run_one(a.root, assets, tier, nproc, name=name, lf_extra={**base, **TIERS_LF},
                                ds_extra=ds, every=0.05))
            show(rows[-1:])
        tiers_report(*rows)
    elif a.what == "oom":
        # Same address-space cap (prlimit --as, per process, inherited by torchrun's children)
        # for every run: the big micro-batch and DeepSpeed's default 5e8-element reduce bucket
        # die with a real allocation error; micro-batch 1 with "auto" buckets finishes.
        cap = _bytes(a.cap or "8G")
        bucket = {"reduce_bucket_size": 500_000_000}
        plan = [("zero2", a.big_batch, {}, "expect OOM"), ("zero3", a.big_batch, {}, "expect OOM"),
                ("zero2", 1, bucket, "expect OOM"), ("zero3", 1, {}, "expect pass"),
                ("zero3_offload", 1, {}, "expect pass")]
        for tier, mb, ds, _why in plan:
            name = f"oom-{tier}-mb{mb}" + ("-bucket5e8" if ds else "")
            rows.append(run_one(a.root, assets, tier, a.nproc, name=name, cap=cap, ds_extra=ds,
                                lf_extra={**base, "per_device_train_batch_size": mb}))
            show(rows[-1:])
        if a.cgroup_mem:  # the kernel OOM killer instead: SIGKILL, torchrun "exitcode: -9"
            for tier, mb in (("zero2", a.big_batch), ("zero3", 1)):
                rows.append(run_one(a.root, assets, tier, a.nproc, name=f"oomkill-{tier}-mb{mb}",
                                    cgroup_mem=_bytes(a.cgroup_mem),
                                    lf_extra={**base, "per_device_train_batch_size": mb}))
                show(rows[-1:])
    print()
    show(rows)
    for r in rows:
        if r["rc"]:
            print(f"\n{r['name']}: exit {r['rc']}; log {r['log']}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
