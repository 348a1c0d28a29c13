"""The estimate against traces of the real code path (quick cases of ``scripts/trace_memory.py``).

- The real path itself: a tiny Qwen2 through LLaMA-Factory's ``run_exp`` (its loader, peft, HF's Trainer,
  accelerate and DeepSpeed at world size 1 on the CPU), every tensor storage tracked through a
  training step: the dtypes, optimizer and autocast it runs with, and its measured memory against
  dsplan's estimate of the same tiny model.
- The trace worker: transformers' and peft's real modules at full width under ``FakeTensorMode`` in
  that state (DeepSpeed's partitions emulated as ``stage_1_and_2.py``/``stage3.py`` lay them out).
The full table is ``scripts/trace_memory.py``; the facts it recorded are ``tests/data/real_path_facts.json``.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from dsplan.estimate.activations import logits_bytes
from dsplan.estimate.workload import Workload, hf_default_optim
from dsplan.inputs.model import load_model_spec

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("trace_memory", REPO / "scripts" / "trace_memory.py")
trace_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(trace_memory)


def test_recorded_facts_are_the_ones_the_estimate_assumes():
    """tests/data/real_path_facts.json, as scripts/trace_memory.py facts wrote it (no torch needed)."""
    facts = json.loads((REPO / "tests" / "data" / "real_path_facts.json").read_text())
    s = facts["summary"]
    assert s["optimizer_hf_builds"] == [hf_default_optim(facts["versions"]["torch"])] == ["adamw_torch_fused"]
    assert s["autocast_active"] == [False]
    assert s["adapter_dtype_zero2"] == ["bfloat16"] and s["adapter_dtype_zero3"][0].startswith("float32")
    assert s["persistent_bytes_per_trainable"] == pytest.approx(12.0, abs=0.01)  # fp32 master + Adam's m and v
    assert s["step_bytes_per_trainable"]["zero2"] == pytest.approx(8.0, abs=0.05)
    assert s["step_bytes_per_trainable"]["zero3"] == pytest.approx(6.0, abs=0.05)


def test_hf_default_optimizer_follows_torch():
    assert hf_default_optim("2.7.1") == "adamw_torch"
    assert hf_default_optim("2.8.0") == hf_default_optim("2.9.1+cu128") == "adamw_torch_fused"


@pytest.mark.real
def test_real_path_zero2_lora(train_python, tmp_path):
    """LF + DeepSpeed ZeRO-2 on the CPU: adapters cast to bf16, HF's fused AdamW under DeepSpeed's ZeRO
    optimizer, no autocast; the step's measured peak within 5 % of the estimate."""
    r = trace_memory.run_real_case(trace_memory.real_jobs(tmp_path, [("qwen2", "lora", 2, True)])[0])
    assert "error" not in r, r.get("error")
    assert r["dtypes"] == {"base/frozen": ["bfloat16"], "adapter/trainable": ["bfloat16"]}
    assert r["adapter_input_dtype"] == "torch.bfloat16" and r["autocast_cpu"] is False
    assert r["optimizer"]["hf_optim"] == "adamw_torch_fused" and r["optimizer"]["fused"] is True
    assert r["optimizer"]["chain"][1:] == ["deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
                                           "torch.optim.adamw.AdamW"]
    row = trace_memory.real_rows([r])[0]
    assert row["trace"]["weights"] == row["estimate"]["weights"]
    assert row["trace"]["optimizer"] == pytest.approx(row["estimate"]["optimizer"], rel=0.001)
    assert abs(row["errors"]["total"]) < 0.05, row


@pytest.mark.real
def test_trace_worker_quick_cases(train_python):
    """LoRA without checkpointing (ZeRO-2), full tuning with foreach AdamW (ZeRO-2, one GPU), an MoE's LoRA
    at ZeRO-3 over 2 GPUs and Liger's fused loss: every total within 5 % of the trace."""
    rows = [trace_memory.SETTINGS[i] for i in (1, 15, 19, 10)]
    for r in trace_memory.table(rows):
        assert "trace" in r and isinstance(r["trace"], dict), r
        assert abs(r["error"]["total"]) < 0.05, r
        assert r["trace"]["optimizer"] == pytest.approx(r["estimate"]["optimizer"], rel=0.01), r


@pytest.mark.parametrize("model,cutoff,micro_batch", [("Qwen1.5-7B", 2048, 2), ("Llama-3-8B", 1024, 1)])
@pytest.mark.real
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
