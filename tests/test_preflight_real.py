"""`dsplan run --preflight` through the real llamafactory-cli and DeepSpeed on the CPU.

The data: many short alpaca samples and one very long one, at a fixed row that
``disable_shuffling: true`` turns into a fixed, late optimizer step.  The model: the
demo's tiny Qwen2 (dsplan.demo.assets).  The out-of-memory is real: llamafactory-cli
runs under a cap on private writable memory (RLIMIT_DATA, inherited by torchrun and
the rank), which the padded batch holding the long sample at micro-batch 4 exceeds and
the same batch at micro-batch 2 does not.  The cap is derived from measurements
(scripts/bench_preflight.py measure; figures at :data:`CAP_BYTES`).

- Without --preflight the run trains the short batches, then dies in torch's allocator
  at the step holding the long sample (host_oom).
- With --preflight the first attempt is a preflight on the longest samples: it dies in
  its first step, dsplan halves the micro-batch, the preflight at micro-batch 2 passes,
  and the real run finishes.

scripts/bench_preflight.py times both to the OOM.  Everything trains in fp32, the one
precision DeepSpeed's CPU accelerator takes on any x86-64 CPU.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.real

#: Rows in the dataset; the long sample sits at LONG_ROW, the rest are short.
ROWS = 24
LONG_ROW = 16  # micro-batch 4, no shuffling: optimizer step 5 of 6
#: Words in the long sample's answer (about one token each with the demo tokenizer).
LONG_WORDS = 900
CUTOFF = 1024
MICRO_BATCH = 4
DATASET = "preflight_demo"
#: The demo model, narrower and with a larger vocabulary: memory per token is then mostly
#: the fp32 logits (65536 x 4 B per copy), so the batch holding the long sample at
#: micro-batch 4 and at micro-batch 2 are far apart, while a step stays cheap.
MODEL_SHAPE = {"vocab_size": 65536, "hidden": 64, "intermediate": 256, "heads": 4, "kv_heads": 2}
#: RLIMIT_DATA for llamafactory-cli and every process it starts.  ``scripts/bench_preflight.py
#: measure`` (uncapped, the rank's VmData sampled every 50 ms; fp32, zero2, one process) gave
#: 2.56 GiB for the short batches at micro-batch 4, 5.20 GiB with the batch holding the long
#: sample at micro-batch 4, and 3.75 GiB with it at micro-batch 2 x GA 2 (the fall back).
#: 4.5 GiB is near the middle of the last two, 0.7 GiB from each.
CAP_BYTES = int(4.5 * 1024**3)


# ---------------------------------------------------------------- the assets
def _sample(i: int, words: int) -> dict:
    from dsplan.demo.assets import _words

    return {"question": f"Repeat the words of list {i}.", "context": " ".join(_words(i, 1, 6)),
            "answer": " ".join(_words(i, 2, words))}


def dataset_rows() -> list[dict]:
    """ROWS alpaca rows under their own column names: short ones, one long at LONG_ROW."""
    return [_sample(i, LONG_WORDS if i == LONG_ROW else 8 + i % 7) for i in range(ROWS)]


def make_assets(root: Path) -> tuple[Path, Path, str]:
    """The demo's tiny model and this test's dataset: (model dir, dataset dir, dataset name)."""
    from dsplan.demo.assets import make_tiny_model

    model_dir = make_tiny_model(root / "tiny-qwen2", **MODEL_SHAPE)
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / f"{DATASET}.json").write_text(json.dumps(dataset_rows(), indent=1))
    entry = {"file_name": f"{DATASET}.json", "formatting": "alpaca",
             "columns": {"prompt": "question", "query": "context", "response": "answer"}}
    (data_dir / "dataset_info.json").write_text(json.dumps({DATASET: entry}, indent=2))
    return model_dir, data_dir, DATASET


def train_yaml(model_dir: Path, data_dir: Path, dataset: str, **extra) -> dict:
    """The user's LF YAML: no shuffling, so the long sample's step is fixed; one epoch."""
    return {"model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "lora_rank": 8, "lora_target": "all", "dataset": dataset, "dataset_dir": str(data_dir),
            "template": "qwen", "cutoff_len": CUTOFF, "per_device_train_batch_size": MICRO_BATCH,
            "gradient_accumulation_steps": 1, "num_train_epochs": 1, "disable_shuffling": True,
            "logging_steps": 1, "save_steps": 100000, "learning_rate": 1.0e-4, "report_to": "none",
            "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "overwrite_cache": True, **extra}


def capped_cli(bin_dir: Path, lf_cli: str, cap: int) -> Path:
    """A wrapper that sets RLIMIT_DATA, then becomes the real llamafactory-cli (children inherit it)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "llamafactory-cli-capped"
    path.write_text(f"#!{sys.executable}\nimport os, resource, sys\n"
                    f"resource.setrlimit(resource.RLIMIT_DATA, ({cap}, {cap}))\n"
                    f"os.execv({lf_cli!r}, [{lf_cli!r}] + sys.argv[1:])\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ---------------------------------------------------------------- running dsplan, timed
#: dsplan run's flags for these runs: a pretend 16 GB card (CUDA_VISIBLE_DEVICES names a GPU the
#: CPU-only machine does not have), fp32, zero2 (the only tier on this tiny model's ladder).
RUN_FLAGS = ["--gpus", "1x16G", "--precision", "fp32", "--tier", "zero2", "--stall-timeout", "900"]
#: dsplan's line for an attempt that ran out of memory.
OOM_LINE = re.compile(r"dsplan run: (preflight attempt|attempt) (\d+) verdict (host_oom|gpu_oom)")
#: The optimizer step the long sample lands in at micro-batch 4 (ROWS / 4 steps in the epoch).
LONG_STEP = LONG_ROW // MICRO_BATCH + 1


def prepare(root: Path) -> tuple[Path, Path]:
    """Assets, the user's YAML and the capped llamafactory-cli under ``root``: (YAML, wrapper)."""
    from dsplan.launch.loop import resolve_lf_cli

    model_dir, data_dir, dataset = make_assets(root / "assets")
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(train_yaml(model_dir, data_dir, dataset), sort_keys=False))
    return path, capped_cli(root / "bin", resolve_lf_cli(None), CAP_BYTES)


def run_env(root: Path) -> dict:
    """dsplan's environment: offline, its own length cache, and the real CLI's folder on PATH
    (dsplan puts the wrapper's folder first; LLaMA-Factory then starts a bare ``torchrun``)."""
    from dsplan.launch.loop import resolve_lf_cli

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", XDG_CACHE_HOME=str(root / "xdg"))
    env["PATH"] = str(Path(resolve_lf_cli(None)).parent) + os.pathsep + env.get("PATH", "")
    env.pop("DSPLAN_TRAIN_PYTHON", None)
    return env


def run_timed(root: Path, lf_yaml: Path, wrapper: Path, run_dir: Path, *extra: str,
              timeout: float = 1200) -> tuple[int, float | None, float, str]:
    """``dsplan run`` in a fresh process: (exit code, seconds from its start to its first OOM verdict
    line or None, seconds in all, its output)."""
    argv = [sys.executable, "-m", "dsplan", "run", str(lf_yaml), *RUN_FLAGS, "--lf-cli", str(wrapper), "--run-dir",
            str(run_dir), *extra]
    t0 = time.monotonic()
    to_oom, lines = None, []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          env=run_env(root)) as p:
        for line in p.stdout:
            if to_oom is None and OOM_LINE.search(line):
                to_oom = time.monotonic() - t0
            lines.append(line)
            if time.monotonic() - t0 > timeout:
                p.kill()
        rc = p.wait()
    return rc, to_oom, time.monotonic() - t0, "".join(lines)


def logged_steps(output_dir: str | Path) -> list[int]:
    path = Path(output_dir) / "trainer_log.jsonl"
    if not path.is_file():
        return []
    return [r["current_steps"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def digest(out: str, tail: int = 4000) -> str:
    marks = ("error", "dsplan run:", "killed", "memory")
    return "\n".join(x for x in out.splitlines() if any(m in x.lower() for m in marks))[-6000:] + out[-tail:]


# ---------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def setup(tmp_path_factory, train_python):
    from dsplan.demo.demo import cpu_env
    from tests.fakes.cpu_caps import cpu_capabilities, require

    require(cpu_capabilities(train_python, cpu_env(train_python)), precision="fp32")
    root = tmp_path_factory.mktemp("preflight")
    return (root, *prepare(root))


def test_without_preflight_the_long_batch_dies_late(setup):
    root, lf_yaml, wrapper = setup
    rc, to_oom, _, out = run_timed(root, lf_yaml, wrapper, root / "plain", "--no-fallback")
    ledger = json_ledger(root / "plain")
    assert rc == 3 and to_oom is not None, digest(out)
    (a,) = ledger
    assert (a["verdict"], a["micro_batch"], a.get("preflight", False)) == ("host_oom", MICRO_BATCH, False)
    assert "can't allocate memory" in a["evidence"]
    # the short batches trained; the step holding the long sample was the one that died
    assert logged_steps(a["output_dir"]) == list(range(1, LONG_STEP))


def test_with_preflight_the_oom_comes_first_and_the_run_finishes(setup):
    root, lf_yaml, wrapper = setup
    rc, to_oom, _, out = run_timed(root, lf_yaml, wrapper, root / "preflight", "--preflight")
    ledger = json_ledger(root / "preflight")
    assert rc == 0 and to_oom is not None, digest(out)
    assert [(a.get("preflight", False), a["verdict"], a["micro_batch"], a["grad_accum"]) for a in ledger] == [
        (True, "host_oom", 4, 1), (True, "success", 2, 2), (False, "success", 2, 2)]
    first, passed, real = ledger
    assert "can't allocate memory" in first["evidence"] and logged_steps(first["output_dir"]) == []
    rows = json.loads((root / "preflight" / "attempt-001" / "preflight_data" / "dsplan_preflight.json").read_text())
    assert rows[0] == dataset_rows()[LONG_ROW] and len(rows) == 2 * MICRO_BATCH  # 2 steps x 4 x GA 1
    assert logged_steps(passed["output_dir"]) == [1, 2]
    # the real run trained every step, the long sample's included, at micro-batch 2
    assert logged_steps(real["output_dir"]) == list(range(1, ROWS // MICRO_BATCH + 1))
    assert "preflight passed at tier zero2 (micro-batch 2 x GA 2" in out


def json_ledger(run_dir: Path) -> list[dict]:
    from dsplan.launch.ledger import read_attempts

    return read_attempts(run_dir) if run_dir.exists() else []
