"""Trace worker: one training step of a model's exact architecture under ``FakeTensorMode``, in the state
the real code path leaves it in.  Runs *inside* the Python that has torch, transformers and peft.

Started by :mod:`dsplan.learn.trace` (``dsplan calibrate MODEL_DIR``) and by ``scripts/trace_memory.py``
as ``python trace_worker.py`` with a JSON list of jobs on stdin; prints one JSON result per line.
Stand-alone on purpose (no dsplan imports): it may run under another interpreter than dsplan's own.
LLaMA-Factory is used where it is installed (its gradient-checkpointing wrapper, its LoRA target
finder, its ``get_batch_logps``) and copied in spirit where not.

The state, as ``scripts/trace_memory.py``'s real path recorded it (LF 0.9.5, DeepSpeed 0.19.8,
transformers 5.6, peft 0.18, torch 2.9; ``tests/data/real_path_facts.json``):

- every base weight 16-bit; LoRA adapters 16-bit at ZeRO-2 (DeepSpeed's engine casts LF's fp32
  adapters back) and fp32 at ZeRO-3 (LF leaves them fp32 and zero.Init partitions them as they are),
  so at ZeRO-3 peft casts each adapted linear's input to fp32 and saves that copy;
- no autocast; LF's reentrant gradient checkpointing of the layers that train;
- the optimizer HF builds (``adamw_torch_fused`` by default with torch >= 2.8) over DeepSpeed's flat
  fp32 partition, emulated here as DeepSpeed's ZeRO-2 code lays it out (``stage_1_and_2.py``): the fp32
  master partition and Adam's two states (12 B per trainable parameter / world size) persist; in
  backward each 16-bit gradient is copied into one 16-bit partition buffer (2 B / N) through the
  reduce bucket (``reduce_bucket_size`` 16-bit elements, freed at the end of backward); the step
  flattens that partition (another 2 B / N), upcasts it to an fp32 gradient (4 B / N) and runs the
  torch optimizer on it (fused: no temporary; ``adamw_torch``: foreach's 4 B / N).
- ZeRO-3 (``stage3.py``): the same persistent 12 B / N, plus a 16-bit gradient partition (2 B / N,
  ``grad_partitions_flat_buffer``) and the reduce bucket, both made at init and kept; the step
  flattens and upcasts the partition as ZeRO-2 does (per ``sub_group_size`` elements: one sub-group
  here).  Parameters are traced whole; the partitioned weights (whole / N) and the gathered working
  set are not traced (the caller takes them from the estimate).
- world size N > 1 is emulated by the partition sizes alone (one process, no communication).

Job: ``{"config": {...config.json...}, "layers": int|null, "method": "lora|qlora|full|freeze",
"lora_rank", "freeze_trainable_layers", "gradient_checkpointing", "seq_len", "micro_batch", "attention",
"stage": "pt|sft|dpo|kto", "liger", "zero": 2|3, "world_size", "optim", "reduce_bucket"}``.
QLoRA traces the dequantized 16-bit path (bitsandbytes needs a GPU): the caller counts its 4-bit
weights.  Liger is emulated when ``liger_kernel`` is not importable: a chunked fused linear
cross-entropy that builds one chunk of logits at a time and its gradients in the forward pass.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
import traceback
import weakref

#: Module-name parts of a VLM's vision tower and projector (frozen by LF's defaults).
VISION_KEYS = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "vision_embed", "mm_projector")
#: Optimizer names HF runs as one fused kernel (no per-step temporaries).
FUSED_OPTIMIZERS = ("adamw_torch_fused", "adamw_apex_fused", "adamw_torch_npu_fused")
#: config.json keys that AutoConfig must not be handed back.
DROP_KEYS = ("architectures", "transformers_version", "torch_dtype", "dtype", "auto_map", "quantization_config",
             "_name_or_path")


class LiveBytes:
    """Live tensor-storage bytes over time, by a dispatch-mode hook on every op's outputs (real or fake
    tensors).  Each storage is watched by a weak reference, so its free is seen too; ``phase`` names
    the part of the step, and ``peaks`` keeps the largest live total seen in each."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.saw(out)
                return out

        self.mode = _Mode()
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.now = 0
        self.phase = "setup"
        self.peaks: dict[str, int] = {}

    def add(self, st) -> None:
        key, n = id(st), st.nbytes()
        if n == 0 or key in self.sizes:
            return
        self.sizes[key] = n
        self.now += n
        self.refs[key] = weakref.ref(st, lambda _r, k=key: self._gone(k))

    def _gone(self, key: int) -> None:
        self.now -= self.sizes.pop(key, 0)
        self.refs.pop(key, None)

    def saw(self, out) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t.untyped_storage())
        if self.now > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = self.now

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.peaks[phase] = max(self.peaks.get(phase, 0), self.now)

    def bytes_of(self, tensors) -> int:
        seen = {}
        for t in tensors:
            if t is not None:
                st = t.untyped_storage()
                seen[id(st)] = st.nbytes()
        return sum(seen.values())


# ---------------------------------------------------------------------------- the model
def build_config(job: dict):
    """The architecture of config.json, with ``layers`` decoder layers when given."""
    from transformers import AutoConfig

    fields = {k: v for k, v in json.loads(json.dumps(job["config"])).items() if k not in DROP_KEYS}
    text = fields.get("text_config") if isinstance(fields.get("text_config"), dict) else fields
    layers = job.get("layers")
    if layers:
        text["num_hidden_layers"] = layers
        for key in ("layer_types",):
            if isinstance(text.get(key), list):
                text[key] = text[key][:layers]
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None:
            c.use_cache = False
    return cfg


def is_vision(name: str) -> bool:
    return any(k in name.split(".") or f"{k}." in name for k in VISION_KEYS)


def lora_targets(model) -> list[str]:
    """LF's ``lora_target: all``: every linear but lm_head and the vision side (LF's own finder when
    LLaMA-Factory is installed)."""
    try:
        from llamafactory.model.model_utils.misc import find_all_linear_modules

        return find_all_linear_modules(model, freeze_vision_tower=True)
    except ImportError:
        names = set()
        for name, module in model.named_modules():
            if "lm_head" in name or is_vision(name):
                continue
            if "Linear" in type(module).__name__ and "Embedding" not in type(module).__name__:
                names.add(name.split(".")[-1])
        return sorted(names)


def add_lora(model, job: dict):
    """peft's LoRA as LF configures it (alpha 2r, no dropout), adapters in the stage's dtype."""
    import torch
    from peft import LoraConfig, get_peft_model

    rank = job.get("lora_rank", 8)
    saved_to = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *a, **k: self  # peft moves adapters to the weights' device; fake ones cannot
    try:
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                 target_modules=lora_targets(model), task_type="CAUSAL_LM"))
    finally:
        torch.nn.Module.to = saved_to
    dtype = torch.float32 if job.get("zero", 2) == 3 else torch.bfloat16
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def set_trainable(model, job: dict) -> None:
    """full: everything but the vision side; freeze: the last N decoder layers (first -N for N < 0)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    layers = cfg.num_hidden_layers
    n = job.get("freeze_trainable_layers", 2)
    ids = range(layers - n, layers) if n > 0 else range(-n)
    for name, p in model.named_parameters():
        if is_vision(name):
            p.requires_grad_(False)
        elif job["method"] == "freeze":
            p.requires_grad_(any(f"layers.{i}." in name for i in ids))
        else:
            p.requires_grad_(True)


def _only_trainable_layers(gc_func):
    """LF's wrapper (``get_custom_gradient_checkpointing_func``): checkpoint only layers that train, and
    make their hidden-state input require grad."""
    import torch

    def wrapped(func, *args, **kwargs):
        module = func.func.__self__ if isinstance(func, functools.partial) else func.__self__
        if any(p.requires_grad for p in module.parameters()):
            for arg in args:
                if torch.is_tensor(arg) and torch.is_floating_point(arg):
                    arg.requires_grad_(True)
                    break
            return gc_func(func, *args, **kwargs)
        return func(*args, **kwargs)

    return wrapped


def enable_gc(model) -> None:
    """LF's gradient checkpointing: reentrant, only the layers that train."""
    from torch.utils.checkpoint import checkpoint

    try:
        from llamafactory.model.model_utils.checkpointing import get_custom_gradient_checkpointing_func as wrap
    except ImportError:
        wrap = _only_trainable_layers
    model._set_gradient_checkpointing(enable=True,
                                      gradient_checkpointing_func=wrap(functools.partial(checkpoint,
                                                                                         use_reentrant=True)))


def build_model(job: dict):
    """The model in the real path's state (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = build_config(job)
    vlm = getattr(cfg, "vision_config", None) is not None
    cls = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    model = cls.from_config(cfg, dtype=torch.bfloat16, attn_implementation=job.get("attention", "sdpa"))
    if job.get("gradient_checkpointing", True):
        enable_gc(model)
    if job["method"] in ("lora", "qlora"):
        for p in model.parameters():
            p.requires_grad_(False)
        model = add_lora(model, job)
    else:
        set_trainable(model, job)
    model.train()
    return model, cfg


# ---------------------------------------------------------------------------- the losses
def batch_logps(logits, labels):
    """LF's ``get_batch_logps`` (its own when installed): summed log-probabilities of the labels."""
    try:
        from llamafactory.train.trainer_utils import get_batch_logps

        return get_batch_logps(logits=logits, labels=labels)
    except ImportError:
        import torch

        labels = labels[:, 1:].clone()
        logits = logits[:, :-1, :]
        mask = labels != -100
        labels[labels == -100] = 0
        per_token = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
        return (per_token * mask).sum(-1), mask.sum(-1)


def _policy_logits(model, ids):
    """LF's preference trainers: the model's logits upcast to fp32 (``.logits.to(torch.float32)``)."""
    import torch

    return model(input_ids=ids, return_dict=True, use_cache=False).logits.to(torch.float32)


def _reference(model, job):
    """The reference LF uses: the adapter-free base for LoRA, else a second frozen copy."""
    import contextlib

    if job["method"] in ("lora", "qlora"):
        return model, model.disable_adapter()
    return job["_ref_model"], contextlib.nullcontext()


def dpo_loss(model, ids, job):
    """LF's DPO step (``train/dpo/trainer.py``): the chosen and rejected rows concatenated, the policy's fp32
    logits kept (their chosen/rejected views are returned for metrics) while the reference runs without
    grad, then the sigmoid loss."""
    import torch
    import torch.nn.functional as F

    logits = _policy_logits(model, ids)
    logps, _ = batch_logps(logits, ids)
    pc, pr = logps.chunk(2)
    if not job.get("reference", True):  # orpo, simpo: no reference model
        return -F.logsigmoid(0.1 * (pc - pr)).mean()
    ref_model, ctx = _reference(model, job)
    with torch.no_grad(), ctx:
        ref_logps, _ = batch_logps(_policy_logits(ref_model, ids), ids)
    rc, rr = ref_logps.chunk(2)
    loss = -F.logsigmoid(0.1 * ((pc - pr) - (rc - rr))).mean()
    del logits
    return loss


def kto_loss(model, ids, job):
    """LF's KTO step (``train/kto/trainer.py``): the target forward, a no-grad forward over the KL batch (same
    size), chosen/rejected copies of the fp32 logits (index copies here, a boolean mask in LF), then the
    reference's two no-grad forwards."""
    import torch

    b = ids.shape[0]
    k = max(1, b // 2)
    logits = _policy_logits(model, ids)
    logps, _ = batch_logps(logits, ids)
    with torch.no_grad():
        kl_logps, _ = batch_logps(_policy_logits(model, ids), ids)
    chosen = torch.arange(0, k)
    rejected = torch.arange(k, b)
    held = (logits.index_select(0, chosen), logits.index_select(0, rejected))
    ref_model, ctx = _reference(model, job)
    with torch.no_grad(), ctx:
        ref_logps, _ = batch_logps(_policy_logits(ref_model, ids), ids)
        ref_kl, _ = batch_logps(_policy_logits(ref_model, ids), ids)
    kl = (kl_logps - ref_kl).mean().clamp(min=0)
    loss = (1 - torch.sigmoid(0.1 * ((logps - ref_logps) - kl))).mean()
    del logits, held
    return loss


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def fused_linear_ce():
    """An emulation of Liger's fused linear cross-entropy: logits one chunk of rows at a time (Liger's
    chunk: next_pow2(rows / ceil(vocab / hidden))), the input and weight gradients made in forward
    and saved for backward; the full logits never exist."""
    import torch

    class FusedLinearCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, labels):
            t, h = hidden.shape
            v = weight.shape[0]
            chunk = min(t, _next_pow2(math.ceil(t / math.ceil(v / h))))
            grad_in = torch.zeros_like(hidden)
            grad_w = torch.zeros_like(weight) if weight.requires_grad else None
            loss = torch.zeros((), dtype=torch.float32)
            for s in range(0, t, chunk):
                x = hidden[s:s + chunk]
                logits = x @ weight.t()
                lse = torch.logsumexp(logits.float(), dim=-1)
                loss = loss + (lse - logits.float().gather(1, labels[s:s + chunk, None]).squeeze(1)).sum()
                logits = torch.softmax(logits.float(), dim=-1).to(hidden.dtype)  # the gradient, in place in Liger
                grad_in[s:s + chunk] = logits @ weight
                if grad_w is not None:
                    grad_w += logits.t() @ x
                del logits
            ctx.save_for_backward(grad_in, grad_w)
            return loss / t

        @staticmethod
        def backward(ctx, grad_out):
            grad_in, grad_w = ctx.saved_tensors
            return grad_in * grad_out, (grad_w * grad_out if grad_w is not None else None), None

    return FusedLinearCE


def liger_loss(model, ids, job):
    """pt/sft with ``enable_liger_kernel``: the decoder's hidden states into the fused loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    head = base.get_output_embeddings().weight
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return fused_linear_ce().apply(rows, head, ids[:, 1:].reshape(-1))


def step_loss(model, ids, job):
    if job.get("stage", "sft") == "dpo":
        return dpo_loss(model, ids, job)
    if job.get("stage") == "kto":
        return kto_loss(model, ids, job)
    if job.get("liger"):
        return liger_loss(model, ids, job)
    return model(input_ids=ids, labels=ids).loss


# ---------------------------------------------------------------------------- DeepSpeed's states
class ZeroStates:
    """DeepSpeed's optimizer-side tensors of one rank, laid out as ``stage_1_and_2.py``/``stage3.py`` lay
    them out (module docstring), around the real torch optimizer HF builds."""

    def __init__(self, params: list, job: dict):
        import torch

        self.params = params
        self.stage = job.get("zero", 2)
        n = max(1, job.get("world_size", 1))
        total = sum(p.numel() for p in params)
        self.part = math.ceil(total / n)
        offsets, acc = [], 0
        for p in params:  # the rank's partition: the first ``part`` elements of the flat group
            offsets.append(acc)
            acc += p.numel()
        self.offset = dict(zip(map(id, params), offsets))
        self.bucket_elems = int(job.get("reduce_bucket") or 0)
        self.master = torch.zeros(self.part, dtype=torch.float32)
        fused = job.get("optim", "adamw_torch_fused") in FUSED_OPTIMIZERS
        self.opt = torch.optim.AdamW([self.master], lr=1e-5, fused=fused, foreach=not fused)
        self.grads = None  # the 16-bit gradient partition: ZeRO-2 makes it in backward, ZeRO-3 at init
        self.bucket = None  # the reduce bucket: ZeRO-2 makes it in backward, ZeRO-3 at init
        if self.stage == 3:
            self.grads = torch.zeros(self.part, dtype=torch.bfloat16)
            self.bucket = torch.empty(self.bucket_elems, dtype=torch.bfloat16) if self.bucket_elems else None
        for p in params:
            p.register_post_accumulate_grad_hook(self.on_grad)

    def on_grad(self, p) -> None:
        """A parameter's gradient is ready: through the bucket into this rank's partition, or dropped."""
        import torch

        if self.bucket is None and self.bucket_elems:
            self.bucket = torch.empty(self.bucket_elems, dtype=torch.bfloat16)
        if self.grads is None:
            self.grads = torch.zeros(self.part, dtype=torch.bfloat16)
        start = self.offset[id(p)]
        size = min(p.numel(), self.part - start)
        if size > 0:
            self.grads[start:start + size].copy_(p.grad.reshape(-1)[:size])
        p.grad = None

    def step(self) -> None:
        """Flatten the 16-bit partition (a copy), upcast it to the fp32 gradient, run the optimizer on the
        fp32 master partition.  ZeRO-2 then frees its partition and bucket; ZeRO-3 keeps both."""
        if self.grads is None:
            return
        flat = self.grads.clone()  # flatten() of the partition's gradients
        self.master.grad = flat.float()
        del flat
        if self.stage == 2:
            self.grads = None  # free_grad_in_param_list, after the fp32 copy is made
        self.opt.step()
        self.master.grad = None
        if self.stage == 2:
            self.bucket = None  # measured: the bucket made in backward is still alive at the step


# ---------------------------------------------------------------------------- one step
def _reference_copy(job: dict):
    """Full/freeze DPO and KTO: LF loads the reference as a second frozen model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    cfg = build_config(job)
    cls = AutoModelForImageTextToText if getattr(cfg, "vision_config", None) is not None else AutoModelForCausalLM
    ref = cls.from_config(cfg, dtype=torch.bfloat16, attn_implementation=job.get("attention", "sdpa"))
    ref.requires_grad_(False)
    return ref.eval()


def _vocab(cfg) -> int:
    text = getattr(cfg, "text_config", None) or cfg
    return text.vocab_size


def _one_step(model, zero, ids, job, tracker) -> None:
    tracker.enter("forward")
    loss = step_loss(model, ids, job)
    tracker.enter("backward")
    loss.backward()
    del loss
    tracker.enter("step")
    zero.step()
    tracker.enter("after")


def run_job(job: dict) -> dict:
    """Two steps (the second with Adam's states in place); the second is measured."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.time()
    tracker = LiveBytes()
    with FakeTensorMode(), tracker.mode:
        model, cfg = build_model(job)
        if job.get("stage") in ("dpo", "kto") and job["method"] not in ("lora", "qlora") and job.get("reference", True):
            job = dict(job, _ref_model=_reference_copy(job))
        trainable = [p for p in model.parameters() if p.requires_grad]
        zero = ZeroStates(trainable, job)
        rows = job.get("micro_batch", 1) * (2 if job.get("stage") == "dpo" else 1)
        ids = torch.randint(0, min(_vocab(cfg), 1000), (rows, job["seq_len"]))
        _one_step(model, zero, ids, job, tracker)
        params = list(model.parameters()) + (list(job["_ref_model"].parameters()) if "_ref_model" in job else [])
        states = [zero.master] + [v for s in zero.opt.state.values() for v in s.values() if torch.is_tensor(v)]
        result = {"weights": tracker.bytes_of(p.data for p in model.parameters()),
                  "ref_weights": tracker.bytes_of(p.data for p in params) - tracker.bytes_of(
                      p.data for p in model.parameters()),
                  "trainable": sum(p.numel() for p in trainable), "states": tracker.bytes_of(states),
                  "baseline": tracker.now}
        tracker.peaks = {}
        _one_step(model, zero, ids, job, tracker)
    result.update(peaks=dict(tracker.peaks), end=tracker.now, seconds=round(time.time() - t0, 1))
    return result


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "llamafactory"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main() -> int:
    jobs = json.loads(sys.stdin.read() or "[]")
    for job in jobs:
        try:
            out = {"ok": True, **run_job(job), "versions": versions()}
        except Exception as e:  # noqa: BLE001 - reported to the caller, one line per job
            out = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
                   "trace": traceback.format_exc(limit=4)[-1500:]}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
