"""``dsplan diagnose``: say why a saved training log ended and what dsplan would do next.

The log is classified by the same classifier the launcher uses live
(:mod:`dsplan.logs.classifier`, applying :mod:`dsplan.logs.rules`), without a
clock: a bare OOM line waits a number of lines, not seconds, for its
confirmation.  The file is streamed in binary blocks, decoded as UTF-8 with
replacement characters, and split on ``\\n`` and ``\\r`` so that progress-bar
redraws become separate lines and a multi-gigabyte log is never held in memory.

Only regular files are read: a FIFO, a device (``/dev/zero``), a socket or a
directory is refused with one line (:class:`~dsplan.errors.UserError`, exit 2)
before a byte is read, so nothing can block or stream forever.  Reading is
bounded too: at most the first :data:`HEAD_BYTES` and the last
:data:`TAIL_BYTES` of the file (its size when opened) are classified, which
bounds the time as well; the suggestion says so when the middle was skipped.
The end of a log decides most verdicts and the start holds the configuration
echo, so little is lost.  Standard library only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from dsplan.codes import Verdict
from dsplan.errors import UserError
from dsplan.logs.classifier import Classifier, Finding

GPU_OOM, HOST_OOM, NOT_OOM, SUCCESS = Verdict.GPU_OOM, Verdict.HOST_OOM, Verdict.NOT_OOM, Verdict.SUCCESS
STALLED, INTERRUPTED, UNKNOWN = Verdict.STALLED, Verdict.INTERRUPTED, Verdict.UNKNOWN

#: Bytes read from the file at a time.
BLOCK_BYTES = 1 << 20
#: A line longer than this is cut; the rest up to the next newline is skipped.
MAX_LINE_BYTES = 1 << 20
#: Evidence lines reported at most.
MAX_EVIDENCE = 3
#: A log is read from its start up to this many bytes ...
HEAD_BYTES = 8 << 20
#: ... and from this many bytes before its end (all of it when it is no longer than both together).
TAIL_BYTES = 56 << 20

_SUGGESTIONS: dict[str, str] = {
    GPU_OOM: ("GPU memory ran out: fall back to a tier with less GPU memory per card (dsplan run does this by "
              "itself); by hand, lower per_device_train_batch_size or cutoff_len, or enable gradient checkpointing."),
    HOST_OOM: ("host RAM ran out: do not move to an offload tier that needs more host RAM; lower micro-batch or "
               "preprocessing_num_workers, use a tier without CPU offload if the GPUs can hold it, or add RAM/swap."),
    NOT_OOM: "not a memory problem: fix the error above; dsplan does not fall back.",
    SUCCESS: "training finished; nothing to do.",
    UNKNOWN: ("nothing decisive in the log (no error, no OOM, no completion marker): it may be truncated or the run "
              "may still be going; pass the complete log, or rerun with dsplan run to capture it."),
    STALLED: "no output for too long: check the interconnect and the data loader; dsplan does not fall back.",
    INTERRUPTED: "the run was interrupted by the user or a signal; rerun it to continue.",
}

# Extra advice for a few well-known non-memory failures, keyed by rule name.
_RULE_HINTS: dict[str, str] = {
    "nccl_watchdog_timeout": "A collective timed out: one rank stalled or died; check its log and the network "
                             "(NCCL_DEBUG=INFO), or raise ddp_timeout.",
    "collective_timeout": "A collective timed out: one rank stalled or died; check its log and the network.",
    "disk_full": "The disk is full: free space under output_dir (or the cache directories) and rerun.",
    "fp16_min_loss_scale": "fp16 loss scaling collapsed: use bf16 if the hardware has it, or lower the learning "
                           "rate.",
    "segfault": "A process crashed (SIGSEGV): check driver, CUDA/ROCm and library versions.",
    "dataset_error": "Check the dataset name, dataset_dir and dataset_info.json.",
    "import_error": "A package is missing or broken in the training environment.",
    "static_tls": "A shared library could not be loaded (static TLS): import it first or set LD_PRELOAD; this is "
                  "not a memory shortage.",
    "ib_memlock": "The locked-memory limit is too low for InfiniBand: raise `ulimit -l` (unlimited) for the job.",
    "shm_exhausted": "/dev/shm is too small: enlarge it (docker --shm-size) or lower dataloader workers.",
    "triton_out_of_resources": "A Triton kernel needs more on-chip shared memory than the GPU has: this is a "
                               "kernel configuration problem, not GPU memory.",
    "illegal_memory_access": "A kernel accessed invalid memory: a bug or a broken kernel, not a memory shortage.",
}


@dataclass
class Diagnosis:
    """The answer of ``dsplan diagnose``.

    ``rule`` names the deciding rule for humans and tests; it is not part of
    the JSON form, which has exactly ``verdict``, ``evidence``, ``backend`` and
    ``suggestion``.
    """

    verdict: str
    evidence: list[str] = field(default_factory=list)
    backend: str | None = None
    suggestion: str = ""
    rule: str | None = None
    skipped_bytes: int = 0  # bytes in the middle of a long log that were not read

    def to_json(self) -> dict[str, object]:
        return {"verdict": self.verdict, "evidence": list(self.evidence), "backend": self.backend,
                "suggestion": self.suggestion}


def suggestion_for(finding: Finding) -> str:
    """What dsplan would do next after this verdict (also used by the launcher's report)."""
    text = _SUGGESTIONS.get(finding.verdict, _SUGGESTIONS[UNKNOWN])
    if finding.verdict == GPU_OOM and finding.backend and finding.backend != "cuda":
        text = text.replace("GPU memory ran out", f"accelerator memory ran out ({finding.backend})", 1)
    hint = _RULE_HINTS.get(finding.rule) if finding.verdict == NOT_OOM else None
    return f"{text} {hint}" if hint else text


def _diagnosis(clf: Classifier, exit_code: int | None) -> Diagnosis:
    final = clf.conclude(exit_code)
    evidence: list[str] = [final.evidence] if final.evidence else []
    if final.verdict in (GPU_OOM, HOST_OOM, NOT_OOM):
        for f in clf.findings:
            if len(evidence) >= MAX_EVIDENCE:
                break
            if f.verdict != final.verdict or not f.evidence or f.evidence in evidence:
                continue
            # Other OOM lines (say the whole SIGKILL report) help; for other failures only repeats of the
            # deciding error do, not the launcher's "a child failed" lines.
            if final.verdict == NOT_OOM and f.rule != final.rule:
                continue
            evidence.append(f.evidence)
    suggestion = suggestion_for(final)
    survived = clf.survived
    if survived is not None and final.verdict not in (GPU_OOM, HOST_OOM):
        suggestion += (" An OOM was logged but the run went on after it (caught, retried or skipped), so it is "
                       f"not the verdict: {survived.evidence[:160]}")
    return Diagnosis(final.verdict, evidence, final.backend, suggestion, final.rule)


def _lines_of(fh, limit: int | None = None) -> Iterator[bytes]:
    """Split a binary stream on \\n, \\r and \\r\\n, holding at most one block plus one line;
    read at most ``limit`` bytes (all when None)."""
    pending = b""
    skipping = False  # inside the unread rest of a line that was cut at MAX_LINE_BYTES
    left = limit
    while left is None or left > 0:
        block = fh.read(BLOCK_BYTES if left is None else min(BLOCK_BYTES, left))
        if not block:
            break
        if left is not None:
            left -= len(block)
        parts = (pending + block).splitlines(True)
        pending = b""
        if parts and not parts[-1].endswith((b"\n", b"\r")):
            pending = parts.pop()
        for part in parts:
            if skipping:
                skipping = False
                continue
            yield part.rstrip(b"\r\n")
        if len(pending) > MAX_LINE_BYTES:
            if not skipping:
                yield pending[:MAX_LINE_BYTES]
            skipping = True
            pending = b""
    if pending and not skipping:
        yield pending


def _open_log(p: str):
    """Open a log for reading; anything but a regular file is refused before it is read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise UserError(f"log file not found: {p}") from None
    except OSError as exc:
        raise UserError(f"cannot read log file {p}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
            raise UserError(f"{p} is {kind}; diagnose reads a saved log file")
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _raw_lines(fh, size: int) -> Iterator[bytes]:
    """The lines of the first HEAD_BYTES and the last TAIL_BYTES of a file of ``size`` bytes."""
    if size <= HEAD_BYTES + TAIL_BYTES:
        yield from _lines_of(fh, size)
        return
    head = list(_lines_of(fh, HEAD_BYTES))
    yield from head[:-1]  # the last piece may be half a line
    fh.seek(size - TAIL_BYTES)
    tail = _lines_of(fh, TAIL_BYTES)
    next(tail, None)  # the first piece may be the end of a line
    yield from tail


def diagnose_file(path: str | os.PathLike[str], exit_code: int | None = None) -> Diagnosis:
    """Classify a log file; ``exit_code`` is the run's exit status when known (usually it is not)."""
    p = os.fspath(path)
    fh, size = _open_log(p)
    clf = Classifier(clock=None)
    try:
        with fh:
            for raw in _raw_lines(fh, size):
                if raw:
                    clf.feed(raw.decode("utf-8", errors="replace"))
    except OSError as exc:
        raise UserError(f"cannot read log file {p}: {exc.strerror or exc}") from None
    d = _diagnosis(clf, exit_code)
    if size > HEAD_BYTES + TAIL_BYTES:
        d.skipped_bytes = size - HEAD_BYTES - TAIL_BYTES
        d.suggestion += (f" (Only the first {HEAD_BYTES >> 20} MiB and the last {TAIL_BYTES >> 20} MiB of this "
                         f"{size / 2**20:.0f} MiB log were read.)")
    return d


def diagnose_text(text: str, exit_code: int | None = None) -> Diagnosis:
    """Classify a log held in memory (same rules and splitting as :func:`diagnose_file`)."""
    clf = Classifier(clock=None)
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line:
            clf.feed(line)
    return _diagnosis(clf, exit_code)


__all__ = ["Diagnosis", "diagnose_file", "diagnose_text", "suggestion_for"]
