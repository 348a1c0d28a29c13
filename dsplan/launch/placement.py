"""Where each attempt runs: on this node, or as one srun step over every node of the Slurm job dsplan runs in.

``dsplan run`` started inside an allocation (the batch script ``dsplan render
--slurm`` writes, or an ``salloc`` shell) is the controller of every node, unless
``--nnodes``, ``--node-rank`` or ``--master-addr`` say it is one node of a job
started by hand.  Then each attempt is a single step, one task per node
(:func:`dsplan.launch.slurm.srun_argv`), each task running the per-node wrapper
:mod:`dsplan.launch.slurm_task` around ``llamafactory-cli train``.  The step's
output comes back labelled with the task id; when dsplan ends an attempt it
cancels the step on every node first (:func:`dsplan.launch.slurm.end_step`).

:class:`Placement` answers the run loop's questions about this: the command, the
environment, whether the output is labelled, how to end the remote part, and what
the ledger records (the node list, the node and rank the evidence came from).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional

from dsplan.errors import UserError
from dsplan.inputs.hardware import DEVICE_MASK_VAR, HardwareProfile
from dsplan.launch.slurm import Allocation, SlurmError, end_step, master_port, srun_argv, task_argv


def step_name(attempt: int) -> str:
    """The Slurm step name of one attempt (``dsplan-a3``)."""
    return f"dsplan-a{attempt}"


@dataclass
class Placement:
    """How attempts are launched: here (``alloc`` None) or across ``alloc``'s nodes."""

    profile: HardwareProfile
    alloc: Optional[Allocation] = None
    python: str = sys.executable  # runs the per-node wrapper on every node

    @property
    def labelled(self) -> bool:
        return self.alloc is not None

    @property
    def nodes(self) -> Optional[list[str]]:
        return self.alloc.hostnames() if self.alloc is not None else None

    def node_options(self, opts):
        """``opts`` with the job's node count and rendezvous host filled in (for the child's
        environment; each node's wrapper then sets its own NODE_RANK and MASTER_PORT)."""
        if self.alloc is None:
            return opts
        return replace(opts, nnodes=self.alloc.nnodes, master_addr=self.alloc.master_addr)

    def argv(self, lf_cli: str, yaml_path, attempt: int) -> list[str]:
        """The attempt's command: ``llamafactory-cli train YAML``, or the srun step around it."""
        command = [lf_cli, "train", str(yaml_path)]
        if self.alloc is None:
            return command
        inner = task_argv(command, master_addr=self.alloc.master_addr,
                          master_port=master_port(self.alloc.job_id, attempt),
                          nproc_per_node=self.profile.gpus_per_node,
                          mask_var=DEVICE_MASK_VAR[self.profile.backend], python=self.python)
        return srun_argv(self.alloc, inner, step_name=step_name(attempt))

    def before_kill(self, attempt: int) -> Optional[Callable[[int], object]]:
        """What ends the attempt's remote part before its local processes are signalled."""
        if self.alloc is None:
            return None
        alloc = self.alloc
        return lambda srun_pid: end_step(srun_pid, alloc.job_id, step_name(attempt), env=alloc.env)

    def started_fields(self) -> dict:
        """Extra keys of an attempt's started line."""
        if self.alloc is None:
            return {}
        return {"nodes": self.nodes, "slurm_job": self.alloc.job_id}

    def end_fields(self, outcome) -> dict:
        """Extra keys of an attempt's end record: where the evidence came from, how the step ended."""
        fields: dict = {}
        if outcome is not None and outcome.evidence_rank is not None:
            fields["evidence_rank"] = outcome.evidence_rank
        if self.alloc is None:
            return fields
        fields = {"nodes": self.nodes, "slurm_job": self.alloc.job_id, **fields}
        if outcome is not None:
            fields["evidence_node"] = self.alloc.node_of(outcome.evidence_task)
            ended = outcome.before_kill_result
            if ended is not None:
                fields["slurm_step"] = ended.step
                fields["step_end_seconds"] = round(ended.seconds, 3)
        return fields

    def describe(self) -> Optional[str]:
        if self.alloc is None:
            return None
        return (f"Slurm job {self.alloc.job_id}: each attempt is one srun step over {self.alloc.nnodes} node(s) "
                f"({', '.join(self.nodes)}), {self.profile.gpus_per_node} process(es) per node, rendezvous "
                f"on {self.alloc.master_addr}")


def check_node_flags(profile: HardwareProfile, nnodes: int | None, node_rank: int | None,
                     master_addr: str | None) -> None:
    """The per-node flags agree with each other and with the plan: as many nodes as the profile,
    a node rank below them, and the rendezvous host named on every node but the first."""
    if nnodes is None and node_rank is None and master_addr is None:
        return
    nodes = nnodes or profile.nodes
    if nodes != profile.nodes:
        raise UserError(f"--nnodes {nodes} but the plan is for {profile.nodes} node(s) ({profile.spec}): pass --gpus "
                        f"{nodes}x{profile.gpus_per_node}x{profile.spec.rsplit('x', 1)[-1]} so the plan counts every "
                        "GPU of the job")
    if node_rank is not None and node_rank >= nodes:
        raise UserError(f"--node-rank {node_rank} is not a node of a {nodes}-node job (0 to {nodes - 1})")
    if (node_rank or 0) > 0 and not master_addr:
        raise UserError(f"--node-rank {node_rank} needs --master-addr: the host of node 0, where the ranks meet")


def detect_placement(profile: HardwareProfile, opts, base_env: Mapping[str, str]) -> Placement:
    """Inside a Slurm allocation, and without the per-node flags: every node of the job,
    which must be as many nodes as the plan is for.  Otherwise: this node."""
    if any(v is not None for v in (opts.nnodes, opts.node_rank, opts.master_addr)):
        return Placement(profile)
    alloc = Allocation.detect(base_env)
    if alloc is None:
        return Placement(profile)
    try:
        hosts = alloc.hostnames()
    except SlurmError as e:
        raise UserError(f"inside Slurm job {alloc.job_id}, but its node list cannot be read: {e}") from None
    if alloc.nnodes != profile.nodes or len(hosts) != alloc.nnodes:
        raise UserError(
            f"Slurm job {alloc.job_id} has {alloc.nnodes} node(s) ({alloc.nodelist}) but the plan is for "
            f"{profile.nodes} ({profile.spec}): submit with --nodes={profile.nodes} (dsplan render --slurm writes "
            f"that), or plan for {alloc.nnodes} node(s); to run one node of a job by hand, pass "
            "--nnodes/--node-rank/--master-addr")
    return Placement(profile, alloc)
