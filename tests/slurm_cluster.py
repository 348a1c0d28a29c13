"""A real Slurm cluster on this one host, for tests: slurmctld plus one slurmd per node.

Each node is a network namespace on a private bridge (its own address, no route
out), with its own uts, mount and pid namespaces: ``hostname`` says n1, n2, the
node names resolve through a hosts file bind-mounted over /etc/hosts inside the
node, and ending the node's ``unshare`` makes the kernel kill everything in it,
slurmstepd and job tasks included.  munged and slurmctld run in the host's
namespaces as children of the test process.  Everything lives under one short
scratch folder; nothing is written to /etc.

Use the ``slurm_cluster`` fixture (session-scoped), or :class:`SlurmCluster`
directly for a private one.  Missing Slurm packages make the fixture fail with
the package names; CI installs them with ``scripts/setup_slurm.sh``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

#: Command -> the Debian package that ships it.
PACKAGES = {
    "slurmctld": "slurmctld", "slurmd": "slurmd", "srun": "slurm-client", "sbatch": "slurm-client",
    "salloc": "slurm-client", "scontrol": "slurm-client", "squeue": "slurm-client", "scancel": "slurm-client",
    "sinfo": "slurm-client", "munged": "munge", "ip": "iproute2", "nsenter": "util-linux",
    "unshare": "util-linux", "mknod": "coreutils",
}
PREFIX = "dsq"  # bridge dsq<i>br, veths dsq<i>v<n>, namespaces dsq<i>n<n>
FAKE_GPU_MAJOR = 195  # the NVIDIA character-device major: Slurm only wants a char device
_PR_SET_PDEATHSIG = 1

SLURM_CONF = """\
ClusterName=dsq{index}
SlurmctldHost=localhost({subnet}.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/run/munge.sock
StateSaveLocation={base}/spool/ctld
SlurmdSpoolDir={base}/spool/%n
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
SlurmdParameters=config_overrides
MailProg=/bin/true
TmpFS={base}/nodetmp
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait={kill_wait}
Waittime=0
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

# The node's first process: private hosts file and TmpFS, its own hostname, then slurmd.
# It is PID 1 of the node's pid namespace, so when it dies the kernel kills the node.
NODE_INIT = """\
set -e
mount --bind "$BASE/hosts" /etc/hosts
mount --bind "$BASE/nodetmp-$NODE" "$BASE/nodetmp"
hostname "$NODE"
slurmd -D -N "$NODE" -f "$BASE/slurm.conf" >"$BASE/log/slurmd-$NODE.out" 2>&1 </dev/null &
trap 'kill -TERM $! 2>/dev/null' TERM INT
wait $!
"""


def missing_packages(path: str | None = None) -> list[str]:
    """Debian packages whose commands are not on ``path`` (default: PATH plus the sbin folders)."""
    path = path if path is not None else os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return sorted({pkg for cmd, pkg in PACKAGES.items() if shutil.which(cmd, path=path) is None})


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGKILL if the test process dies without tearing down."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def _link_exists(name: str) -> bool:
    return _sh("ip", "link", "show", name, check=False).returncode == 0


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (kill -0 succeeds on zombies)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def _stop(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGTERM, wait, SIGKILL, reap: one child of ours."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class SlurmCluster:
    """A cluster of ``nodes`` emulated nodes n1..nN with ``gpus`` fake GPUs and ``cpus`` CPUs each.

    ``index`` picks the bridge, subnet (10.77.<index>.0/24) and controller port, so several
    clusters can run side by side; None takes the first index whose bridge is free."""

    def __init__(self, nodes: int = 2, gpus: int = 2, cpus: int = 4, *, index: int | None = None,
                 kill_wait: int = 30):
        self.nnodes, self.gpus, self.cpus, self.kill_wait = nodes, gpus, cpus, kill_wait
        self.index = index
        self.base: Path | None = None
        self.names: list[str] = [f"n{i}" for i in range(1, nodes + 1)]
        self.created_links: list[str] = []  # veths then the bridge, in creation order
        self.created_netns: list[str] = []
        self.munged: subprocess.Popen | None = None
        self.slurmctld: subprocess.Popen | None = None
        self.node_procs: dict[str, subprocess.Popen] = {}
        self.start_seconds = self.stop_seconds = 0.0

    # ------------------------------------------------------------------ names
    @property
    def subnet(self) -> str:
        return f"10.77.{self.index}"

    @property
    def bridge(self) -> str:
        return f"{PREFIX}{self.index}br"

    def netns(self, node: str) -> str:
        return f"{PREFIX}{self.index}{node}"

    def veth(self, node: str) -> str:
        return f"{PREFIX}{self.index}v{node}"

    def address(self, node: str) -> str:
        return f"{self.subnet}.{10 + int(node[1:])}"

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The test process's environment plus SLURM_CONF: pass it to every Slurm command."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # ------------------------------------------------------------------ start
    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        t0 = time.monotonic()
        try:
            self._make_network()
            self._write_files()
            self._start_munged()
            self._start_slurmctld()
            for node in self.names:
                self._start_node(node)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _claim_index(self) -> None:
        """Take the first index whose bridge we can create and whose namespaces do not exist
        (a crashed run's leftovers, or a cluster running beside this one, keep theirs)."""
        errors = []
        for index in ([self.index] if self.index is not None else range(10)):
            self.index = index
            r = _sh("ip", "link", "add", self.bridge, "type", "bridge", check=False)
            if r.returncode != 0:
                errors.append(f"{self.bridge}: {r.stderr.strip()}")
                continue
            if not set(map(self.netns, self.names)) & set(_sh("ip", "netns", "list", check=False).stdout.split()):
                self.created_links.append(self.bridge)
                return
            _sh("ip", "link", "del", self.bridge, check=False)
            errors.append(f"{self.bridge}: namespaces of that index exist")
        raise RuntimeError("no free test-cluster network: " + "; ".join(errors))

    def _make_network(self) -> None:
        """The bridge and one namespace + veth per node."""
        self._claim_index()
        _sh("sysctl", "-qw", f"net.ipv6.conf.{self.bridge}.disable_ipv6=1", check=False)
        _sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for node in self.names:
            ns, veth = self.netns(node), self.veth(node)
            _sh("ip", "netns", "add", ns)
            self.created_netns.append(ns)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.created_links.insert(0, veth)
            _sh("ip", "link", "set", veth, "master", self.bridge, "up")
            _sh("nsenter", f"--net=/run/netns/{ns}", "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", check=False)
            _sh("ip", "-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def _write_files(self) -> None:
        """Scratch folder (short: unix sockets live in it), config, hosts, key, fake devices."""
        self.base = Path(tempfile.mkdtemp(prefix="dsq", dir="/tmp"))
        os.chmod(self.base, 0o755)
        for sub in ("munge", "run", "log", "spool/ctld", "nodetmp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.base / "munge", 0o700)
        key = self.base / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        lines, gres = [], []
        for node in self.names:
            (self.base / "spool" / node).mkdir()
            (self.base / f"nodetmp-{node}").mkdir()
            dev = self.base / "fakedev" / node
            dev.mkdir(parents=True)
            for g in range(self.gpus):
                os.mknod(dev / f"gpu{g}", 0o600 | stat.S_IFCHR, os.makedev(FAKE_GPU_MAJOR, g))
            lines.append(f"NodeName={node} NodeAddr={self.address(node)} CPUs={self.cpus} RealMemory=1000 "
                         f"Gres=gpu:{self.gpus} State=UNKNOWN")
            gres.append(f"NodeName={node} Name=gpu File={dev}/gpu[0-{self.gpus - 1}]")
        self.conf.write_text(SLURM_CONF.format(index=self.index, subnet=self.subnet, ctld_port=16817 + self.index,
                                               base=self.base, kill_wait=self.kill_wait, nodes="\n".join(lines)))
        (self.base / "gres.conf").write_text("\n".join(gres) + "\n")
        hosts = ["127.0.0.1 localhost", f"{self.subnet}.1 slurmctl"]
        for node in self.names:  # the v4-mapped form answers torch's reverse lookups (no DNS in a node)
            hosts += [f"{self.address(node)} {node}", f"::ffff:{self.address(node)} {node}"]
        (self.base / "hosts").write_text("\n".join(hosts) + "\n")

    def _start_munged(self) -> None:
        b = self.base
        self.munged = subprocess.Popen(
            ["munged", "--foreground", f"--socket={b}/run/munge.sock", f"--key-file={b}/munge/munge.key",
             f"--pid-file={b}/run/munged.pid", f"--log-file={b}/log/munged.log", f"--seed-file={b}/munge/seed"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(b / "log" / "munged.out", "wb"),
            preexec_fn=_die_with_parent)
        self._wait_for(lambda: (b / "run" / "munge.sock").exists(), 10, "munged socket", self.munged)

    def _start_slurmctld(self) -> None:
        self.slurmctld = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(self.base / "log" / "slurmctld.out", "wb"),
            preexec_fn=_die_with_parent)

    def _start_node(self, node: str) -> None:
        """nsenter (net only: `ip netns exec` remounts /sys and breaks slurmd) + fresh uts/mount/pid."""
        self.node_procs[node] = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns(node)}", "unshare", "--uts", "--mount", "--pid",
             "--mount-proc", "--fork", "--kill-child=SIGKILL", "sh", "-c", NODE_INIT],
            env=dict(self.env, BASE=str(self.base), NODE=node), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(self.base / "log" / f"node-{node}.out", "wb"),
            preexec_fn=_die_with_parent)

    def _wait_for(self, ready, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not ready after {timeout:g} s\n{self.logs()}")
            time.sleep(0.1)

    def _wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            r = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=5)
            states = dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
            return all(states.get(n) == "idle" for n in self.names)
        self._wait_for(idle, timeout, "nodes idle", self.slurmctld)

    # ------------------------------------------------------------------ use
    def run(self, *argv: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """A Slurm command (or any command) with this cluster's SLURM_CONF."""
        return subprocess.run(argv, env=kw.pop("env", self.env), capture_output=True, text=True, check=check,
                              timeout=timeout, **kw)

    def in_node(self, node: str, *argv: str) -> list[str]:
        """argv that runs inside ``node``'s network namespace (for a controller on that node)."""
        return ["nsenter", f"--net=/run/netns/{self.netns(node)}", *argv]

    def logs(self) -> str:
        if self.base is None or not (self.base / "log").is_dir():
            return ""
        out = []
        for p in sorted((self.base / "log").iterdir()):
            text = p.read_text(errors="replace").strip().splitlines()[-15:]
            if text:
                out.append(f"--- {p.name}\n" + "\n".join(text))
        return "\n".join(out)

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancel jobs while the controller is up, end the nodes, the controller, munged, any
        stray process of this cluster, then the namespaces, links and folder."""
        t0 = time.monotonic()
        if self.slurmctld is not None and self.slurmctld.poll() is None:
            self._cancel_all()
        for proc in self.node_procs.values():
            # unshare ignores SIGTERM while it waits; its death SIGKILLs the node's PID 1
            # (--kill-child), and with it everything in the node: slurmd, slurmstepd, tasks.
            proc.kill()
            proc.wait(10)
        _stop(self.slurmctld)
        _stop(self.munged)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for veth in [v for v in self.created_links if v != self.bridge]:
            _sh("ip", "link", "del", veth, check=False)
        for ns in self.created_netns:
            _sh("ip", "netns", "del", ns, check=False)
        if self.bridge in self.created_links:
            _sh("ip", "link", "del", self.bridge, check=False)
        self.created_links, self.created_netns, self.node_procs = [], [], {}
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
        self.stop_seconds = time.monotonic() - t0

    def _cancel_all(self) -> None:
        r = self.run("squeue", "-h", "-o", "%A", check=False, timeout=10)
        jobs = r.stdout.split()
        if not jobs:
            return
        # SIGKILL every step (batch script included) first: the tasks need not wait KillWait.
        self.run("scancel", "--signal=KILL", "--full", *jobs, check=False, timeout=10)
        self.run("scancel", *jobs, check=False, timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            busy = self.run("squeue", "-h", "-o", "%A", check=False, timeout=10).stdout.strip()
            completing = self.run("sinfo", "-h", "-t", "completing", "-o", "%N", check=False, timeout=10).stdout
            if not busy and not completing.strip():
                return
            time.sleep(0.1)

    def processes(self) -> list[int]:
        """Live pids that belong to this cluster: its folder on their command line, or its
        SLURM_CONF in their environment (slurmstepd keeps that), except this test process."""
        if self.base is None:
            return []
        mine = {os.getpid(), os.getppid()}
        needle, conf = str(self.base).encode(), f"SLURM_CONF={self.conf}".encode()
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in mine or not _alive(int(name)):
                continue
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes()
                environ = Path(f"/proc/{name}/environ").read_bytes()
            except OSError:
                continue
            if needle in cmd or conf in environ.split(b"\0"):
                found.append(int(name))
        return found

    def leftovers(self, names: dict | None = None) -> list[str]:
        """What a stopped cluster left behind: processes, namespaces, links, its folder.
        ``names`` is :meth:`footprint` taken while it ran."""
        names = names or self.footprint()
        left = [f"process {pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()!r}"
                for pid in names["pids"] if _alive(pid)]
        netns = _sh("ip", "netns", "list", check=False).stdout.split()
        left += [f"netns {ns}" for ns in names["netns"] if ns in netns]
        left += [f"link {link}" for link in names["links"] if _link_exists(link)]
        if names["base"] and Path(names["base"]).exists():
            left.append(f"folder {names['base']}")
        return left

    def footprint(self) -> dict:
        """Every pid, namespace, link and folder of the running cluster (for :meth:`leftovers`)."""
        pids = self.processes()
        for proc in [self.munged, self.slurmctld, *self.node_procs.values()]:
            if proc is not None:
                pids.append(proc.pid)
        for node_pid in [p.pid for p in self.node_procs.values()]:  # everything inside the nodes
            pids += _descendants(node_pid)
        return {"pids": sorted(set(pids)), "netns": [self.netns(n) for n in self.names],
                "links": [self.bridge] + [self.veth(n) for n in self.names], "base": str(self.base)}


def pids_with(marker: str) -> list[int]:
    """Live processes on any node (the host sees into every namespace) with ``marker`` in their
    argv, except srun (the controller's side of a step names the task's argv too)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd and os.path.basename(cmd.split(b"\0", 1)[0]) != b"srun" and _alive(int(name)):
            found.append(int(name))
    return found


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def require_slurm(path: str | None = None) -> None:
    """Fail (never skip) when the Slurm packages or the privileges are missing."""
    missing = missing_packages(path)
    if missing:
        pytest.fail(f"Slurm tests need the Debian package(s) {', '.join(missing)}: run scripts/setup_slurm.sh "
                    f"(apt-get install -y --no-install-recommends {' '.join(missing)})", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("Slurm tests start network namespaces and daemons: run them as root", pytrace=False)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running 2-node cluster for the whole session; teardown must leave nothing behind."""
    require_slurm()
    cluster = SlurmCluster(nodes=2).start()
    try:
        yield cluster
    finally:
        names = cluster.footprint()
        cluster.stop()
        left = cluster.leftovers(names)
        assert not left, f"the Slurm test cluster left: {left}"
