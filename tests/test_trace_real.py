"""Activations, logits and LoRA against exact MemTracker traces of real HF models.

The traces run transformers' real Llama/Qwen2 modules (and peft's LoRA) under
FakeTensorMode: exact tensor bytes, no weights, no GPU.  The full table is
``scripts/trace_memory.py``; these are quick cases of each kind.
"""

import importlib.util
from pathlib import Path

import pytest

from dsplan.estimate.activations import logits_bytes, trace_layout_estimate
from dsplan.estimate.workload import Workload
from dsplan.inputs.catalog import lookup
from dsplan.inputs.model import load_model_spec, spec_from_config

pytestmark = pytest.mark.real

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


@pytest.mark.parametrize("model,cutoff,micro_batch", [("Qwen1.5-7B", 2048, 2), ("Llama-3-8B", 1024, 1)])
def test_loss_peak_matches_transformers_loss(model, cutoff, micro_batch, train_python):
    """The loss alone, measured: transformers' own ForCausalLMLoss and its backward on fake
    16-bit logits, against what the estimate charges for the loss."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers.loss.loss_utils import ForCausalLMLoss

    spec = load_model_spec(model)
    vocab = spec.vocab_size
    with FakeTensorMode():
        # Made before tracking starts: in training these 16-bit logits are freed once the loss
        # is computed (HF's Trainer keeps only the loss), so the tracked peak is the loss's own.
        logits = torch.empty(micro_batch, cutoff, vocab, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (micro_batch, cutoff))
        tracker = MemTracker()
        with tracker:
            loss = ForCausalLMLoss(logits, labels, vocab_size=vocab)
            loss.backward()
            del loss
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    measured = peak["Total"] if "Total" in peak else sum(peak.values())
    charged = logits_bytes(spec, Workload(method="lora", cutoff_len=cutoff, micro_batch=micro_batch))
    assert charged == pytest.approx(measured, rel=0.01)
