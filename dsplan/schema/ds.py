"""The DeepSpeed config dsplan writes, block by block, under DeepSpeed's own key names.

One frozen dataclass per JSON block (``zero_optimization``, its ``offload_*``
blocks, ``fp16``, ``bf16``, and the top level), each field carrying a help text
and, in ``zero_optimization``, the ZeRO stages that read it.
Defaults are DeepSpeed 0.19.8's own (``deepspeed/runtime/zero/config.py``,
``runtime/zero/offload_config.py``, ``runtime/precision_config.py``) except where
a comment says otherwise; ``"auto"`` marks a value HF transformers fills in from
its TrainingArguments and the model before DeepSpeed sees the file.

The planner builds one :class:`DsConfig` per tier, the memory estimate reads its
bucket sizes, and ``templates/deepspeed.json.j2`` lays it out.  ``from_dict``
reads a block back and refuses keys it does not know, as DeepSpeed's pydantic
models do.  Standard library only: the login-node commands import it.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar, Mapping, TypeVar, Union

AUTO = "auto"
#: An element count or HF's ``"auto"``.
Count = Union[int, str]

_B = TypeVar("_B", bound="_Block")


def _f(default: Any, help: str, stages: tuple[int, ...] | None = None) -> Any:
    """A field with its help text; ``stages``: the ZeRO stages it applies to (None: all)."""
    return field(default=default, metadata={"help": help, "stages": stages})


class _Block:
    """Shared reading and writing of one JSON block."""

    #: JSON key -> block class, for the fields that hold a nested block.
    _nested: ClassVar[dict[str, type]] = {}
    #: Where the block sits in the file, for error messages.
    _where: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[_B], data: Mapping[str, Any]) -> _B:
        """Build the block from its JSON form; a key DeepSpeed would not find here is refused."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls._where or 'config'}: expected an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls._where or 'config'}: unknown key(s) {', '.join(unknown)}")
        values = {}
        for key, value in data.items():
            sub = cls._nested.get(key)
            values[key] = sub.from_dict(value) if sub is not None and value is not None else value
        return cls(**values)

    def _applies(self, f: Field) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, in field order; absent blocks (None) and keys that do not apply are left out."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None or not self._applies(f):
                continue
            out[f.name] = value.to_dict() if isinstance(value, _Block) else value
        return out

    @classmethod
    def help(cls) -> dict[str, str]:
        """Each key's help text, with the ZeRO stages it applies to."""
        out = {}
        for f in fields(cls):  # type: ignore[arg-type]
            stages = f.metadata.get("stages")
            where = f"ZeRO-{'/'.join(map(str, stages))} only: " if stages else ""
            out[f.name] = where + f.metadata.get("help", "")
        return out


@dataclass(frozen=True)
class Offload(_Block):
    """``offload_optimizer`` / ``offload_param``: where ZeRO keeps states between uses."""

    _where: ClassVar[str] = "zero_optimization.offload_*"

    device: str = _f("cpu", "cpu or nvme (DeepSpeed's default is none: no offload)")
    pin_memory: bool = _f(True, "page-locked host buffers: fast copies, but never swapped out")


@dataclass(frozen=True)
class Fp16(_Block):
    """``fp16``: dynamic loss scaling, used only when HF turns fp16 on."""

    _where: ClassVar[str] = "fp16"

    enabled: Union[bool, str] = _f(AUTO, "HF sets it from --fp16")
    loss_scale: float = _f(0, "0 = dynamic loss scaling; any other value is a fixed scale")
    loss_scale_window: int = _f(1000, "steps without overflow before the scale is raised")
    initial_scale_power: int = _f(16, "the dynamic scale starts at 2**N")
    hysteresis: int = _f(2, "overflows tolerated before the scale is lowered")
    min_loss_scale: int = _f(1, "the dynamic scale never goes below this")


@dataclass(frozen=True)
class Bf16(_Block):
    """``bf16``: nothing to tune; HF turns it on from --bf16."""

    _where: ClassVar[str] = "bf16"

    enabled: Union[bool, str] = _f(AUTO, "HF sets it from --bf16")


#: The ZeRO stages a key is read at.
_Z12, _Z3 = (1, 2), (3,)


@dataclass(frozen=True)
class ZeroOptimization(_Block):
    """``zero_optimization``: the ZeRO stage, its offloads and the sizes of its buffers (elements)."""

    _where: ClassVar[str] = "zero_optimization"
    _nested: ClassVar[dict[str, type]] = {"offload_optimizer": Offload, "offload_param": Offload}

    stage: int = _f(0, "0 off, 1 optimizer states, 2 + gradients, 3 + parameters sharded")
    offload_optimizer: Offload | None = _f(None, "optimizer states and fp32 master weights in host memory")
    offload_param: Offload | None = _f(None, "16-bit parameters in host memory between uses", _Z3)
    allgather_partitions: bool = _f(True, "one allgather (not broadcasts) of updated weights", _Z12)
    allgather_bucket_size: int = _f(500_000_000, "elements allgathered at a time", _Z12)
    reduce_scatter: bool = _f(True, "average gradients by reduce-scatter rather than allreduce", _Z12)
    round_robin_gradients: bool = _f(True, "spread gradient copies across ranks (dsplan turns it on)", _Z12)
    sub_group_size: int = _f(1_000_000_000, "elements per optimizer-step tile", _Z3)
    stage3_prefetch_bucket_size: Count = _f(AUTO, "elements fetched ahead; HF: 0.9 x hidden^2", _Z3)
    stage3_param_persistence_threshold: Count = _f(AUTO, "smaller params stay gathered; HF: 10 x hidden", _Z3)
    stage3_max_live_parameters: int = _f(1_000_000_000, "gathered elements kept before release", _Z3)
    stage3_max_reuse_distance: int = _f(1_000_000_000, "keep a param gathered if reused within this", _Z3)
    stage3_gather_16bit_weights_on_model_save: bool = _f(
        True, "save a whole 16-bit model, not only shards (dsplan turns it on)", _Z3)
    overlap_comm: bool = _f(False, "overlap gradient reduction with backward; costs extra buckets "
                                   "(DeepSpeed's default: on at ZeRO-3 only)")
    contiguous_gradients: bool = _f(True, "copy gradients into one buffer as they are made")
    reduce_bucket_size: Count = _f(AUTO, "elements reduced at a time; HF: hidden^2")

    def _applies(self, f: Field) -> bool:
        stages = f.metadata.get("stages")
        return stages is None or self.stage in stages


@dataclass(frozen=True)
class DsConfig(_Block):
    """A whole DeepSpeed config as dsplan writes it.  No ``optimizer`` block: the Trainer builds
    HF's AdamW, and when the optimizer is offloaded accelerate replaces it with DeepSpeed's CPU
    Adam (``map_pytorch_optim_to_deepspeed`` in ``accelerate/utils/deepspeed.py``)."""

    _nested: ClassVar[dict[str, type]] = {"fp16": Fp16, "bf16": Bf16, "zero_optimization": ZeroOptimization}

    train_batch_size: Count = _f(AUTO, "HF: micro-batch x accumulation x world size")
    train_micro_batch_size_per_gpu: Count = _f(AUTO, "HF: per_device_train_batch_size")
    gradient_accumulation_steps: Count = _f(AUTO, "HF: gradient_accumulation_steps")
    gradient_clipping: Union[float, str] = _f(AUTO, "HF: max_grad_norm")
    zero_allow_untested_optimizer: bool = _f(True, "let ZeRO wrap HF's torch AdamW")
    fp16: Fp16 = _f(Fp16(), "fp16 loss scaling")
    bf16: Bf16 = _f(Bf16(), "bf16 switch")
    zero_optimization: ZeroOptimization = _f(ZeroOptimization(), "ZeRO stage, offloads and buffers")


def resolve_auto(value: Count, filled: float) -> float:
    """A count as DeepSpeed will see it: ``filled`` stands for what HF writes over ``"auto"``."""
    return filled if value == AUTO else value
