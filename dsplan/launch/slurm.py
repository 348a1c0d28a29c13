"""Run one attempt as one Slurm job step across every node of the allocation, and end it.

The controller (``dsplan run`` on the batch host) detects the allocation from
Slurm's environment, starts each attempt as a single ``srun`` step with one task
per node, reads the step's labelled output (``0: ...``) and, when it has decided
the attempt is over, ends the step on all nodes at once.  Each task runs
:mod:`dsplan.launch.slurm_task`, which gives its node the torchrun environment
(``NODE_RANK`` from ``SLURM_NODEID``) and execs the training command.

Standard library only; every Slurm command is a subprocess (``scontrol``,
``squeue``, ``scancel``, ``srun``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

#: What the per-node wrapper prints first on stderr; see :func:`parse_banner`.
TASK_BANNER = "[dsplan-task]"
#: srun's ``--label`` prefix: the task id, right-aligned to the width of the largest one.
_LABEL_RE = re.compile(r"^ *(\d+): ?(.*)$", re.DOTALL)
#: One entry of SLURM_JOB_CPUS_PER_NODE: ``64`` or ``64(x2)``.
_CPUS_RE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")
#: Master ports stay below Linux's ephemeral range (32768-60999) so nothing outgoing takes them.
PORT_BASE, PORT_SPAN, PORTS_PER_JOB = 20000, 10000, 20

Srun = Union[subprocess.Popen, int, None]


class SlurmError(RuntimeError):
    """A Slurm command failed or is missing."""


def _slurm(argv: Sequence[str], env: Optional[Mapping[str, str]] = None, timeout: float = 20.0,
           check: bool = True) -> subprocess.CompletedProcess:
    """Run one Slurm client command with this process's environment updated by ``env``
    (SLURM_CONF, say); a missing command or a failure is a SlurmError."""
    try:
        r = subprocess.run(list(argv), env=None if env is None else {**os.environ, **env}, capture_output=True,
                           text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} not found: is this a Slurm node (package slurm-client)?") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv)} did not answer within {timeout:g} s") from None
    if check and r.returncode != 0:
        raise SlurmError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def _min_cpus_per_node(value: str) -> Optional[int]:
    """The smallest node in SLURM_JOB_CPUS_PER_NODE (``64(x2),32``); None if unreadable."""
    counts = []
    for part in filter(None, (value or "").split(",")):
        m = _CPUS_RE.match(part.strip())
        if not m:
            return None
        counts.append(int(m.group(1)))
    return min(counts) if counts else None


# --------------------------------------------------------------------------- the allocation


@dataclass
class Allocation:
    """The job this process runs inside: its id, node list and node count.

    ``cpus_per_node`` is the CPU count of the smallest node of the allocation (what one
    task per node may ask for); None when Slurm did not say."""

    job_id: str
    nodelist: str
    nnodes: int
    cpus_per_node: Optional[int] = None
    env: Optional[Mapping[str, str]] = field(default=None, repr=False, compare=False)
    _hosts: Optional[list[str]] = field(default=None, repr=False, compare=False)

    @classmethod
    def detect(cls, env: Mapping[str, str]) -> Optional["Allocation"]:
        """The allocation described by ``env`` (normally ``os.environ``), or None outside one.
        Needs SLURM_JOB_ID and SLURM_JOB_NODELIST; SLURM_NNODES defaults to the host count.
        Also None inside a job step (SLURM_STEP_ID set, as under ``srun dsplan run``): that
        process is one task of someone else's step, not the controller (the batch script and
        an ``salloc`` shell have no step id)."""
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not job_id or not nodelist or env.get("SLURM_STEP_ID") is not None:
            return None
        nnodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
        cpus = _min_cpus_per_node(env.get("SLURM_JOB_CPUS_PER_NODE", ""))
        if cpus is None and env.get("SLURM_CPUS_PER_TASK", "").isdigit():
            cpus = int(env["SLURM_CPUS_PER_TASK"])
        alloc = cls(job_id=job_id, nodelist=nodelist, nnodes=int(nnodes) if nnodes and nnodes.isdigit() else 0,
                    cpus_per_node=cpus, env=env)
        if alloc.nnodes == 0:
            alloc.nnodes = len(alloc.hostnames())
        return alloc

    def hostnames(self) -> list[str]:
        """The node names in allocation order, through ``scontrol show hostnames`` (once)."""
        if self._hosts is None:
            r = _slurm(["scontrol", "show", "hostnames", self.nodelist], env=self.env)
            self._hosts = r.stdout.split()
            if not self._hosts:
                raise SlurmError(f"scontrol show hostnames {self.nodelist} printed no host")
        return list(self._hosts)

    @property
    def master_addr(self) -> str:
        """The first host of the node list: node rank 0 runs torchrun's rendezvous there."""
        return self.hostnames()[0]

    def node_of(self, task_id: Optional[int]) -> Optional[str]:
        """The node that ran ``task_id`` of a one-task-per-node step (block distribution:
        task i on the i-th node); None when unknown."""
        hosts = self.hostnames()
        return hosts[task_id] if task_id is not None and 0 <= task_id < len(hosts) else None


# --------------------------------------------------------------------------- one step


def master_port(job_id: str, attempt: int) -> int:
    """A rendezvous port for one attempt: each job has its own block of ports and each
    attempt a new one in it, so a listener the last attempt left behind cannot clash.
    Ports busy on this machine (the controller runs on the batch host, which is the first
    node, where node rank 0 listens) are skipped."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    block = PORT_BASE + (int(digits) * PORTS_PER_JOB) % PORT_SPAN
    for k in range(PORTS_PER_JOB):
        port = block + (attempt + k) % PORTS_PER_JOB
        if _port_free(port):
            return port
    return block + attempt % PORTS_PER_JOB


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def task_argv(argv: Sequence[str], *, master_addr: str, master_port: int, nproc_per_node: int, mask_var: str,
              mask: Optional[str] = None, python: Optional[str] = None) -> list[str]:
    """The per-node wrapper around ``argv``: what each task of the step runs."""
    out = [python or sys.executable, "-m", "dsplan.launch.slurm_task", "--master-addr", master_addr,
           "--master-port", str(master_port), "--nproc-per-node", str(nproc_per_node), "--mask-var", mask_var]
    if mask is not None:
        out += ["--mask", mask]
    return out + ["--", *map(os.fspath, argv)]


def srun_argv(alloc: Allocation, argv: Sequence[str], *, step_name: str = "dsplan", label: bool = True,
              cpus_per_task: Optional[int] = None, wait_s: Optional[int] = None,
              extra: Sequence[str] = ()) -> list[str]:
    """One step over every node of ``alloc``, one task per node, running ``argv``.

    ``--kill-on-bad-exit=1`` ends every task as soon as one exits non-zero or is killed;
    ``wait_s`` (srun ``--wait``) also ends the rest that long after the first task ends
    well.  ``--cpus-per-task`` is passed because srun 22.05+ no longer inherits it from
    the job: without it each node's torchrun and all its ranks would share one CPU.
    ``--mem=0`` gives the step all of the job's memory on each node."""
    cpus = cpus_per_task or alloc.cpus_per_node
    out = ["srun", f"--jobid={alloc.job_id}", f"--nodes={alloc.nnodes}", f"--ntasks={alloc.nnodes}",
           "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--export=ALL", "--mem=0", f"--job-name={step_name}"]
    if cpus:
        out.append(f"--cpus-per-task={cpus}")
    if label:
        out.append("--label")
    if wait_s is not None:
        out.append(f"--wait={wait_s}")
    return out + list(extra) + [os.fspath(a) for a in argv]


def parse_label(line: str) -> tuple[Optional[int], str]:
    """``"1: text"`` -> ``(1, "text")``; a line without a label (srun's own messages)
    -> ``(None, line)``."""
    m = _LABEL_RE.match(line)
    if m is None:
        return None, line
    return int(m.group(1)), m.group(2)


def parse_banner(text: str) -> Optional[dict[str, str]]:
    """The ``key=value`` fields of the wrapper's first line (``node``, ``node_rank``,
    ``nnodes``, ``step``, ``master``, the mask), or None for any other line."""
    if not text.startswith(TASK_BANNER):
        return None
    return dict(part.split("=", 1) for part in text[len(TASK_BANNER):].split() if "=" in part)


# --------------------------------------------------------------------------- ending a step


def find_step(job_id: str, step_name: str, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The id (``JOB.STEP``) of the running step named ``step_name`` in ``job_id``; None if none."""
    r = _slurm(["squeue", "-h", "--steps", f"--jobs={job_id}", "-o", "%i|%j"], env=env, check=False)
    ids = [line.split("|", 1)[0] for line in r.stdout.splitlines() if line.split("|", 1)[-1] == step_name]
    return ids[-1] if ids else None


def step_running(step: str, env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether ``JOB.STEP`` is still listed (its tasks or their teardown still on some node)."""
    job = step.split(".", 1)[0]
    r = _slurm(["squeue", "-h", "--steps", f"--jobs={job}", "-o", "%i"], env=env, check=False)
    return step in r.stdout.split()


def cancel_step(job_id: str, step_id: Union[str, int], *, signal_name: Optional[str] = None,
                env: Optional[Mapping[str, str]] = None) -> bool:
    """``scancel JOB.STEP``: without ``signal_name`` Slurm kills the step's tasks on every
    node at once (SIGKILL; a step does not wait KillWait).  True if scancel accepted it."""
    step = str(step_id)
    target = step if "." in step else f"{job_id}.{step}"
    argv = ["scancel", "--quiet"] + ([f"--signal={signal_name}"] if signal_name else []) + [target]
    return _slurm(argv, env=env, check=False).returncode == 0


def _signal_srun(srun: Srun, sig: int) -> None:
    try:
        if isinstance(srun, subprocess.Popen):
            srun.send_signal(sig)  # a no-op once it was reaped
        elif srun:
            os.kill(srun, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _srun_alive(srun: Srun) -> bool:
    if isinstance(srun, subprocess.Popen):
        return srun.poll() is None
    if not srun:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{srun}/stat", "rb") as f:
            data = f.read()
        return data[data.rfind(b")") + 2:][:1] not in (b"Z", b"X")
    except OSError:
        return False


@dataclass
class StepEnd:
    """How :func:`end_step` went: the step id it found, the seconds until srun had exited and
    the step had left squeue, and whether it had to SIGKILL srun itself."""

    step: Optional[str]
    seconds: float
    gone: bool
    killed_srun: bool = False


def end_step(srun: Srun, job_id: str, step_name: str, *, timeout: float = 5.0, grace: float = 2.0,
             env: Optional[Mapping[str, str]] = None, poll: float = 0.05) -> StepEnd:
    """End one attempt's step on all nodes: ``scancel`` the step (Slurm kills its tasks
    everywhere), and signal ``srun`` twice within a second (its own path to every task, in
    case the controller is slow).  If srun is still there after ``grace`` seconds it gets
    SIGKILL.  Returns once srun has exited and the step has left squeue, or at ``timeout``.

    ``srun`` is the Popen (or pid) of the step's srun; call this *before* killing srun's
    process tree: an srun killed first leaves the remote tasks running."""
    t0 = time.monotonic()
    step = find_step(job_id, step_name, env=env)
    if step is not None:
        cancel_step(job_id, step, env=env)
    if _srun_alive(srun):
        for _ in range(2):  # the second SIGINT within 1 s: srun's "abort" (SIGINT, then TERM, KILL to all tasks)
            _signal_srun(srun, signal.SIGINT)
            time.sleep(0.1)
    killed = False
    while time.monotonic() - t0 < timeout:
        if not killed and _srun_alive(srun) and time.monotonic() - t0 >= grace:
            _signal_srun(srun, signal.SIGKILL)
            killed = True
        if not _srun_alive(srun) and (step is None or not step_running(step, env=env)):
            return StepEnd(step, time.monotonic() - t0, True, killed)
        time.sleep(poll)
    if step is not None:  # last resort: ask again, with SIGKILL spelled out
        cancel_step(job_id, step, signal_name="KILL", env=env)
    return StepEnd(step, time.monotonic() - t0, False, killed)
