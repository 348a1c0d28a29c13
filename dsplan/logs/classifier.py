"""Read a training log line by line and decide why the run ended.

This is the one place that knows what an out-of-memory looks like.  The
launcher feeds every line of every rank to a :class:`Classifier` as it arrives;
the first line that proves a GPU or host OOM comes back as a :class:`Finding`
so the launcher can kill all ranks at once and fall back a tier.  After the
process has ended, :meth:`Classifier.conclude` gives the final verdict.
``dsplan diagnose`` runs the same classifier over a saved log.

Every rule lives in :data:`RULES`: a compiled regex, a rule name, the verdict
it proves and the accelerator backend it points at.  Rules are tried in table
order and the first hit decides the line, so the few "looks like memory but is
not" rules (static TLS, ``/dev/shm``, locked memory for InfiniBand) sit before
the OOM rules they would otherwise collide with.

Standard library only: this module is imported by the launcher's hot loop and
by ``dsplan diagnose``; it must never pull in torch, DeepSpeed or
LLaMA-Factory.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, replace

from dsplan.codes import OOM_VERDICTS, Verdict

GPU_OOM, HOST_OOM, NOT_OOM, SUCCESS = Verdict.GPU_OOM, Verdict.HOST_OOM, Verdict.NOT_OOM, Verdict.SUCCESS
STALLED, INTERRUPTED, UNKNOWN = Verdict.STALLED, Verdict.INTERRUPTED, Verdict.UNKNOWN

#: Regexes only ever see this many characters from the start of a line (plus a
#: short tail of very long lines), so a 1 MB line costs no more than a short one.
SCAN_CHARS = 4096
#: Extra characters taken from the end of a line longer than SCAN_CHARS.
TAIL_CHARS = 1024
#: Longest evidence string kept in a Finding.
EVIDENCE_CHARS = 500
#: Lines remembered per output stream (used for split messages and context).
WINDOW_LINES = 6
#: Findings kept in :attr:`Classifier.findings`; later ones are still counted
#: for the verdict but not stored, so a log that repeats one error a million
#: times does not grow memory.
MAX_FINDINGS = 200
#: A carriage-return-separated line with more segments than this is reduced to
#: its first and last few segments (they are progress-bar redraws).
MAX_CR_SEGMENTS = 8


@dataclass(frozen=True)
class Finding:
    """One decisive line: what it proves, the line itself and where it points."""

    verdict: str          # one of the constants above
    evidence: str         # the deciding line, without rank prefixes and ANSI codes, at most ~500 chars
    backend: str | None  # "cuda", "rocm", "npu", "xpu", "mps", "cpu" or None
    rule: str             # name of the rule that matched


@dataclass(frozen=True)
class Rule:
    """One row of the rule table.

    ``needles`` are lower-case substrings; the regex only runs on a line whose
    lower-cased text contains one of them, which keeps the table cheap on the
    thousands of ordinary lines.  ``backend`` None on a GPU rule means "guess
    from the line" (a bare ``torch.OutOfMemoryError`` class name, say).
    ``weight`` ranks not-OOM evidence: 3 names a concrete cause, 2 is a generic
    exception line, 1 is a launcher wrapper that only says "a child failed",
    0 is informational and never decides a verdict on its own.
    """

    name: str
    verdict: str
    backend: str | None
    needles: tuple[str, ...]
    pattern: re.Pattern[str]
    weight: int = 3


def _r(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, flags)


# The allocator messages are matched at the start of a line or right after an
# exception class ("RuntimeError: ", "torch.OutOfMemoryError: ", C++ "what():  ").
# A dataset sample quoting the same words in the middle of a sentence is not.
_AT = r"(?:^|(?:Error|Exception|what\(\))\s*:\s*)"
_OOM = r"out\s*of\s*memory"
_EXIT = r"\b(?:exit(?:ed)?\s*(?:with\s*)?(?:code|status)|exitcode|return\s*code|returncode)\s*[:=]?\s*"

_I = re.IGNORECASE
_MEM = ("memory",)

RULES: tuple[Rule, ...] = (
    # --- look like memory, are not: must come before the OOM rules -----------------------------
    Rule("static_tls", NOT_OOM, None, ("static tls",),
         _r(r"cannot allocate memory in static TLS block", _I)),
    Rule("ib_memlock", NOT_OOM, None, ("ibv_", "rlimit_memlock", "ulimit -l"),
         _r(r"ibv_reg_mr|ibv_create_\w+|RLIMIT_MEMLOCK|ulimit -l\b")),
    Rule("shm_exhausted", NOT_OOM, None, ("shared memory", "/dev/shm", "bus error"),
         _r(r"(?:out of|insufficient) shared memory|NCCL WARN.*(?:/dev/shm|shared memory)"
            r"|killed by signal: Bus error", _I)),
    Rule("triton_out_of_resources", NOT_OOM, None, ("outofresources", "out of resource"),
         _r(r"OutOfResources|out of resource: shared memory")),
    Rule("illegal_memory_access", NOT_OOM, None, ("illegal memory", "misaligned address", "device-side assert"),
         _r(r"illegal memory access|misaligned address|device-side assert", _I)),

    # --- GPU / accelerator memory ----------------------------------------------------------------
    Rule("cuda_oom", GPU_OOM, "cuda", _MEM, _r(_AT + r"CUDA\s*" + _OOM)),
    Rule("hip_oom", GPU_OOM, "rocm", _MEM, _r(_AT + r"HIP\s*" + _OOM)),
    Rule("npu_oom", GPU_OOM, "npu", _MEM, _r(_AT + r"NPU\s*" + _OOM)),
    Rule("xpu_oom", GPU_OOM, "xpu", _MEM, _r(_AT + r"XPU\s*" + _OOM)),
    Rule("mps_oom", GPU_OOM, "mps", _MEM, _r(_AT + r"MPS\s*backend\s*" + _OOM)),
    Rule("oom_exception_class", GPU_OOM, None, ("outofmemoryerror",),
         _r(r"^[\w.:]*OutOfMemoryError\b|instance of '[\w:]*OutOfMemoryError'")),
    Rule("cuda_error_oom", GPU_OOM, "cuda", _MEM, _r(r"CUDA\s*error\s*:\s*" + _OOM)),
    Rule("hip_error_oom", GPU_OOM, "rocm", _MEM, _r(r"HIP\s*error\s*:\s*" + _OOM)),
    Rule("hip_error_code", GPU_OOM, "rocm", ("outofmemory",),
         _r(r"\bhipErrorOutOfMemory\b|\bHIP_ERROR_OutOfMemory\b")),
    Rule("cublas_alloc_failed", GPU_OOM, "cuda", ("cublas_status_alloc",), _r(r"\bCUBLAS_STATUS_ALLOC_FAILED\b")),
    Rule("cudnn_alloc_failed", GPU_OOM, "cuda", ("cudnn_status_alloc",), _r(r"\bCUDNN_STATUS_ALLOC_FAILED\b")),
    Rule("cuda_error_code", GPU_OOM, "cuda", ("cuda_error_out_of_memory", "cudaerrormemoryallocation"),
         _r(r"\bCUDA_ERROR_OUT_OF_MEMORY\b|\bcudaErrorMemoryAllocation\b")),
    Rule("hipblas_alloc_failed", GPU_OOM, "rocm", ("hipblas_status_alloc",), _r(r"\bHIPBLAS_STATUS_ALLOC_FAILED\b")),
    Rule("rocblas_alloc_failed", GPU_OOM, "rocm", ("rocblas",),
         _r(r"\brocblas_status_memory_error\b|rocBLAS error:.*(?:" + _OOM + r"|allocation failed|failed to allocate)",
            _I)),
    Rule("nccl_cuda_oom", GPU_OOM, "cuda", ("cuda failure",), _r(r"Cuda failure(?:\s+\d+)?\s*'" + _OOM + "'", _I)),
    Rule("rccl_hip_oom", GPU_OOM, "rocm", ("hip failure",), _r(r"HIP failure(?:\s+\d+)?\s*'" + _OOM + "'", _I)),
    Rule("npu_el0004", GPU_OOM, "npu", ("el0004", "memory_allocation_failure"),
         _r(r"\bEL0004\b|Memory_Allocation_Failure")),
    Rule("npu_fail_to_allocate", GPU_OOM, "npu", ("fail_to_allocate_memory",), _r(r"\bFAIL_TO_ALLOCATE_MEMORY\b")),
    Rule("xpu_ur_oom", GPU_OOM, "xpu", ("out_of_device_memory",),
         _r(r"\bUR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY\b|\bZE_RESULT_ERROR_OUT_OF_DEVICE_MEMORY\b")),

    # --- host RAM --------------------------------------------------------------------------------
    Rule("pinned_host_alloc", HOST_OOM, "cpu", _MEM,
         _r(r"(?:cudaHostAlloc|hipHostMalloc|CachingHostAllocator|pin_?memory|pinned memory).{0,200}?" + _OOM
            + r"|" + _OOM + r".{0,200}?(?:cudaHostAlloc|hipHostMalloc|CachingHostAllocator|pinned memory)", _I)),
    Rule("cpu_allocator", HOST_OOM, "cpu", ("defaultcpuallocator",),
         _r(r"DefaultCPUAllocator: can't allocate memory")),
    Rule("std_bad_alloc", HOST_OOM, "cpu", ("bad_alloc",), _r(r"\bstd::bad_alloc\b")),
    Rule("numpy_memory_error", HOST_OOM, "cpu", ("arraymemoryerror", "unable to allocate"),
         _r(r"^[\w.]*_ArrayMemoryError\b|Unable to allocate [\d.]+ [KMGTPE]?i?B for an array")),
    Rule("python_memory_error", HOST_OOM, "cpu", ("memoryerror",), _r(r"^(?:builtins\.)?MemoryError\b")),
    Rule("rust_alloc_failed", HOST_OOM, "cpu", ("memory allocation of",), _r(r"memory allocation of \d+ bytes failed")),
    Rule("errno_enomem", HOST_OOM, "cpu", ("cannot allocate memory", "errno 12", "enomem"),
         _r(r"Cannot allocate memory|\[Errno 12\]|\bENOMEM\b", _I)),
    Rule("kernel_oom_killer", HOST_OOM, "cpu", ("out of memory", "oom-kill"),
         _r(r"Out of memory: Kill(?:ed)? process|invoked oom-killer|\boom-kill:|Memory cgroup out of memory")),
    Rule("torchrun_sigkill", HOST_OOM, "cpu", ("sigkill",), _r(r"Signal 9 \(SIGKILL\) received by PID")),
    Rule("exit_code_sigkill", HOST_OOM, "cpu", ("exit", "return"), _r(_EXIT + r"(?:-9|137)\b", _I)),
    Rule("killed_by_signal", HOST_OOM, "cpu", ("signal",),
         _r(r"<Signals\.SIGKILL: 9>|(?:killed|terminated) by signal:? (?:9\b|SIGKILL\b|Killed\b)", _I)),
    Rule("shell_killed", HOST_OOM, "cpu", ("killed",),
         _r(r"^Killed(?:\s|$)|^\[\d+\][+-]?\s+Killed\b|\bline \d+:\s+\d+\s+Killed\b|[\]|]\s*Killed\s*$")),

    # --- other failures (evidence for not_oom) -----------------------------------------------------
    Rule("disk_full", NOT_OOM, None, ("no space left", "errno 28", "enospc"),
         _r(r"No space left on device|\[Errno 28\]|\bENOSPC\b")),
    Rule("nccl_watchdog_timeout", NOT_OOM, None, ("watchdog",), _r(r"Watchdog caught collective operation timeout")),
    Rule("collective_timeout", NOT_OOM, None, ("timeout", "timed out", "diststoreerror"),
         _r(r"\b[NHR]CCL timeout\b|Timed out waiting \d+\s*ms|\bDistStoreError\b|Socket Timeout"
            r"|wait timeout after \d+\s*ms|collective operation timeout", _I)),
    Rule("fp16_min_loss_scale", NOT_OOM, None, ("loss scale",), _r(r"Current loss scale already at minimum")),
    Rule("fp16_overflow", NOT_OOM, None, ("overflow",), _r(r"OVERFLOW! Rank \d+ Skipping step"), weight=0),
    Rule("segfault", NOT_OOM, None, ("segmentation", "sigsegv", "signal 11", "exit", "return"),
         _r(r"Segmentation fault|\bSIGSEGV\b|Signal 11 \(|" + _EXIT + r"(?:-11|139)\b", _I)),
    Rule("dataset_error", NOT_OOM, None, ("dataset", "valid samples", "template"),
         _r(r"Undefined dataset \S+ in dataset_info|Cannot find valid samples|Cannot open \S*dataset_info\.json"
            r"|Template \S+ does not exist|Cannot find dataset|is not a valid dataset")),
    Rule("import_error", NOT_OOM, None, ("importerror", "modulenotfounderror"),
         _r(r"^(?:[\w.]+\.)?(?:ImportError|ModuleNotFoundError)\b")),
    Rule("accelerator_error", NOT_OOM, None, ("error",),
         _r(r"\b(?:CUDA|HIP)\s*error\s*:|\bnccl\w*Error\b|\bNCCL error\b|\bHCCL error\b", _I), weight=2),
    Rule("abort_signal", NOT_OOM, None, ("abort", "sigabrt", "exit"),
         _r(r"Signal 6 \(SIGABRT\)|\bSIGABRT\b|Aborted \(core dumped\)|\b(?:exit\s*code|exitcode)\s*[:=]?\s*"
            r"(?:-6|134)\b"), weight=2),
    Rule("launcher_wrapper", NOT_OOM, None,
         ("childfailederror", "calledprocesserror", "non-zero exit", "exitcode", "return code", "received by pid"),
         _r(r"ChildFailedError|CalledProcessError|returned non-zero exit status|failed \(exitcode: -?\d+\)"
            r"|exits with return code = -?\d+|Signal \d+ \(SIG\w+\) received by PID"), weight=1),
    Rule("python_exception", NOT_OOM, None, ("error", "exception"),
         _r(r"^(?:[\w.]+\.)?(?:[A-Z]\w*)?(?:Error|Exception)(?::|$)"), weight=2),
)

#: Lines that prove the run got to the end (only used with exit code 0 or on a bare log).
SUCCESS_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("lf_train_metrics", _r(r"^\*{5} train metrics \*{5}$")),
    ("hf_training_completed", _r(r"^Training completed\. Do not forget to share your model")),
)

# Cheap gate: a line whose lower-cased text holds no needle of any rule is skipped at once.
_TRIGGER_WORDS: tuple[str, ...] = tuple(sorted({n for rule in RULES for n in rule.needles}))
# A line whose end holds one of these may be the first half of a split OOM message.
_SPLIT_WORDS: tuple[str, ...] = (
    "cuda", "hip", "npu", "xpu", "mps", "out", "mem", "alloc", "std::", "cannot", "can't", "sig", "exit",
    "kill", "failure", "error", "code", "bad",
)
# The start of a fresh log record; such a line is never the second half of a split message.
_RECORD_START = _r(r"^(?:\[(?:INFO|WARNING|WARN|ERROR|DEBUG|CRITICAL)\b|\[\d{4}-\d\d-\d\d|[IWEF]\d{4} \d\d:"
                   r"|\d{4}-\d\d-\d\d[ T]\d\d:|Traceback \(most recent|File \"|\d+%\|)")


def _has_any(low: str, words: tuple[str, ...]) -> bool:
    for word in words:
        if word in low:
            return True
    return False


_ANSI = _r(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_CONTROL = _r(r"[\x00-\x08\x0b-\x1f\x7f]")
# Rank / launcher prefixes: "[rank3]: ", "[default0]:", "[1,0]<stderr>:", "[Rank 0]: ".
_PREFIX = _r(r"^(?:\[(?:rank\s*\d+|default\d+|Rank \d+|\d+,\d+)\](?:<std(?:out|err)>)?:\s?)+")
# LLaMA-Factory prints one tokenized training example; its decoded text is user data.
_ECHO_START = _r(r"^(?:training example|(?:chosen_|rejected_)?(?:input_ids|inputs|label_ids|labels))\s*:\s*$")
_ECHO_END = _r(r"^(?:\[(?:INFO|WARNING|WARN|ERROR|DEBUG|CRITICAL)\b|\[\d{4}-\d\d-\d\d|[IWEF]\d{4} \d\d:"
               r"|\d{4}-\d\d-\d\d[ T]\d\d:|Traceback \(most recent call last\))")
_ECHO_MAX_LINES = 5000
# A single line that is clearly a data sample (JSON record or chat-template text).
_SAMPLE = _r(r"^\[?\{\s*\"|<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|<\|start_header_id\|>"
             r"|\[INST\]|<\|user\|>|<\|assistant\|>|<start_of_turn>")
# Recent lines that turn a bare "CUDA error: out of memory" into a pinned host allocation failure.
_PINNED_CONTEXT = _r(r"pin_memory|cudaHostAlloc|hipHostMalloc|CachingHostAllocator|HostAlloc")
_PINNED_ELIGIBLE = frozenset({"cuda_error_oom", "hip_error_oom", "cuda_error_code", "hip_error_code"})

_BACKEND_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (_r(r"\bHIP\b|\bROCm\b|\bhip\w*|\bDCU\b", _I), "rocm"),
    (_r(r"\bNPU\b|torch_npu|\bnpu\b|\bAscend\b|\bACL\b"), "npu"),
    (_r(r"\bXPU\b|\bxpu\b|level_zero"), "xpu"),
    (_r(r"\bMPS\b"), "mps"),
    (_r(r"\bCUDA\b|\bcuda\b|\bcuBLAS\b|\bNCCL\b"), "cuda"),
)


def guess_backend(text: str) -> str | None:
    """The accelerator a line talks about, or None when it names none."""
    for pattern, backend in _BACKEND_HINTS:
        if pattern.search(text):
            return backend
    return None


def clean_line(line: str) -> str:
    """A log line as rules see it: no ANSI codes, no control bytes, no rank prefix, no outer blanks."""
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    line = _CONTROL.sub("", line).strip()
    if line.startswith("["):
        line = _PREFIX.sub("", line, count=1).strip()
    return line


def _stream_key(line: str, stream: str | None) -> tuple[str | None, str]:
    m = _PREFIX.match(line.lstrip()) if line[:1] in "[ \t" else None
    return stream, (m.group(0).strip() if m else "")


def _evidence(text: str) -> str:
    text = text.strip()
    if len(text) > EVIDENCE_CHARS:
        return text[:EVIDENCE_CHARS - 1] + "\u2026"
    return text


class _Stream:
    """What the classifier remembers about one output stream (one rank)."""

    __slots__ = ("recent", "in_echo", "echo_lines")

    def __init__(self) -> None:
        self.recent: deque[str] = deque(maxlen=WINDOW_LINES)
        self.in_echo = False
        self.echo_lines = 0


class Classifier:
    """Streaming log classifier; one instance per training attempt.

    Feed lines in the order they arrive (all ranks interleaved is fine);
    :meth:`feed` returns a Finding as soon as a line proves an OOM.
    """

    def __init__(self) -> None:
        self._findings: list[Finding] = []
        self._first_oom: Finding | None = None
        self._oom_backends: dict[str, str | None] = {}
        self._best_other: Finding | None = None
        self._best_weight = -1
        self._success: Finding | None = None
        self._streams: dict[tuple[str | None, str], _Stream] = {}
        self.lines_seen = 0

    # -- public API --------------------------------------------------------------------------

    @property
    def findings(self) -> list[Finding]:
        """Every notable line so far (OOM and not-OOM evidence), oldest first, at most MAX_FINDINGS."""
        return list(self._findings)

    def feed(self, line: str, stream: str | None = None) -> Finding | None:
        """Classify one line as it arrives.

        ``stream`` optionally names where the line came from (say "stdout" or
        "stderr"); lines of different streams or ranks are never joined.
        Returns the Finding when this line proves a GPU or host OOM, else None.
        """
        self.lines_seen += 1
        if not line:
            return None
        if "\r" in line:
            segments = [s for s in line.split("\r") if s.strip()]
            if len(segments) > MAX_CR_SEGMENTS:
                half = MAX_CR_SEGMENTS // 2
                segments = segments[:half] + segments[-half:]
        else:
            segments = [line]
        result: Finding | None = None
        for segment in segments:
            found = self._feed_segment(segment, stream)
            if found is not None and result is None:
                result = found
        return result

    def conclude(self, exit_code: int | None) -> Finding:
        """The verdict once the process has ended (``exit_code`` None: a bare log, exit unknown)."""
        if self._first_oom is not None:
            first = self._first_oom
            if first.backend is None:
                backend = self._oom_backends.get(first.verdict)
                if backend is not None:
                    first = replace(first, backend=backend)
            return first
        if exit_code == 0:
            if self._success is not None:
                return self._success
            return Finding(SUCCESS, "process exited with code 0", None, "exit_code")
        if exit_code in (-9, 137):
            return Finding(HOST_OOM, f"process exited with code {exit_code} (killed by SIGKILL)", "cpu",
                           "exit_code_sigkill")
        if exit_code is None:
            if self._best_other is not None and self._best_weight >= 1:
                return self._best_other
            if self._success is not None:
                return self._success
            return Finding(UNKNOWN, "", None, "no_evidence")
        if self._best_other is not None and self._best_weight >= 1:
            return self._best_other
        return Finding(NOT_OOM, f"process exited with code {exit_code}", None, "exit_code")

    # -- internals -----------------------------------------------------------------------------

    def _feed_segment(self, raw: str, stream: str | None) -> Finding | None:
        head = raw[:SCAN_CHARS]
        key = _stream_key(head, stream)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream()
        text = clean_line(head)
        tail = clean_line(raw[-TAIL_CHARS:]) if len(raw) > SCAN_CHARS else ""
        if not text and not tail:
            return None

        if st.in_echo:
            st.echo_lines += 1
            if _ECHO_END.match(text) or st.echo_lines > _ECHO_MAX_LINES:
                st.in_echo = False
            elif not _ECHO_START.match(text):
                return None
        if _ECHO_START.match(text):
            st.in_echo, st.echo_lines = True, 0
            st.recent.clear()
            return None
        if ("<" in text or "{" in text[:3] or "[INST]" in text) and _SAMPLE.search(text):
            return None

        found = self._match(text, st) if _has_any(text.lower(), _TRIGGER_WORDS) else None
        if found is None and tail and _has_any(tail.lower(), _TRIGGER_WORDS):
            found = self._match(tail, st)
        if found is None and st.recent:
            found = self._match_split(st.recent[-1], text, st)
            if found is None and len(st.recent) >= 2 and len(st.recent[-1]) < 200:
                # a message torn into three pieces: the middle piece is short
                found = self._match_split(st.recent[-2] + st.recent[-1], text, st)
        if found is None and ("*****" in text or text.startswith("Training")):
            for name, pattern in SUCCESS_RULES:
                if pattern.search(text):
                    if self._success is None or name == "lf_train_metrics":
                        self._success = Finding(SUCCESS, _evidence(text), None, name)
                    break
        st.recent.append(text[:SCAN_CHARS])
        if found is None:
            return None
        self._record(found)
        if found.verdict in OOM_VERDICTS:
            st.recent.clear()  # a proven message must not be joined again with the next line
            return found
        return None

    def _match(self, text: str, st: _Stream) -> Finding | None:
        low = text.lower()
        for rule in RULES:
            if _has_any(low, rule.needles) and rule.pattern.search(text):
                return self._finding(rule, text, text, st)
        return None

    def _match_split(self, prev: str, text: str, st: _Stream) -> Finding | None:
        """Find an OOM message that the writer split across this line and the previous one."""
        if not _has_any(prev[-48:].lower(), _SPLIT_WORDS) or _RECORD_START.match(text):
            return None
        joined = prev + text[:512]
        cut = len(prev)
        low = joined.lower()
        if not _has_any(low, _TRIGGER_WORDS):
            return None
        for rule in RULES:
            m = rule.pattern.search(joined) if _has_any(low, rule.needles) else None
            if m is None or not (m.start() < cut < m.end()):
                continue
            if rule.verdict not in OOM_VERDICTS:
                return None
            shown = (prev if len(prev) <= 300 else "\u2026" + prev[-300:]) + " " + text
            return self._finding(rule, joined, shown, st)
        return None

    def _finding(self, rule: Rule, matched: str, shown: str, st: _Stream) -> Finding:
        verdict, backend, name = rule.verdict, rule.backend, rule.name
        if verdict == GPU_OOM:
            if name in _PINNED_ELIGIBLE and any(_PINNED_CONTEXT.search(p) for p in st.recent):
                verdict, backend, name = HOST_OOM, "cpu", "pinned_host_alloc"
            elif backend is None:
                backend = guess_backend(matched)
        return Finding(verdict, _evidence(shown), backend, name)

    def _record(self, finding: Finding) -> None:
        if len(self._findings) < MAX_FINDINGS:
            self._findings.append(finding)
        if finding.verdict in OOM_VERDICTS:
            if self._first_oom is None:
                self._first_oom = finding
            if finding.backend is not None:
                self._oom_backends.setdefault(finding.verdict, finding.backend)
            return
        weight = _WEIGHTS[finding.rule]
        if weight > self._best_weight:
            self._best_weight, self._best_other = weight, finding


_WEIGHTS: dict[str, int] = {rule.name: rule.weight for rule in RULES}


def classify_text(text: str, exit_code: int | None = None) -> Finding:
    """Classify a whole log held in memory; ``exit_code`` None means the exit status is unknown."""
    clf = Classifier()
    for line in text.split("\n"):
        clf.feed(line)
    return clf.conclude(exit_code)


__all__ = [
    "GPU_OOM", "HOST_OOM", "NOT_OOM", "SUCCESS", "STALLED", "INTERRUPTED", "UNKNOWN", "OOM_VERDICTS",
    "Finding", "Rule", "RULES", "Classifier", "classify_text", "clean_line", "guess_backend",
]
