"""The patterns the log classifier knows, and the helpers that prepare a line for them.

:data:`RULES` is the table of everything a line can prove: a compiled regex, a
rule name, the verdict it proves and the accelerator backend it points at.
Rules are tried in table order and the first hit decides the line, so the few
"looks like memory but is not" rules (static TLS, ``/dev/shm``, locked memory
for InfiniBand) sit before the OOM rules they would otherwise collide with.
Around the table sit the success markers, the cheap word gates that spare the
regexes most ordinary lines, the patterns that recognise a dataset sample
echoed into the log, the patterns the classifier uses to decide whether an OOM
line killed the run (:data:`TRACEBACK_CONTEXT`, :data:`TRACEBACK_START`,
:data:`RECOVERY` and the rules marked :attr:`Rule.dies`), and
:func:`clean_line` / :func:`rank_prefix` / :func:`guess_backend`.

Wordings come from real logs: the runs captured here (``tests/logs``) and the
public failure logs in ``tests/logs/public`` (``scripts/bench_diagnose_corpus.py``
measures the table against those).

This module holds data and pure functions only; :mod:`dsplan.logs.classifier`
applies them to a stream of lines.  Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dsplan.codes import Verdict

GPU_OOM, HOST_OOM, NOT_OOM = Verdict.GPU_OOM, Verdict.HOST_OOM, Verdict.NOT_OOM


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
    ``dies`` marks an OOM line that itself reports a death (a kill by the
    kernel or by Ray, a SIGKILL exit code, an abort): such a line needs no
    traceback to confirm it (see the confirmation rule in
    :mod:`dsplan.logs.classifier`).
    """

    name: str
    verdict: str
    backend: str | None
    needles: tuple[str, ...]
    pattern: re.Pattern[str]
    weight: int = 3
    dies: bool = False


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

    # --- host RAM reported by Ray's memory monitor (its exception class is also "OutOfMemoryError") -
    Rule("ray_memory_monitor", HOST_OOM, "cpu", ("low on memory", "memory pressure", "memory on the node",
                                                 "system memory low"),
         _r(r"Task was killed due to the node running low on memory|Workers \(tasks / actors\) killed due to "
            r"memory pressure \(OOM\)|^Memory on the node \(IP: [^)]*\)[^.]* where the task|System memory low "
            r"at node with IP"), dies=True),

    # TensorFlow's pinned host buffers: a CUDA error code, but about host RAM (before the CUDA rules).
    Rule("tf_host_alloc", HOST_OOM, "cpu", ("on host", "memory"),
         _r(r"\bbytes on host: (?:CUDA_ERROR_OUT_OF_MEMORY|hipErrorOutOfMemory)|could not allocate pinned host "
            r"memory")),

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
    Rule("xpu_allocation_out_of_device_memory", GPU_OOM, "xpu", ("out of device memory",),
         _r(r"Allocation is out of device memory on current platform")),
    Rule("metal_oom", GPU_OOM, "mps", ("outofmemory", "unable to allocate"),
         _r(r"kIOGPUCommandBufferCallbackErrorOutOfMemory|\[malloc_or_wait\] Unable to allocate \d+ bytes")),
    Rule("vllm_no_kv_cache_memory", GPU_OOM, None, _MEM,
         _r(_AT + r"No available memory for the cache blocks|the rest of the memory reserved for KV Cache is -\d",
            _I)),

    # --- host RAM --------------------------------------------------------------------------------
    Rule("pinned_host_alloc", HOST_OOM, "cpu", _MEM,
         _r(r"(?:cudaHostAlloc|hipHostMalloc|CachingHostAllocator|pin_?memory|pinned memory).{0,200}?" + _OOM
            + r"|" + _OOM + r".{0,200}?(?:cudaHostAlloc|hipHostMalloc|CachingHostAllocator|pinned memory)", _I)),
    Rule("cpu_allocator", HOST_OOM, "cpu", ("defaultcpuallocator",),
         _r(r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory)")),
    Rule("std_bad_alloc_terminate", HOST_OOM, "cpu", ("bad_alloc",),
         _r(r"terminate called after throwing an instance of 'std::bad_alloc'|what\(\):\s*std::bad_alloc\b"),
         dies=True),
    Rule("std_bad_alloc", HOST_OOM, "cpu", ("bad_alloc",), _r(r"\bstd::bad_alloc\b")),
    Rule("numpy_memory_error", HOST_OOM, "cpu", ("arraymemoryerror", "unable to allocate"),
         _r(r"^[\w.]*_ArrayMemoryError\b|Unable to allocate [\d.]+ [KMGTPE]?i?B for an array")),
    Rule("python_memory_error", HOST_OOM, "cpu", ("memoryerror",), _r(r"^(?:builtins\.)?MemoryError\b")),
    Rule("rust_alloc_failed", HOST_OOM, "cpu", ("memory allocation of",), _r(r"memory allocation of \d+ bytes failed"),
         dies=True),
    Rule("errno_enomem", HOST_OOM, "cpu", ("cannot allocate memory", "errno 12", "enomem"),
         _r(r"Cannot allocate memory|\[Errno 12\]|\bENOMEM\b", _I)),
    Rule("kernel_oom_killer", HOST_OOM, "cpu", ("out of memory", "oom-kill"),
         _r(r"Out of memory: Kill(?:ed)? process|invoked oom-killer|\boom-kill:|Memory cgroup out of memory"),
         dies=True),
    Rule("torchrun_sigkill", HOST_OOM, "cpu", ("sigkill",), _r(r"Signal 9 \(SIGKILL\) received by PID"), dies=True),
    Rule("exit_code_sigkill", HOST_OOM, "cpu", ("exit", "return"), _r(_EXIT + r"(?:-9|137)\b", _I), dies=True),
    Rule("killed_by_signal", HOST_OOM, "cpu", ("signal",),
         _r(r"<Signals\.SIGKILL: 9>|(?:killed|terminated) by signal:? (?:9\b|SIGKILL\b|Killed\b)", _I), dies=True),
    Rule("shell_killed", HOST_OOM, "cpu", ("killed",),
         _r(r"^Killed(?:\s|$)|^\[\d+\][+-]?\s+Killed\b|\bline \d+:\s+\d+\s+Killed\b|[\]|]\s*Killed\s*$"), dies=True),

    # --- other failures (evidence for not_oom) -----------------------------------------------------
    Rule("disk_full", NOT_OOM, None, ("no space left", "errno 28", "enospc"),
         _r(r"No space left on device|\[Errno 28\]|\bENOSPC\b")),
    Rule("nccl_watchdog_timeout", NOT_OOM, None, ("watchdog",), _r(r"Watchdog caught collective operation timeout")),
    Rule("collective_timeout", NOT_OOM, None, ("timeout", "timed out", "diststoreerror"),
         _r(r"\b[NHR]CCL timeout\b|Timed out waiting \d+\s*ms|\bDistStoreError\b|Socket Timeout"
            r"|wait timeout after \d+\s*ms|collective operation timeout|NCCL operations have failed or timed out",
            _I)),
    Rule("fp16_min_loss_scale", NOT_OOM, None, ("loss scale",), _r(r"Current loss scale already at minimum")),
    Rule("fp16_overflow", NOT_OOM, None, ("overflow",), _r(r"OVERFLOW! Rank \d+ Skipping step"), weight=0),
    Rule("segfault", NOT_OOM, None, ("segmentation", "sigsegv", "signal 11", "exit", "return"),
         _r(r"Segmentation fault|\bSIGSEGV\b|Signal 11 \(|" + _EXIT + r"(?:-11|139)\b", _I)),
    Rule("dataset_error", NOT_OOM, None, ("dataset", "valid samples", "template"),
         _r(r"Undefined dataset \S+ in dataset_info|Cannot find valid samples|Cannot open \S*dataset_info\.json"
            r"|Template \S+ does not exist|Cannot find dataset|is not a valid dataset")),
    Rule("import_error", NOT_OOM, None, ("importerror", "modulenotfounderror"),
         _r(r"^(?:[\w.]+\.)?(?:ImportError|ModuleNotFoundError)\b")),
    Rule("accelerator_error", NOT_OOM, None, ("error", "failure"),
         _r(r"\b(?:CUDA|HIP)\s*error\s*:|\bnccl\w*Error\b|\bNCCL error\b|\bHCCL error\b"
            r"|NCCL WARN (?:Cuda|HIP) failure", _I), weight=2),
    # Ascend CANN error codes; EL0004 (memory) is matched by npu_el0004 further up.
    Rule("ascend_error_code", NOT_OOM, None, ("inner error", "ee9999", "ez9999", "ee1001", "pta call"),
         _r(r"\bE[E-KZ]\d{4}\b|\bERR\d{5} PTA call acl api failed"), weight=2),
    Rule("abort_signal", NOT_OOM, None, ("abort", "sigabrt", "exit"),
         _r(r"Signal 6 \(SIGABRT\)|\bSIGABRT\b|Aborted \(core dumped\)|\b(?:exit\s*code|exitcode)\s*[:=]?\s*"
            r"(?:-6|134)\b"), weight=2),
    Rule("launcher_wrapper", NOT_OOM, None,
         ("childfailederror", "calledprocesserror", "non-zero exit", "exitcode", "return code", "received by pid",
          "root cause"),
         _r(r"ChildFailedError|CalledProcessError|returned non-zero exit status|failed \(exitcode: -?\d+\)"
            r"|exits with return code = -?\d+|Signal \d+ \(SIG\w+\) received by PID"
            r"|Root Cause \(first observed failure\)"), weight=1),
    Rule("python_exception", NOT_OOM, None, ("error", "exception"),
         _r(r"^(?:[\w.]+\.)?(?:[A-Z]\w*)?(?:Error|Exception)(?::|$)"), weight=2),
)

#: How much each rule's not-OOM evidence counts (see :attr:`Rule.weight`), by rule name.
WEIGHTS: dict[str, int] = {rule.name: rule.weight for rule in RULES}
#: Names of the OOM rules whose line reports a death by itself (see :attr:`Rule.dies`).
DEATH_RULES: frozenset[str] = frozenset(rule.name for rule in RULES if rule.dies)

#: Lines that prove the run got to the end (only used with exit code 0 or on a bare log).
SUCCESS_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("lf_train_metrics", _r(r"^\*{5} train metrics \*{5}$")),
    ("hf_training_completed", _r(r"^Training completed\. Do not forget to share your model")),
    # the summary dict transformers' Trainer.train() logs as it returns (ms-swift writes it as JSON)
    ("hf_train_summary", _r(r"^\{['\"]train_runtime['\"]:\s*[\d.]+,")),
    ("deepspeed_launcher_success", _r(r"\[launch\.py:\d+:main\] Process \d+ exits successfully\.")),
)

def _minimal(words: set[str]) -> tuple[str, ...]:
    """The words that hold no other word of the set: a text holds one of ``words`` exactly when it holds
    one of these, and the gate below checks fewer of them."""
    return tuple(sorted(w for w in words if not any(v != w and v in w for v in words)))


# Cheap gate: a line whose lower-cased text holds no needle of any rule is skipped at once.
TRIGGER_WORDS: tuple[str, ...] = _minimal({n for rule in RULES for n in rule.needles})
# A line whose end holds one of these may be the first half of a split OOM message.
SPLIT_WORDS: tuple[str, ...] = (
    "cuda", "hip", "npu", "xpu", "mps", "out", "mem", "alloc", "std::", "cannot", "can't", "sig", "exit",
    "kill", "failure", "error", "code", "bad",
)
# The start of a fresh log record; such a line is never the second half of a split message.
RECORD_START = _r(r"^(?:\[(?:INFO|WARNING|WARN|ERROR|DEBUG|CRITICAL)\b|\[\d{4}-\d\d-\d\d|[IWEF]\d{4} \d\d:"
                  r"|\d{4}-\d\d-\d\d[ T]\d\d:|Traceback \(most recent|File \"|\d+%\|)")


def has_any(low: str, words: tuple[str, ...]) -> bool:
    """Does the lower-cased text ``low`` contain any of ``words``?"""
    for word in words:
        if word in low:
            return True
    return False


_ANSI = _r(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_CONTROL = _r(r"[\x00-\x08\x0b-\x1f\x7f]")
# Rank / launcher prefixes: "[rank3]: ", "[default0]:", "[1,0]<stderr>:", "[Rank 0]: ".
_PREFIX = _r(r"^(?:\[(?:rank\s*\d+|default\d+|Rank \d+|\d+,\d+)\](?:<std(?:out|err)>)?:\s?)+")
# LLaMA-Factory prints one tokenized training example; its decoded text is user data.
ECHO_START = _r(r"^(?:training example|(?:chosen_|rejected_)?(?:input_ids|inputs|label_ids|labels))\s*:\s*$")
ECHO_END = _r(r"^(?:\[(?:INFO|WARNING|WARN|ERROR|DEBUG|CRITICAL)\b|\[\d{4}-\d\d-\d\d|[IWEF]\d{4} \d\d:"
              r"|\d{4}-\d\d-\d\d[ T]\d\d:|Traceback \(most recent call last\))")
ECHO_MAX_LINES = 5000
# A single line that is clearly a data sample (JSON record or chat-template text).
SAMPLE = _r(r"^\[?\{\s*\"|<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|<\|start_header_id\|>"
            r"|\[INST\]|<\|user\|>|<\|assistant\|>|<start_of_turn>")
# An OOM line is part of a traceback when its own line or one of the few lines before it (same stream
# and rank) looks like one: a header, a frame in CPython, IPython or Rich form, a caret line, a chained-
# exception banner, or an exception line (the first line of a multi-line message, as in Ascend's).
TRACEBACK_CONTEXT = _r(r"Traceback \(most recent call last\)|\bFile \"[^\"]+\", line \d+|^File \S.*:\d+, in "
                       r"|\.py:\d+ in \w|\.py in \w+\(|^-+> *\d+ |^Cell In\[|^[~^]*\^[~^]*$"
                       r"|During handling of the above exception|direct cause of the following exception"
                       r"|^\[Previous line repeated|[╭╰└]─{3,}|^(?:[\w.]+\.)?[A-Z]\w*(?:Error|Exception)\b")
# A traceback starting: confirms a bare OOM line seen just before it.
TRACEBACK_START = _r(r"Traceback \(most recent call last\)")
# Words with which a program says it handled an OOM and goes on (on the OOM line or the line after it).
RECOVERY = _r(r"\b(?:retry|retrying|retried|skip|skipping|skipped|caught|catching|recover(?:ed|ing)?"
              r"|trying again|will try again|falling back|reducing (?:the )?batch|halving)\b", _I)

# Recent lines that turn a bare "CUDA error: out of memory" into a pinned host allocation failure.
PINNED_CONTEXT = _r(r"pin_memory|cudaHostAlloc|hipHostMalloc|CachingHostAllocator|HostAlloc")
PINNED_ELIGIBLE = frozenset({"cuda_error_oom", "hip_error_oom", "cuda_error_code", "hip_error_code"})

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


# Markdown a person wraps around a pasted line (``**Killed**``, `` `RuntimeError: ...` ``); never a log's own.
_PASTE_MARKUP = _r(r"^(?:\*\*(?!\*)|`+)|(?:(?<!\*)\*\*|`+)$")


def clean_line(line: str) -> str:
    """A log line as rules see it: no ANSI codes, no control bytes, no rank prefix, no outer blanks,
    no markdown emphasis or code quotes around a pasted line."""
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    line = _CONTROL.sub("", line).strip()
    if line[:1] in "`*" or line[-1:] in "`*":
        line = _PASTE_MARKUP.sub("", line).strip()
    if line.startswith("["):
        line = _PREFIX.sub("", line, count=1).strip()
    return line


def rank_prefix(line: str) -> str:
    """The rank or launcher prefix a raw line starts with (``"[rank3]:"``), or ``""``."""
    m = _PREFIX.match(line.lstrip()) if line[:1] in "[ \t" else None
    return m.group(0).strip() if m else ""
