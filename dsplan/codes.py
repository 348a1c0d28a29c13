"""Every name dsplan hands to a person or a script, one table each.

Verdicts (what a log proves), exit codes, why an attempt ended, and the names of
the estimate's components.  Each is an enum whose members compare equal to, and
serialise as, their plain value (``Verdict.GPU_OOM == "gpu_oom"``, ``json.dumps``
gives ``"gpu_oom"``), so ledgers and JSON output written by earlier versions
still read the same.  The README's tables are checked against these by
``tests/test_codes.py``.

Standard library only: imported by every command, the login-node ones included.
"""

from __future__ import annotations

from enum import Enum, IntEnum


class _Code(str, Enum):
    """A string enum that prints and formats as its value."""

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def help(self) -> str:
        # One table per enum: members of different enums may share a value ("stalled").
        return _HELP[type(self).__name__][self.value]


class Verdict(_Code):
    """Why an attempt (or a saved log) ended."""

    GPU_OOM = "gpu_oom"
    HOST_OOM = "host_oom"
    NOT_OOM = "not_oom"
    SUCCESS = "success"
    STALLED = "stalled"
    INTERRUPTED = "interrupted"
    UNKNOWN = "unknown"


#: Verdicts that mean memory ran out: the launcher ends the attempt at once and falls back.
OOM_VERDICTS = frozenset({Verdict.GPU_OOM, Verdict.HOST_OOM})


class ExitCode(IntEnum):
    """dsplan's exit status, the same for every command (see the README's table)."""

    SUCCESS = 0
    FAILED = 1
    USAGE = 2
    EXHAUSTED = 3
    NOTHING_FITS = 4
    STALLED = 5
    OS_ERROR = 6
    INTERRUPTED = 130

    @property
    def help(self) -> str:
        return _EXIT_HELP[self]


class EndReason(_Code):
    """Why dsplan itself ended an attempt's processes (``exited``: it ended on its own)."""

    EXITED = "exited"
    OOM = "oom"
    STALLED = "stalled"
    INTERRUPTED = "interrupted"
    LEFTOVERS = "leftovers"


class Component(_Code):
    """Named parts of a per-GPU estimate (``breakdown`` in ``plan --json``)."""

    WEIGHTS = "weights"
    GRADIENTS = "gradients"
    OPTIMIZER = "optimizer"
    ZERO3_GATHER = "zero3_gather"
    ZERO3_LIVE = "zero3_live"
    ACTIVATIONS = "activations"
    LOGITS = "logits"
    DEQUANT_WORKSPACE = "dequant_workspace"
    OPTIMIZER_STEP = "optimizer_step"
    DS_BUFFERS = "ds_buffers"
    LOAD_UPCAST = "load_upcast"
    REF_MODEL = "ref_model"
    REWARD_MODEL = "reward_model"
    REF_FORWARD = "ref_forward"
    KL_FORWARD = "kl_forward"
    KV_CACHE = "kv_cache"
    GENERATION_GATHER = "generation_gather"
    ATTENTION_MASK = "attention_mask"
    DORA_WORKSPACE = "dora_workspace"
    OVERHEAD = "overhead"


class HostComponent(_Code):
    """Named parts of a per-node host estimate (``host_breakdown`` in ``plan --json``)."""

    PROCESSES = "processes"
    CHECKPOINT_CACHE = "checkpoint_cache"
    OPTIMIZER_OFFLOAD = "optimizer_offload"
    PARAM_OFFLOAD = "param_offload"
    PAGED_OPTIMIZER = "paged_optimizer"


_HELP: dict[str, dict[str, str]] = {
    "Verdict": {
        Verdict.GPU_OOM.value: "accelerator memory ran out (CUDA, HIP/ROCm and DCU, NPU, XPU, MPS)",
        Verdict.HOST_OOM.value: "host RAM ran out (allocator failure, MemoryError, a rank killed by SIGKILL)",
        Verdict.NOT_OOM.value: "the run failed for another reason; dsplan does not fall back",
        Verdict.SUCCESS.value: "training finished",
        Verdict.STALLED.value: "no output and no training step for --stall-timeout seconds; the watchdog ended it",
        Verdict.INTERRUPTED.value: "Ctrl-C or a signal to dsplan stopped the attempt",
        Verdict.UNKNOWN.value: "the log decides nothing (no error, no OOM, no completion marker)",
    },
    "EndReason": {
        EndReason.EXITED.value: "the training command exited by itself",
        EndReason.OOM.value: "a line proved an out-of-memory death; every rank was killed",
        EndReason.STALLED.value: "the watchdog saw no output and no step for too long",
        EndReason.INTERRUPTED.value: "a stop was requested (a signal to dsplan)",
        EndReason.LEFTOVERS.value: "the command exited but left processes holding its output; they were killed",
    },
    "Component": {
        Component.WEIGHTS.value: "the 16-bit (or quantized) base weights and adapters held on the GPU",
        Component.GRADIENTS.value: "ZeRO-2's 16-bit gradient partition",
        Component.OPTIMIZER.value: "fp32 gradients, master weights and Adam states of the GPU's partition",
        Component.ZERO3_GATHER.value: "the largest layer gathered for use under ZeRO-3",
        Component.ZERO3_LIVE.value: "gathered parameters ZeRO-3 keeps alive (stage3_max_live_parameters)",
        Component.ACTIVATIONS.value: "saved activations at the step's peak",
        Component.LOGITS.value: "fp32 logits, log-softmax and their gradient at the loss (Liger: its chunked loss)",
        Component.DEQUANT_WORKSPACE.value: "one linear dequantized to 16-bit for a QLoRA matmul",
        Component.OPTIMIZER_STEP.value: "the foreach AdamW temporary beyond what activations freed",
        Component.DS_BUFFERS.value: "DeepSpeed's reduce, allgather and prefetch buckets",
        Component.LOAD_UPCAST.value: "LLaMA-Factory's fp32 upcast of trainable weights at load time (ZeRO-2)",
        Component.REF_MODEL.value: "the reference model's copy (DPO/KTO/PPO): sharded at ZeRO-3, whole otherwise",
        Component.REWARD_MODEL.value: "PPO's reward model: its adapter on the policy, or a copy placed like ref_model",
        Component.REF_FORWARD.value: "the reference's no-grad forward (its fp32 logits) at the step's peak",
        Component.KL_FORWARD.value: "KTO's no-grad forward over the KL batch (its fp32 logits) at the step's peak",
        Component.KV_CACHE.value: "PPO's key/value cache while generating up to max_new_tokens",
        Component.GENERATION_GATHER.value: "the whole policy gathered on each GPU for PPO's generation at ZeRO-3",
        Component.ATTENTION_MASK.value: "neat_packing's micro-batch x cutoff^2 attention mask (without fa2)",
        Component.DORA_WORKSPACE.value: "DoRA's weight-norm workspace: the identity, B@A and W + B@A of one linear",
        Component.OVERHEAD.value: "CUDA/HIP context, NCCL/RCCL buffers and allocator slack",
    },
    "HostComponent": {
        HostComponent.PROCESSES.value: "Python, torch and the libraries of each rank on the node",
        HostComponent.CHECKPOINT_CACHE.value: "the 16-bit checkpoint read once into the page cache",
        HostComponent.OPTIMIZER_OFFLOAD.value: "offloaded optimizer states with pinned buffers",
        HostComponent.PARAM_OFFLOAD.value: "offloaded ZeRO-3 parameters with pinned buffers",
        HostComponent.PAGED_OPTIMIZER.value: "paged optimizer states evicted to host memory",
    },
}

_EXIT_HELP: dict[ExitCode, str] = {
    ExitCode.SUCCESS: "success",
    ExitCode.FAILED: "`run`: the training failed for a reason other than memory (`not_oom`); "
                      "`validate`: a file failed",
    ExitCode.USAGE: "usage error: bad `--gpus`, unknown tier or preset, missing model folder, malformed YAML. "
                    "One line on stderr, nothing written",
    ExitCode.EXHAUSTED: "`run`: OOM with nothing left to fall back to, `--max-attempts` reached, or "
                        "`--no-fallback`; `validate --strict`: validators not installed",
    ExitCode.NOTHING_FITS: "`plan`/`run`: nothing fits this hardware (and no `--tier` given)",
    ExitCode.STALLED: "`run`: stalled (the watchdog fired)",
    ExitCode.OS_ERROR: "`run`: the system refused a file operation or the launch mid-run (disk full, a file turned "
                       "read-only, an `--lf-cli` that cannot be executed). One line on stderr; earlier attempts "
                       "stay recorded. Any command: a file operation the system refused that no nearer check "
                       "caught (one line)",
    ExitCode.INTERRUPTED: "`run`: interrupted (Ctrl-C / SIGTERM)",
}

#: The exit code ``dsplan run`` ends with after an attempt with this verdict, when it does not fall back.
EXIT_FOR_VERDICT: dict[Verdict, ExitCode] = {
    Verdict.SUCCESS: ExitCode.SUCCESS,
    Verdict.NOT_OOM: ExitCode.FAILED,
    Verdict.UNKNOWN: ExitCode.FAILED,
    Verdict.GPU_OOM: ExitCode.EXHAUSTED,
    Verdict.HOST_OOM: ExitCode.EXHAUSTED,
    Verdict.STALLED: ExitCode.STALLED,
    Verdict.INTERRUPTED: ExitCode.INTERRUPTED,
}
