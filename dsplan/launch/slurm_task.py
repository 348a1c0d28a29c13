"""The per-node side of a Slurm step: give this node torchrun's environment, then exec the command.

Run by every task of the step that :func:`dsplan.launch.slurm.srun_argv` starts::

    python -m dsplan.launch.slurm_task --master-addr n1 --master-port 20417 \\
        --nproc-per-node 8 --mask-var HIP_VISIBLE_DEVICES -- llamafactory-cli train lf.yaml

It sets ``NODE_RANK`` from ``SLURM_NODEID``, ``NNODES`` from the step's node count,
``MASTER_ADDR``, ``MASTER_PORT``, ``FORCE_TORCHRUN=1``, ``NPROC_PER_NODE`` and
exactly one device mask, prints one banner line on stderr (what the controller
records), and replaces itself with the command, so signals reach it directly.
Standard library only: it starts on every node of every attempt.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

BANNER = "[dsplan-task]"  # the same as dsplan.launch.slurm.TASK_BANNER
_MASKS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")


def device_mask(env: dict, mask_var: str, nproc: int, mask: str | None) -> str:
    """This node's mask: the controller's ``--mask`` if given; else, for CUDA, the devices
    Slurm's gres gave this step (it sets SLURM_STEP_GPUS with them); else 0..nproc-1.
    (HIP indexes the devices ROCr exposes, which Slurm's ROCR_VISIBLE_DEVICES already narrows.)"""
    if mask is not None:
        return mask
    if mask_var == "CUDA_VISIBLE_DEVICES" and env.get("SLURM_STEP_GPUS") and env.get(mask_var):
        return env[mask_var]
    return ",".join(str(i) for i in range(nproc))


def task_env(env: dict, args: argparse.Namespace) -> dict:
    """The command's environment on this node; raises SystemExit with a message when it cannot work."""
    node_id = env.get("SLURM_NODEID")
    if node_id is None:
        raise SystemExit(f"{BANNER} error: SLURM_NODEID is not set: run this inside an srun step")
    nnodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    out = dict(env)
    out.update(NODE_RANK=node_id, NNODES=nnodes, MASTER_ADDR=args.master_addr, MASTER_PORT=str(args.master_port),
               FORCE_TORCHRUN="1", NPROC_PER_NODE=str(args.nproc_per_node))
    value = device_mask(env, args.mask_var, args.nproc_per_node, args.mask)
    for other in _MASKS:
        out.pop(other, None)  # one mask only: HIP also honours CUDA_VISIBLE_DEVICES
    out[args.mask_var] = value
    if len([d for d in value.split(",") if d.strip()]) < args.nproc_per_node:
        raise SystemExit(f"{BANNER} error: node {env.get('SLURMD_NODENAME', socket.gethostname())} has "
                         f"{args.mask_var}={value!r}, fewer devices than --nproc-per-node {args.nproc_per_node}")
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsplan.launch.slurm_task", description=__doc__.splitlines()[0])
    p.add_argument("--master-addr", required=True)
    p.add_argument("--master-port", required=True, type=int)
    p.add_argument("--nproc-per-node", required=True, type=int)
    p.add_argument("--mask-var", required=True, choices=_MASKS)
    p.add_argument("--mask", default=None, help="device indices for this node (default: Slurm's, or all)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        p.error("no command given after --")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = task_env(dict(os.environ), args)
    step = f"{env.get('SLURM_JOB_ID', '?')}.{env.get('SLURM_STEP_ID', '?')}"
    print(f"{BANNER} node={env.get('SLURMD_NODENAME', socket.gethostname())} node_rank={env['NODE_RANK']} "
          f"nnodes={env['NNODES']} step={step} master={args.master_addr}:{args.master_port} "
          f"nproc={args.nproc_per_node} {args.mask_var}={env[args.mask_var]}", file=sys.stderr, flush=True)
    try:
        os.execvpe(args.command[0], args.command, env)
    except OSError as e:
        raise SystemExit(f"{BANNER} error: cannot run {args.command[0]!r}: {e}") from None


if __name__ == "__main__":
    main()
