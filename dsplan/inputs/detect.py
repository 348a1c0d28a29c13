"""Read the hardware profile off the machine dsplan runs on (``dsplan detect``).

The vendor's monitoring tool is asked how many GPUs there are and how much
memory each one has: ``nvidia-smi`` for CUDA, Hygon's ``hy-smi`` for DCU, AMD's
``rocm-smi`` for ROCm.  Host RAM and CPU cores come from psutil.  Nothing here
imports torch, deepspeed or llamafactory; the tools run as subprocesses (argv
lists, never a shell) under a timeout and their text is parsed here.

What the tools print, and what this module relies on:

* ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits``
  prints one ``NAME, MiB`` line per GPU (``NVIDIA A100-SXM4-80GB, 81920``).
* ``rocm-smi --showproductname --showmeminfo vram --json`` prints an object keyed
  ``card0``, ``card1``, ... whose fields include ``"VRAM Total Memory (B)"`` and
  ``"Card Series"`` (``"Card series"`` in older releases).  Without ``--json`` the
  same facts come as ``GPU[0]  : VRAM Total Memory (B): 206141652992`` lines.
* ``hy-smi`` takes the same flags and prints the same shapes, with its own
  spelling: ``"vram Total Memory (MiB)"`` in recent releases, ``DCU[0]``/``HCU[0]``
  line prefixes and ``(B)`` units in older ones.  Its JSON is sometimes preceded
  by other text, so the object is searched for, and if no JSON can be read at
  all the tool is asked again without ``--json`` and its text lines are parsed.

Heterogeneous boxes are planned for their smallest GPU, and a
``CUDA_VISIBLE_DEVICES``/``HIP_VISIBLE_DEVICES`` mask in the environment narrows
the GPUs counted, the way the runtime would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dsplan.errors import UserError
from dsplan.inputs.hardware import BACKENDS, SMI_TOOLS, GpuModel, HardwareProfile, find_gpu_model
from dsplan.units import GiB, MiB

__all__ = [
    "DetectionError",
    "SmiGpu",
    "detect_profile",
    "parse_amd_smi",
    "parse_nvidia_smi",
    "resolve_model",
]

#: Seconds one tool invocation may take before detection gives up on it.
TIMEOUT_S = 10.0

#: Tools tried, in this order, when no backend is named.  hy-smi comes before
#: rocm-smi because a Hygon machine often has both, and only hy-smi is certain
#: to mean DCU.
AUTO_ORDER = ("nvidia-smi", "hy-smi", "rocm-smi")
TOOL_BACKEND = {"nvidia-smi": "cuda", "hy-smi": "dcu", "rocm-smi": "rocm"}

#: The exact arguments sent to each tool (tests/fakes check them).
NVIDIA_ARGS = ("--query-gpu=name,memory.total", "--format=csv,noheader,nounits")
AMD_ARGS = ("--showproductname", "--showmeminfo", "vram")
JSON_FLAG = "--json"

#: Names the vendor tools print that the model table does not spell out.  A
#: Hygon K100 AI card reports its board SKU ``K500SM_AI`` as its card series.
_NAME_ALIASES = {"k500smai": "K100_AI"}

_CARD_KEY = re.compile(r"card(\d+)", re.IGNORECASE)
_VRAM_TOTAL = re.compile(r"vram\s+total\s+memory\s*\((b|kib|mib|gib)\)", re.IGNORECASE)
_VRAM_UNITS = {"b": 1, "kib": 1024, "mib": MiB, "gib": GiB}
#: Fields that may name the card, best first; matched case-insensitively.
_NAME_FIELDS = ("card series", "device name", "marketing name", "product name", "card model", "card sku")
#: ``GPU[0]  : label: value`` (rocm-smi), ``DCU[0]``/``HCU[0]`` (hy-smi).
_TEXT_LINE = re.compile(r"^\s*(?:GPU|DCU|HCU)\s*\[\s*(\d+)\s*\]\s*:\s*([^:]+?)\s*:\s*(.*?)\s*$", re.IGNORECASE)
_HEX_ID = re.compile(r"0x[0-9a-f]+", re.IGNORECASE)


class DetectionError(UserError):
    """No GPU tool found, or it failed, or it reported no usable GPU."""


@dataclass(frozen=True)
class SmiGpu:
    """One GPU as a monitoring tool reported it."""

    index: int  # position in the tool's order, which device masks refer to
    memory: int  # total device memory, bytes
    names: tuple[str, ...] = ()  # name fields as printed, best first

    @property
    def name(self) -> str | None:
        return self.names[0] if self.names else None


def detect_profile(backend: str | None = None, env: Mapping[str, str] | None = None) -> HardwareProfile:
    """Build a one-node :class:`HardwareProfile` from the GPU tools on ``PATH``.

    ``backend`` picks the tool (``cuda``: nvidia-smi; ``dcu``: hy-smi, then
    rocm-smi; ``rocm``: rocm-smi); ``None`` tries nvidia-smi, hy-smi and rocm-smi
    in turn and keeps the first that reports GPUs.  ``env`` replaces
    ``os.environ`` for ``PATH``, the device masks and the tools' environment.
    Raises :class:`DetectionError` when no tool is found or none reports a GPU.
    """
    environ = dict(os.environ if env is None else env)
    search_path = environ.get("PATH", os.defpath)
    if backend is None:
        wanted = [(tool, TOOL_BACKEND[tool]) for tool in AUTO_ORDER]
    else:
        chosen = _normalise_backend(backend)
        wanted = [(tool, chosen) for tool in SMI_TOOLS[chosen]]

    found = [(tool, b, exe) for tool, b in wanted if (exe := shutil.which(tool, path=search_path))]
    if not found:
        names = ", ".join(dict.fromkeys(tool for tool, _ in wanted))
        raise DetectionError(
            f"no GPU tool found on PATH (looked for {names}); describe the hardware with --gpus instead, e.g. --gpus 8x80G"
        )

    failures: list[str] = []
    for tool, tool_backend, exe in found:
        try:
            gpus = _query(tool, exe, environ)
        except DetectionError as exc:
            failures.append(str(exc))
            continue
        return _build_profile(tool, tool_backend, gpus, environ)
    raise DetectionError("; ".join(failures) + "; describe the hardware with --gpus instead")


def parse_nvidia_smi(text: str) -> list[SmiGpu]:
    """Parse ``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits``."""
    gpus: list[SmiGpu] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        name, sep, mem = line.rpartition(",")
        name, mem = name.strip(), mem.strip()
        if not sep or not name:
            raise DetectionError(f"nvidia-smi did not list GPUs as NAME, MiB: {_clip(line)!r}")
        if not mem.isdigit() or int(mem) == 0:
            raise DetectionError(f"nvidia-smi reports memory {mem!r} for {name}: expected a number of MiB")
        gpus.append(SmiGpu(index=len(gpus), memory=int(mem) * MiB, names=(name,)))
    if not gpus:
        raise DetectionError("nvidia-smi reported no GPUs")
    return gpus


def parse_amd_smi(text: str, tool: str = "rocm-smi") -> list[SmiGpu]:
    """Parse ``rocm-smi``/``hy-smi --showproductname --showmeminfo vram``, JSON or text.

    The JSON object is looked for anywhere in ``text``; failing that, the
    ``GPU[n] : label: value`` lines are read.  Cards are ordered by number.
    """
    data = _find_json_object(text)
    if data is not None:
        gpus = _gpus_from_json(data, tool)
        if gpus:
            return gpus
    gpus = _gpus_from_text(text, tool)
    if gpus:
        return gpus
    shown = repr(_clip(text)) if text.strip() else "empty output"
    raise DetectionError(f"could not read {tool} output: no card with a VRAM total in {shown}")


def resolve_model(names: Iterable[str]) -> GpuModel | None:
    """The table model for the first of ``names`` that matches one (aliases included)."""
    for raw in names:
        model = find_gpu_model(raw)
        if model is None:
            alias = _NAME_ALIASES.get(re.sub(r"[\s_-]+", "", raw).lower())
            model = find_gpu_model(alias) if alias else None
        if model is not None:
            return model
    return None


# --------------------------------------------------------------------------- internals


def _normalise_backend(backend: str) -> str:
    chosen = backend.strip().lower()
    if chosen == "hip":
        chosen = "rocm"
    if chosen not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    return chosen


def _query(tool: str, exe: str, environ: Mapping[str, str]) -> list[SmiGpu]:
    """Run ``tool`` (found at ``exe``) and parse what it reports."""
    if tool == "nvidia-smi":
        proc = _run(tool, [exe, *NVIDIA_ARGS], environ)
        if proc.returncode != 0:
            raise DetectionError(f"nvidia-smi failed (exit {proc.returncode}): {_first_line(proc)}")
        return parse_nvidia_smi(proc.stdout)

    # rocm-smi / hy-smi: JSON first; a build without (working) JSON gets a second,
    # plain-text query.  Output is parsed whatever the exit status, because these
    # tools exit non-zero when some unrelated field is unsupported.
    problems: list[str] = []
    for argv in ([exe, *AMD_ARGS, JSON_FLAG], [exe, *AMD_ARGS]):
        proc = _run(tool, argv, environ)
        try:
            return parse_amd_smi(proc.stdout, tool)
        except DetectionError as exc:
            if proc.returncode != 0:
                flags = " ".join(argv[1:])
                problems.append(f"{tool} {flags} failed (exit {proc.returncode}): {_first_line(proc)}")
            else:
                problems.append(str(exc))
    raise DetectionError("; ".join(dict.fromkeys(problems)))


def _run(tool: str, argv: Sequence[str], environ: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=TIMEOUT_S,
            env=dict(environ),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DetectionError(f"{tool} did not answer within {TIMEOUT_S:g} s") from exc
    except OSError as exc:
        raise DetectionError(f"could not run {argv[0]}: {exc.strerror or exc}") from exc


def _find_json_object(text: str) -> dict | None:
    """The first JSON object in ``text`` (which may carry other lines around it)."""
    stripped = text.strip()
    if not stripped:
        return None
    try:
        whole = json.loads(stripped)
    except ValueError:
        pass
    else:
        return whole if isinstance(whole, dict) else None
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except ValueError:
            pass
        else:
            if isinstance(obj, dict):
                return obj
        start = text.find("{", start + 1)
    return None


def _gpus_from_json(data: Mapping[str, object], tool: str) -> list[SmiGpu]:
    cards: list[tuple[int, int, tuple[str, ...]]] = []
    for key, fields in data.items():
        match = _CARD_KEY.fullmatch(str(key).strip())
        if match is None or not isinstance(fields, dict):
            continue  # "system" and other non-card entries
        fields = {str(k).strip(): v for k, v in fields.items()}
        memory = _vram_total(fields.items(), tool, str(key))
        if memory is None:
            raise DetectionError(f"{tool} reports no VRAM total for {key}: {_clip(json.dumps(fields))}")
        cards.append((int(match.group(1)), memory, _card_names(fields)))
    return _ordered(cards)


def _gpus_from_text(text: str, tool: str) -> list[SmiGpu]:
    per_card: dict[int, dict[str, str]] = {}
    for line in text.splitlines():
        match = _TEXT_LINE.match(line)
        if match:
            per_card.setdefault(int(match.group(1)), {})[match.group(2)] = match.group(3)
    cards = []
    for number, fields in per_card.items():
        memory = _vram_total(fields.items(), tool, f"GPU[{number}]")
        if memory is not None:
            cards.append((number, memory, _card_names(fields)))
    return _ordered(cards)


def _vram_total(items: Iterable[tuple[str, object]], tool: str, card: str) -> int | None:
    """Bytes from the first ``VRAM Total Memory (unit)`` field, or None if there is none."""
    for label, value in items:
        match = _VRAM_TOTAL.fullmatch(label.strip())
        if match is None:
            continue
        text = str(value).strip()
        if not text.isdigit() or int(text) == 0:
            raise DetectionError(f"{tool} reports VRAM total {text!r} for {card}: expected a number")
        return int(text) * _VRAM_UNITS[match.group(1).lower()]
    return None


def _card_names(fields: Mapping[str, object]) -> tuple[str, ...]:
    by_label = {label.lower(): str(value).strip() for label, value in fields.items()}
    names = []
    for label in _NAME_FIELDS:
        value = by_label.get(label, "")
        # Hex PCI ids ("0x74a1") are not names and could match a table key by accident.
        if value and value.upper() != "N/A" and not _HEX_ID.fullmatch(value):
            names.append(value)
    return tuple(names)


def _ordered(cards: list[tuple[int, int, tuple[str, ...]]]) -> list[SmiGpu]:
    cards.sort(key=lambda card: card[0])
    return [SmiGpu(index=i, memory=memory, names=names) for i, (_, memory, names) in enumerate(cards)]


def _device_mask(backend: str, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The mask variable in force and its value.  ROCm reads HIP_VISIBLE_DEVICES and
    also honours CUDA_VISIBLE_DEVICES; CUDA reads only its own."""
    names = ("CUDA_VISIBLE_DEVICES",) if backend == "cuda" else ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
    for name in names:
        if name in environ:
            return name, environ[name]
    return None


def _apply_mask(gpus: list[SmiGpu], var: str, value: str, tool: str) -> tuple[int, list[SmiGpu]]:
    """(GPUs visible, GPUs to size the plan by) under ``var=value``.

    Indices are taken in order up to the first invalid one, as the CUDA and HIP
    runtimes do.  Entries that are not indices (UUIDs) cannot be matched to the
    tool's list, so they set the count and the plan is sized by the smallest of
    all the GPUs.
    """
    if not value.strip():
        raise DetectionError(f"{var} is set but empty, so no GPU is visible; unset it or list device indices")
    tokens = [token.strip() for token in value.split(",")]
    if all(re.fullmatch(r"-?\d+", token) for token in tokens):
        chosen: list[SmiGpu] = []
        for token in tokens:
            index = int(token)
            if not 0 <= index < len(gpus) or gpus[index] in chosen:
                break
            chosen.append(gpus[index])
        if not chosen:
            raise DetectionError(f"{var}={value!r} selects none of the {len(gpus)} GPUs {tool} reports")
        return len(chosen), chosen
    return min(len(tokens), len(gpus)), gpus


def _build_profile(tool: str, backend: str, gpus: list[SmiGpu], environ: Mapping[str, str]) -> HardwareProfile:
    count, sizing = len(gpus), gpus
    mask = _device_mask(backend, environ)
    if mask is not None:
        count, sizing = _apply_mask(gpus, *mask, tool)
    smallest = min(sizing, key=lambda gpu: gpu.memory)
    model = resolve_model(smallest.names)
    if backend == "rocm" and model is not None and model.backend == "dcu":
        backend = "dcu"  # a Hygon card seen through rocm-smi
    host_ram, cpu_cores = _host_resources()
    return HardwareProfile(
        nodes=1,
        gpus_per_node=count,
        gpu_mem=smallest.memory,
        backend=backend,
        host_ram=host_ram,
        gpu_name=model.name if model else None,
        cpu_cores=cpu_cores,
    )


def _host_resources() -> tuple[int | None, int | None]:
    """(host RAM bytes, physical CPU cores); RAM is unknown without psutil."""
    try:
        import psutil
    except ImportError:
        return None, os.cpu_count()
    return int(psutil.virtual_memory().total), psutil.cpu_count(logical=False) or os.cpu_count()


def _first_line(proc: subprocess.CompletedProcess[str]) -> str:
    for stream in (proc.stderr, proc.stdout):
        for line in (stream or "").splitlines():
            if line.strip():
                return _clip(line.strip())
    return "no output"


def _clip(text: str, limit: int = 120) -> str:
    """One line, at most ``limit`` characters, for error messages."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
