"""Shared fixtures.  Tests marked ``real`` run DeepSpeed and LLaMA-Factory themselves."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.slurm_cluster"]  # the real-Slurm `slurm_cluster` fixture

REPO = Path(__file__).resolve().parents[1]

# A developer's own ~/.config/dsplan/calibration.json must not change the suite's numbers: every
# test (and every dsplan it starts) sees no calibration unless it points DSPLAN_CALIBRATION itself.
os.environ["DSPLAN_CALIBRATION"] = str(REPO / "tests" / "data" / "no-calibration.json")

#: A small Qwen2-shaped config.json (the architecture of Qwen2.5-0.5B).
QWEN_SMALL = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "tie_word_embeddings": True, "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
}


def load_script(name: str):
    """``scripts/NAME.py`` as a module, imported once and registered in ``sys.modules`` (dataclasses
    look their module up while it executes)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "Qwen-small"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(QWEN_SMALL))
    return d


@pytest.fixture(scope="session")
def train_python() -> str:
    """The interpreter with deepspeed and llamafactory: the test interpreter itself.
    The real-tool tests are part of the suite; a missing install is a failure, not a skip."""
    missing = [m for m in ("deepspeed", "llamafactory", "torch") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed for {sys.executable}: run scripts/setup_env.sh")
    return sys.executable


def run_dsplan(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    """Run the CLI in a fresh process, exactly as a user would."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "dsplan", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
