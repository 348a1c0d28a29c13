"""Hardware profile: how many GPUs, how much memory each, which backend, how much host RAM.

This is the first stage of dsplan's data flow.  A profile comes from a ``--gpus``
spec (``8x64G``, ``2x8x80G``), from ``dsplan detect`` on the machine itself, or
from a preset; everything downstream (memory estimate, plan, render, launch)
reads only this object.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from dsplan.errors import UserError, excerpt
from dsplan.units import GiB, parse_size, size_token

BACKENDS = ("cuda", "rocm", "dcu")

#: The environment variable that masks devices, per backend.  Exactly one is set
#: by ``dsplan run``: HIP reads HIP_VISIBLE_DEVICES; CUDA_VISIBLE_DEVICES on a
#: ROCm build is honoured too, and setting both with different values confuses it.
DEVICE_MASK_VAR = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES", "dcu": "HIP_VISIBLE_DEVICES"}

#: The monitoring tool ``dsplan detect`` asks, per backend, in order of preference.
SMI_TOOLS = {"cuda": ("nvidia-smi",), "rocm": ("rocm-smi",), "dcu": ("hy-smi", "rocm-smi")}


@dataclass(frozen=True)
class GpuModel:
    """What dsplan needs to know about one GPU model."""

    name: str
    backend: str
    bf16: bool  # native bf16 matmul (Ampere+, CDNA2+, Hygon K100)
    flash_attn2: bool  # a FlashAttention-2 build exists for it
    source: str  # where the facts come from


# Facts from the vendors' data sheets; bf16 needs compute capability >= 8.0 on NVIDIA
# (Ampere), CDNA2 or newer on AMD; FlashAttention-2 supports sm80+ on NVIDIA and
# MI200/MI300 via the ROCm fork.  Hygon: K100 is sold with bf16 (DTK exposes it as a
# HIP device; the seed-003 user trains with --bf16 True), Z100 is fp16-only.
GPU_MODELS: dict[str, GpuModel] = {
    g.name.lower(): g
    for g in (
        GpuModel("V100", "cuda", False, False, "NVIDIA V100 data sheet: Volta, sm70, no bf16"),
        GpuModel("T4", "cuda", False, False, "NVIDIA T4 data sheet: Turing, sm75, no bf16"),
        GpuModel("2080Ti", "cuda", False, False, "Turing sm75, no bf16"),
        GpuModel("A10", "cuda", True, True, "Ampere sm86"),
        GpuModel("A30", "cuda", True, True, "Ampere sm80"),
        GpuModel("A40", "cuda", True, True, "Ampere sm86"),
        GpuModel("A100", "cuda", True, True, "Ampere sm80"),
        GpuModel("A800", "cuda", True, True, "Ampere sm80 (China SKU of A100)"),
        GpuModel("A6000", "cuda", True, True, "Ampere sm86"),
        GpuModel("3090", "cuda", True, True, "GeForce RTX 3090, Ampere sm86"),
        GpuModel("4090", "cuda", True, True, "GeForce RTX 4090, Ada sm89"),
        GpuModel("4080", "cuda", True, True, "GeForce RTX 4080, Ada sm89"),
        GpuModel("L4", "cuda", True, True, "Ada sm89"),
        GpuModel("L40S", "cuda", True, True, "Ada sm89"),
        GpuModel("H100", "cuda", True, True, "Hopper sm90"),
        GpuModel("H800", "cuda", True, True, "Hopper sm90 (China SKU of H100)"),
        GpuModel("H20", "cuda", True, True, "Hopper sm90"),
        GpuModel("H200", "cuda", True, True, "Hopper sm90"),
        GpuModel("MI100", "rocm", True, False, "AMD Instinct MI100, CDNA1: bf16 yes, no FA2 build"),
        GpuModel("MI210", "rocm", True, True, "AMD Instinct MI210, CDNA2"),
        GpuModel("MI250X", "rocm", True, True, "AMD Instinct MI250X, CDNA2: two 64 GiB GCDs per module"),
        GpuModel("MI300X", "rocm", True, True, "AMD Instinct MI300X, CDNA3"),
        GpuModel("K100", "dcu", True, False, "Hygon DCU K100 (K100_AI): bf16 yes; FA2 only via DTK's own build"),
        GpuModel("Z100", "dcu", False, False, "Hygon DCU Z100: fp16 only"),
    )
}


def find_gpu_model(name: str | None) -> GpuModel | None:
    """Match a free-form device name ("NVIDIA A100-SXM4-80GB", "K100_AI") to the table."""
    if not name:
        return None
    norm = re.sub(r"[\s_-]+", "", name).lower()
    best = None
    for key, model in GPU_MODELS.items():
        if key in norm and (best is None or len(key) > len(best.name)):
            best = model
    return best


@dataclass(frozen=True)
class HardwareProfile:
    """The hardware dsplan plans for.  Sizes are bytes; host RAM is per node."""

    nodes: int = field(metadata={"help": "number of nodes"})
    gpus_per_node: int = field(metadata={"help": "GPUs on each node"})
    gpu_mem: int = field(metadata={"help": "memory of one GPU, bytes"})
    backend: str = field(default="cuda", metadata={"help": "cuda, rocm or dcu (Hygon DCU runs ROCm/HIP)"})
    host_ram: int | None = field(default=None, metadata={"help": "host RAM per node, bytes; None = unknown"})
    gpu_name: str | None = field(default=None, metadata={"help": "GPU model, decides bf16 and attention"})
    cpu_cores: int | None = field(default=None, metadata={"help": "CPU cores per node, if known"})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"unknown backend {excerpt(self.backend)}: choose one of {', '.join(BACKENDS)}")
        check_counts(self.nodes, self.gpus_per_node)
        if not 0 < self.gpu_mem <= MAX_GPU_MEM:
            raise UserError(f"GPU memory must be more than 0 and at most {size_token(MAX_GPU_MEM)}")
        if self.host_ram is not None and not 0 < self.host_ram <= MAX_HOST_RAM:
            raise UserError(f"host RAM must be more than 0 and at most {size_token(MAX_HOST_RAM)} per node")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def gpu_model(self) -> GpuModel | None:
        return find_gpu_model(self.gpu_name)

    @property
    def bf16(self) -> bool:
        """Whether the GPUs do bf16.  Unknown models are assumed to (Ampere-era and later
        is what people fine-tune on); pass ``--gpu-name V100`` to get fp16."""
        model = self.gpu_model
        return True if model is None else model.bf16

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp16"

    @property
    def flash_attn(self) -> str:
        """LLaMA-Factory's ``flash_attn`` value: ``fa2`` only where a build is known to exist."""
        model = self.gpu_model
        if model is not None and model.flash_attn2:
            return "auto"
        return "sdpa"

    @property
    def device_mask_var(self) -> str:
        return DEVICE_MASK_VAR[self.backend]

    @property
    def spec(self) -> str:
        """The ``--gpus`` string that gives this profile back."""
        per = f"{self.gpus_per_node}x{size_token(self.gpu_mem)}"
        return per if self.nodes == 1 else f"{self.nodes}x{per}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(spec=self.spec, world_size=self.world_size, precision=self.precision)
        return d

    def describe(self) -> str:
        name = f" {self.gpu_name}" if self.gpu_name else ""
        host = f", host RAM {self.host_ram / GiB:.0f} GiB/node" if self.host_ram else ""
        return f"{self.spec}{name} ({self.backend}, {self.precision}){host}"


#: The largest hardware dsplan plans for; anything larger is a typo.
MAX_NODES = 1024
MAX_GPUS_PER_NODE = 64
MAX_GPU_MEM = 2 * 1024 * GiB
MAX_HOST_RAM = 64 * 1024 * GiB
#: A --gpus string is at most this long ("1024x64x1536.5GiB" is 17).
MAX_GPUS_TEXT = 64

_GPUS_RE = re.compile(r"^\s*(?:([0-9]+)\s*[xX*]\s*)?([0-9]+)\s*[xX*]\s*([0-9]+(?:\.[0-9]+)?\s*[A-Za-z]*)\s*$",
                      re.ASCII)


def check_counts(nodes: int, gpus_per_node: int, what: str = "the GPU count") -> None:
    """Node and per-node GPU counts within 1..MAX_NODES and 1..MAX_GPUS_PER_NODE."""
    if nodes < 1 or gpus_per_node < 1:
        raise UserError(f"{what}: node and GPU counts must be at least 1")
    if nodes > MAX_NODES:
        raise UserError(f"{what}: at most {MAX_NODES} nodes are supported")
    if gpus_per_node > MAX_GPUS_PER_NODE:
        raise UserError(f"{what}: at most {MAX_GPUS_PER_NODE} GPUs per node are supported")


def parse_gpus(spec: str) -> tuple[int, int, int]:
    """``8x64G`` -> (1, 8, 64 GiB); ``2x8x80G`` -> (2, 8, 80 GiB)."""
    spec = spec or ""
    m = _GPUS_RE.match(spec) if len(spec) <= MAX_GPUS_TEXT else None
    if not m:
        raise UserError(f"bad --gpus {excerpt(spec)}: expected COUNTxMEMORY such as 8x64G, 1x24GB, 4x80GiB, "
                        "or NODESxCOUNTxMEMORY such as 2x8x80G")
    nodes = int(m.group(1) or 1)
    count = int(m.group(2))
    check_counts(nodes, count, f"bad --gpus {excerpt(spec)}")
    mem_text = m.group(3).strip()
    if re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", mem_text):
        raise UserError(f"bad --gpus {excerpt(spec)}: give the memory a unit, e.g. {count}x{mem_text}G")
    mem = parse_size(mem_text, what="--gpus memory", maximum=MAX_GPU_MEM)
    if mem < 1 * GiB:
        raise UserError(f"bad --gpus {excerpt(spec)}: less than 1 GiB per GPU")
    return nodes, count, mem


def make_profile(
    gpus: str,
    backend: str = "cuda",
    host_ram: str | int | None = None,
    gpu_name: str | None = None,
    cpu_cores: int | None = None,
) -> HardwareProfile:
    """Build a profile from CLI-style strings; every error is a UserError."""
    nodes, count, mem = parse_gpus(gpus)
    backend = str(backend or "cuda").lower()
    if backend == "hip":
        backend = "rocm"
    ram = parse_size(host_ram, what="--host-ram", maximum=MAX_HOST_RAM) if isinstance(host_ram, str) else host_ram
    model = find_gpu_model(gpu_name)
    if gpu_name and model is None:
        known = ", ".join(g.name for g in GPU_MODELS.values())
        raise UserError(f"unknown --gpu-name {excerpt(gpu_name)}: known models are {known}")
    if model is not None and model.backend == "dcu" and backend == "rocm":
        backend = "dcu"  # a Hygon card named with --backend rocm: same stack, DCU tooling
    if model is not None and (model.backend == "cuda") != (backend == "cuda"):
        raise UserError(f"--gpu-name {gpu_name} is a {model.backend} device but --backend is {backend}")
    return HardwareProfile(
        nodes=nodes,
        gpus_per_node=count,
        gpu_mem=mem,
        backend=backend,
        host_ram=ram,
        gpu_name=model.name if model else None,
        cpu_cores=cpu_cores,
    )
