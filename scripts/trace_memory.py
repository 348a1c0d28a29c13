#!/usr/bin/env python3
"""Trace the exact tensor memory of a real HF training step on the CPU, and compare with dsplan.

Each case builds a real transformers model (random init, no weights, no GPU) inside
``FakeTensorMode``, optionally wraps it with peft LoRA, enables gradient
checkpointing the way LLaMA-Factory does (reentrant), and runs two training steps
(forward with labels -> HF's loss, backward, AdamW step) under PyTorch's
``MemTracker``.  The layout mirrors a DeepSpeed bf16 run: every parameter in
bf16 (DeepSpeed's engine casts LF's fp32 LoRA/full params back to 16-bit), no
autocast.

Measured per case:
- ``act``: the peak, over the whole step, of Activation + Temp memory (saved
  activations, the logits and their fp32 copies, autograd temporaries);
- ``total``: the peak of all tracked memory.

dsplan's estimator is asked for the same model and settings; the script prints
both and the error.  Usage:

    python scripts/trace_memory.py            # the standard table
    python scripts/trace_memory.py --quick    # two small cases
    python scripts/trace_memory.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsplan.inputs.catalog import lookup  # noqa: E402
from dsplan.estimate.activations import trace_layout_estimate  # noqa: E402
from dsplan.inputs.model import spec_from_config  # noqa: E402

GiB = 1024**3

#: (catalog model, layers traced or None for all, method, gradient checkpointing, seq len, micro-batch, attention)
CASES = [
    ("Qwen2.5-0.5B", None, "lora", True, 1024, 1, "sdpa"),
    ("Qwen2.5-0.5B", 4, "lora", False, 1024, 1, "sdpa"),
    ("Qwen2.5-0.5B", 4, "full", True, 512, 2, "sdpa"),
    ("Qwen2.5-0.5B", 4, "full", False, 512, 1, "sdpa"),
    ("Qwen2.5-0.5B", 4, "lora", False, 512, 1, "eager"),
    ("Qwen2.5-1.5B", 4, "lora", True, 4096, 1, "sdpa"),
    ("Qwen2.5-1.5B", 4, "full", False, 256, 1, "sdpa"),
    ("Llama-3-8B", 2, "lora", True, 2048, 1, "sdpa"),
    ("Llama-3-8B", 2, "lora", False, 512, 1, "sdpa"),
    ("Llama-3-8B", 2, "full", False, 1024, 1, "sdpa"),
    ("Llama-3-8B", 2, "lora", False, 1024, 1, "eager"),
    ("Qwen1.5-7B", 2, "lora", True, 2048, 2, "sdpa"),
    ("Mistral-7B-v0.1", 2, "lora", False, 2048, 1, "sdpa"),
    ("Mistral-7B-v0.1", 2, "full", True, 4096, 1, "sdpa"),
    ("Mistral-7B-v0.1", 4, "lora", True, 8192, 1, "sdpa"),
]
QUICK = [CASES[1], CASES[8]]


def trace(model_name: str, layers: int | None, method: str, gc: bool, seq: int, mb: int, attn: str,
          lora_rank: int = 8, overrides: dict | None = None) -> dict:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
    from transformers import AutoConfig, AutoModelForCausalLM

    _, entry = lookup(model_name)
    fields = dict(entry["config"])
    if layers:
        fields["num_hidden_layers"] = layers
    fields.update(overrides or {})
    model_type = fields.pop("model_type")
    fields.pop("attention_bias", None)  # qwen2's biases are implied by its modeling code
    cfg = AutoConfig.for_model(model_type, **fields)
    cfg.use_cache = False

    class ActPeakTracker(MemTracker):
        """MemTracker that also keeps the peak of Activation + Temp memory over time."""

        act_peak = 0

        def _update_peak_stats(self, peak_state):
            super()._update_peak_stats(peak_state)
            for snap in self._curr_mem_snap.values():
                now = snap.get(_MemRefType.ACT, 0) + snap.get(_MemRefType.TEMP, 0)
                self.act_peak = max(self.act_peak, now)

    with FakeTensorMode():
        torch.set_default_dtype(torch.bfloat16)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            saved_to = torch.nn.Module.to
            torch.nn.Module.to = lambda self, *a, **k: self  # peft moves adapters; fake params cannot move
            try:
                model = get_peft_model(model, LoraConfig(
                    r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
            finally:
                torch.nn.Module.to = saved_to
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
        ids = torch.randint(0, cfg.vocab_size, (mb, seq))
        mt = ActPeakTracker()

        class _NoHandle:
            def remove(self):
                pass

        for p in model.parameters():  # frozen params get no grad hooks (they would raise)
            if not p.requires_grad:
                mt._param_to_grad_hook_handles[p] = (_NoHandle(), _NoHandle())
        mt.track_external(model, opt)
        with mt:
            for _ in range(2):  # the second step runs with AdamW's states allocated
                loss = model(input_ids=ids, labels=ids).loss  # outputs dropped, as HF's Trainer does
                loss.backward()
                del loss
                opt.step()
                opt.zero_grad(set_to_none=True)
                mt.reset_mod_stats()  # module stats are per iteration; the global peak is kept
        peak = next(iter(mt.get_tracker_snapshot("peak").values()))
    torch.set_default_dtype(torch.float32)
    cats = {k.value if hasattr(k, "value") else str(k): v for k, v in peak.items()}
    return {"act": mt.act_peak, "total": cats.get("Total", sum(v for k, v in peak.items() if k != "Total")),
            "breakdown": cats, "trainable": sum(p.numel() for p in trainable)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two small cases only")
    ap.add_argument("--json", metavar="PATH", help="also write results as JSON")
    ap.add_argument("--case", type=int, action="append", help="run only these case indexes")
    args = ap.parse_args()
    cases = QUICK if args.quick else [CASES[i] for i in args.case] if args.case else CASES
    rows = []
    hdr = (f"{'model':18s} {'L':>3s} {'method':6s} {'gc':3s} {'seq':>5s} {'mb':>2s} {'attn':5s} | "
           f"{'act trace':>9s} {'act est':>8s} {'err':>6s} | {'total trace':>11s} {'total est':>9s} {'err':>6s} | {'s':>4s}")
    print(hdr)
    print("-" * len(hdr))
    worst = 0.0
    for name, layers, method, gc, seq, mb, attn in cases:
        t0 = time.time()
        got = trace(name, layers, method, gc, seq, mb, attn)
        _, entry = lookup(name)
        cfg = dict(entry["config"])
        if layers:
            cfg["num_hidden_layers"] = layers
        spec = spec_from_config(cfg, name=name)
        est = trace_layout_estimate(spec, method=method, gradient_checkpointing=gc, seq_len=seq, micro_batch=mb,
                                    attention=attn, lora_rank=8)
        e_act = (est["act"] - got["act"]) / got["act"]
        e_tot = (est["total"] - got["total"]) / got["total"]
        worst = max(worst, abs(e_act), abs(e_tot))
        L = layers or spec.num_layers
        print(f"{name:18s} {L:3d} {method:6s} {'on' if gc else 'off':3s} {seq:5d} {mb:2d} {attn:5s} | "
              f"{got['act'] / GiB:8.3f}G {est['act'] / GiB:7.3f}G {e_act:+6.1%} | "
              f"{got['total'] / GiB:10.3f}G {est['total'] / GiB:8.3f}G {e_tot:+6.1%} | {time.time() - t0:4.0f}",
              flush=True)
        rows.append({"model": name, "layers": L, "method": method, "gradient_checkpointing": gc, "seq_len": seq,
                     "micro_batch": mb, "attention": attn, "trace": got, "estimate": est,
                     "err_act": e_act, "err_total": e_tot})
    print(f"worst error: {worst:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
