"""The memory estimate of one tier: peak bytes per GPU and per host node, as named parts.

Third stage of the data flow (hardware profile -> model spec -> **memory estimate**
-> plan).  :func:`estimate` adds up the terms of :mod:`~dsplan.estimate.model_states`
(the policy's states and the stage's reference and reward models), of
:mod:`~dsplan.estimate.stages` (the transients of the step's peak phase, built on
:mod:`~dsplan.estimate.activations`) and the ones that live here:

- DeepSpeed's buffers, sized by the same :class:`ZeroOptimization` the renderer
  writes: the reduce bucket (``reduce_bucket_size``, HF fills in hidden^2) at both
  stages, ZeRO-2's allgather bucket (``allgather_bucket_size``), ZeRO-3's prefetch
  bucket (``stage3_prefetch_bucket_size``, HF fills in 0.9 hidden^2); 16-bit each.
- runtime overhead: the CUDA/HIP context and libraries, NCCL/RCCL buffers, and
  allocator slack as a fraction of the memory that comes and goes.
- one linear dequantized to 16-bit for its matmul, when the base weights are quantized
  (on the fly, or a checkpoint that ships quantized).
- host RAM per node: each rank's process, each 16-bit checkpoint read (the model, a
  ``ref_model`` given, a full reward model) in the page cache, and offloaded states.
  DeepSpeed's estimators add 50 % to offloaded states for pinned buffers (kept
  here).  Its ZeRO-2 host formula also charges every rank an fp32 copy of the whole
  model at start-up; LLaMA-Factory loads 16-bit weights straight to the GPU, so
  dsplan charges each 16-bit checkpoint once per node instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsplan.codes import Component, HostComponent
from dsplan.estimate.activations import dequant_workspace_bytes
from dsplan.estimate.model_states import load_upcast_excess, model_states, optimizer_step_excess, side_model_states
from dsplan.estimate.stages import step_transients
from dsplan.estimate.workload import Workload, adapter_bytes, linear_weight_bytes, trainable_params, weight_bytes
from dsplan.inputs.hardware import HardwareProfile
from dsplan.inputs.model import ModelSpec
from dsplan.plan.tiers import Tier
from dsplan.schema.ds import ZeroOptimization, resolve_auto
from dsplan.units import GiB

#: GPU runtime: context + libraries (cuBLAS/hipBLAS workspaces), per backend.
CONTEXT_BYTES = {"cuda": int(0.75 * GiB), "rocm": int(1.0 * GiB), "dcu": int(1.0 * GiB)}
NCCL_BYTES = int(0.5 * GiB)
#: Allocator slack as a fraction of transient memory, per ZeRO stage: PyTorch's caching
#: allocator keeps what it reserved at each phase's peak, and ZeRO-3's gather/release of
#: differently sized parameters fragments it further.  Not measured on a GPU by this
#: project; set so LLaMA-Factory issue 5977's measured ~13 GB (ZeRO-3 + offload) is not
#: underestimated by more than ~20 %.  A site calibration (``dsplan calibrate``,
#: :mod:`dsplan.learn.calibration`) replaces these three with fitted values per card.
SLACK = {2: 0.15, 3: 0.50}
#: HF's fill for an "auto" ZeRO-3 prefetch bucket, x hidden^2.
PREFETCH_PER_H2 = 0.9
#: Host: per rank process baseline (Python, torch, CUDA libs, dataloader workers).
HOST_PER_RANK = int(3.0 * GiB)
#: Host: DeepSpeed's own estimator adds 50 % to offloaded states for pinned buffers.
HOST_OFFLOAD_FACTOR = 1.5
#: Host: offloaded optimizer bytes per trainable parameter (fp32 grad, master, m, v).
OFFLOADED_STATE_BYTES = 16.0


@dataclass(frozen=True)
class Runtime:
    """The runtime overhead's coefficients: ``context_bytes`` (context and libraries per GPU),
    ``nccl_bytes`` (communication buffers, more than one GPU), ``slack`` (allocator slack
    as a fraction of transient memory, per ZeRO stage) and ``extra_bytes`` (memory the
    caching allocator held beyond the modelled parts, fitted from measured peaks; 0 by
    default).  Context and NCCL buffers live outside PyTorch's caching allocator, so a
    measured ``max_memory_reserved`` never shows them: a calibration fits ``extra_bytes``
    and ``slack`` (:meth:`allocator`) and keeps the context.  ``headroom_shift`` raises
    the whole GPU estimate by that fraction (a calibration from too few runs to fit the
    coefficients records only this); it is counted in ``overhead``.  ``source`` says where
    they came from: ``default`` (the constants above) or the calibration file that holds them."""

    context_bytes: int
    nccl_bytes: int
    slack: dict[int, float]
    headroom_shift: float = 0.0
    source: str = "default"
    extra_bytes: int = 0

    @classmethod
    def default(cls, backend: str) -> Runtime:
        return cls(CONTEXT_BYTES[backend], NCCL_BYTES, dict(SLACK))

    def allocator(self, stage: int, transient: float) -> float:
        """The overhead a ``max_memory_reserved`` reading includes: fitted extra and allocator slack."""
        return self.extra_bytes + self.slack[stage] * transient

    def overhead(self, stage: int, transient: float, world_size: int, rest: float = 0.0) -> float:
        """Context, communication buffers (more than one GPU), the allocator's share, plus the
        headroom shift of everything (``rest``: the estimate's other components)."""
        fixed = self.context_bytes + (self.nccl_bytes if world_size > 1 else 0) + self.allocator(stage, transient)
        return fixed + self.headroom_shift * (rest + fixed)


@dataclass
class Estimate:
    """Peak bytes for one tier: per GPU and per host node, each as named parts.
    ``transient_bytes`` is the memory that comes and goes in a step, the amount the
    allocator slack of ``overhead`` is a fraction of."""

    tier: str
    gpu: dict[Component, int]
    host: dict[HostComponent, int]
    transient_bytes: int = 0

    @property
    def gpu_bytes(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())


def ds_buffer_bytes(spec: ModelSpec, tier: Tier, tp: int, zero: ZeroOptimization) -> float:
    """DeepSpeed's 16-bit buckets: reduce, plus allgather (ZeRO-2) or prefetch (ZeRO-3)."""
    h = spec.hidden_size
    buffers = 2.0 * resolve_auto(zero.reduce_bucket_size, h * h)
    if tier.stage == 2:
        buffers += 2.0 * min(zero.allgather_bucket_size, tp)
    else:
        buffers += 2.0 * resolve_auto(zero.stage3_prefetch_bucket_size, PREFETCH_PER_H2 * h * h)
    return buffers


def overhead_bytes(hw: HardwareProfile, tier: Tier, transient: float, runtime: Runtime | None = None,
                   rest: float = 0.0) -> float:
    """Context, communication buffers (more than one GPU) and allocator slack (``runtime``'s
    coefficients; dsplan's defaults for the backend when None); ``rest`` is the estimate's
    other components, which a calibrated headroom shift raises."""
    runtime = runtime if runtime is not None else Runtime.default(hw.backend)
    return runtime.overhead(tier.stage, transient, hw.world_size, rest)


def host_bytes(spec: ModelSpec, hw: HardwareProfile, tier: Tier, w: Workload,
               side_offload: float = 0.0) -> dict[HostComponent, float]:
    """Host RAM per node besides paged optimizer states; ``side_offload`` is the reference and
    reward models' offloaded parameters."""
    checkpoints = 1 + (w.reference == "copy" and w.ref_model is not None) + (w.reward == "copy")
    host = {
        HostComponent.PROCESSES: HOST_PER_RANK * hw.gpus_per_node,
        HostComponent.CHECKPOINT_CACHE: 2.0 * spec.total_params * checkpoints,  # each 16-bit checkpoint, read once
    }
    if tier.offload_optimizer:
        host[HostComponent.OPTIMIZER_OFFLOAD] = (HOST_OFFLOAD_FACTOR * OFFLOADED_STATE_BYTES
                                                 * trainable_params(spec, w) / hw.nodes)
    if tier.offload_param:
        host[HostComponent.PARAM_OFFLOAD] = (HOST_OFFLOAD_FACTOR * (weight_bytes(spec, w) + adapter_bytes(spec, w))
                                             / hw.nodes) + side_offload
    return host


def dequant_bytes(spec: ModelSpec, w: Workload) -> float:
    """One linear dequantized to 16-bit for its matmul: on-the-fly quantization or a pre-quantized
    checkpoint that stays quantized (0 otherwise)."""
    if linear_weight_bytes(spec, w) < 2.0:
        return dequant_workspace_bytes(spec, w) or 2.0 * max(a * b for a, b in spec.linear_shapes().values())
    return 0.0


def estimate(spec: ModelSpec, hw: HardwareProfile, tier: Tier, w: Workload,
             zero: ZeroOptimization | None = None, runtime: Runtime | None = None) -> Estimate:
    """Peak memory of one training step (and of model load) for this tier.  ``zero`` is the
    ``zero_optimization`` block the tier renders with (DeepSpeed's defaults if None);
    ``runtime`` the overhead's coefficients (dsplan's defaults for the backend if None)."""
    zero = zero if zero is not None else ZeroOptimization(stage=tier.stage)
    tp = trainable_params(spec, w)
    gpu, host = model_states(spec, hw, tier, w, zero)
    side, side_offload = side_model_states(spec, hw, tier, w)
    peak = step_transients(spec, hw, tier, w)
    gpu.update(peak)
    gpu.update(side)
    dequant = dequant_bytes(spec, w)
    if dequant:
        gpu[Component.DEQUANT_WORKSPACE] = dequant
    transients = sum(peak.values())
    step = optimizer_step_excess(tp, hw.world_size, tier, zero, transients, w.optim)
    if step > 0:
        gpu[Component.OPTIMIZER_STEP] = step
    buffers = ds_buffer_bytes(spec, tier, tp, zero)
    gpu[Component.DS_BUFFERS] = buffers
    upcast = load_upcast_excess(spec, tier, w, sum(gpu.values()))
    if upcast > 0:
        gpu[Component.LOAD_UPCAST] = upcast
    transient = (transients + buffers + gpu.get(Component.ZERO3_GATHER, 0.0)
                 + gpu.get(Component.ZERO3_LIVE, 0.0))
    gpu[Component.OVERHEAD] = overhead_bytes(hw, tier, transient, runtime, rest=sum(gpu.values()))
    host.update(host_bytes(spec, hw, tier, w, side_offload))
    return Estimate(tier=tier.name, gpu={k: int(v) for k, v in gpu.items()},
                    host={k: int(v) for k, v in host.items()}, transient_bytes=int(transient))
