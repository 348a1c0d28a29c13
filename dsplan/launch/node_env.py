"""The environment of a training child on one node: what LLaMA-Factory's torchrun launcher reads.

Built from the hardware profile and the node's place in the job, so that one
controller can start the same command on every node and only this part differs.
"""

from __future__ import annotations

import os
from pathlib import Path

from dsplan.inputs.hardware import DEVICE_MASK_VAR, HardwareProfile


def node_env(profile: HardwareProfile, base: dict[str, str], *, nnodes: int | None = None,
             node_rank: int | None = None, master_addr: str | None = None,
             master_port: int | None = None) -> tuple[dict[str, str], list[str]]:
    """The child's environment: the user's, plus what LLaMA-Factory's launcher reads.
    Returns the environment and a list of what dsplan set or removed."""
    env = dict(base)
    changes: list[str] = []

    def put(key: str, value: str) -> None:
        if env.get(key) != value:
            changes.append(f"{key}={value}")
        env[key] = value

    put("FORCE_TORCHRUN", "1")  # LF needs torchrun for any DeepSpeed config
    if "RECORD_VRAM" not in env:  # LF then logs each step's peak GPU memory; a user's RECORD_VRAM=0 stays
        put("RECORD_VRAM", "1")
    put("NPROC_PER_NODE", str(profile.gpus_per_node))
    changes += allocator_notes(env)
    nodes = nnodes or profile.nodes
    if nodes > 1 or nnodes is not None:
        put("NNODES", str(nodes))
        put("NODE_RANK", str(node_rank or 0))
    if master_addr:
        put("MASTER_ADDR", master_addr)
    if master_port:
        put("MASTER_PORT", str(master_port))
    mask = DEVICE_MASK_VAR[profile.backend]
    other = "CUDA_VISIBLE_DEVICES" if mask == "HIP_VISIBLE_DEVICES" else "HIP_VISIBLE_DEVICES"
    if mask not in env:
        put(mask, ",".join(str(i) for i in range(profile.gpus_per_node)))
    if other in env:  # exactly one mask: a second one with other indices confuses HIP
        changes.append(f"unset {other} (was {env.pop(other)!r}; {mask} is the mask on {profile.backend})")
    return env, changes


#: What LLaMA-Factory 0.9.5's launcher writes over the allocator setting when it starts torchrun
#: (``launcher.py``: with ``OPTIM_TORCH`` enabled, its default, it sets this unconditionally).
LF_ALLOC_CONF = ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def allocator_notes(env: dict[str, str]) -> list[str]:
    """A note when the user's ``PYTORCH_CUDA_ALLOC_CONF`` will not reach the ranks: LF's launcher
    replaces it unless ``OPTIM_TORCH`` is off (LF reads true/y/1 as on, case-insensitive)."""
    key, lf_value = LF_ALLOC_CONF
    mine = env.get(key)
    optim_on = env.get("OPTIM_TORCH", "1").lower() in ("true", "y", "1")
    if mine is None or mine == lf_value or not optim_on:
        return []
    return [f"note: LLaMA-Factory's launcher replaces {key}={mine} with {lf_value} (set OPTIM_TORCH=0 to keep "
            "yours)"]


def child_env(profile: HardwareProfile, opts, base: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """What every attempt's child runs with: :func:`node_env` for this node (``opts`` carries
    ``nnodes``, ``node_rank``, ``master_addr``, ``master_port`` and ``lf_cli``), and the folder of
    the llamafactory-cli being run first on PATH, since LF starts a bare `torchrun`."""
    env, changes = node_env(profile, base, nnodes=opts.nnodes, node_rank=opts.node_rank,
                            master_addr=opts.master_addr, master_port=opts.master_port)
    cli_dir = str(Path(opts.lf_cli).parent)
    if Path(opts.lf_cli).is_absolute() and cli_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = cli_dir + os.pathsep + env.get("PATH", "")
        changes.append(f"PATH={cli_dir}:$PATH (so LLaMA-Factory's bare `torchrun` is the one beside it)")
    return env, changes
