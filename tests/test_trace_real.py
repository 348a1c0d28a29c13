"""Activations, logits and LoRA against exact MemTracker traces of real HF models.

The traces run transformers' real Llama/Qwen2 modules (and peft's LoRA) under
FakeTensorMode: exact tensor bytes, no weights, no GPU.  The full table is
``scripts/trace_memory.py``; these are quick cases of each kind.
"""

import importlib.util
from pathlib import Path

import pytest

from dsplan.inputs.catalog import lookup
from dsplan.estimate.memory import trace_layout_estimate
from dsplan.inputs.model import spec_from_config

_spec = importlib.util.spec_from_file_location(
    "trace_memory", Path(__file__).resolve().parents[1] / "scripts" / "trace_memory.py")
trace_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trace_memory)

CASES = [
    # model, layers, method, gradient checkpointing, seq, micro-batch, attention
    ("Llama-3-8B", 2, "lora", False, 512, 1, "sdpa"),
    ("Llama-3-8B", 2, "lora", True, 1024, 1, "sdpa"),
    ("Llama-3-8B", 1, "full", False, 256, 1, "sdpa"),
    ("Qwen2.5-0.5B", 2, "lora", False, 512, 2, "eager"),
    ("Qwen2.5-0.5B", 2, "full", True, 512, 1, "sdpa"),
    ("Mistral-7B-v0.1", 1, "lora", True, 2048, 1, "sdpa"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_estimate_within_10_percent_of_trace(case, train_python):
    name, layers, method, gc, seq, mb, attn = case
    got = trace_memory.trace(name, layers, method, gc, seq, mb, attn)
    cfg = dict(lookup(name)[1]["config"], num_hidden_layers=layers)
    spec = spec_from_config(cfg, name=name)
    est = trace_layout_estimate(spec, method=method, gradient_checkpointing=gc, seq_len=seq, micro_batch=mb,
                                attention=attn)
    assert est["act"] == pytest.approx(got["act"], rel=0.10)
    assert est["total"] == pytest.approx(got["total"], rel=0.10)
    if method == "lora":
        assert got["trainable"] == spec.lora_params(8)  # peft's LoRA count = dsplan's rank x (in + out)
