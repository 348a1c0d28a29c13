"""The log classifier: the corpus in tests/logs, the rule table, and the streaming behaviour."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dsplan.logs import classifier as v
from dsplan.logs.classifier import (
    GPU_OOM,
    HOST_OOM,
    NOT_OOM,
    SUCCESS,
    UNKNOWN,
    Classifier,
    Finding,
    classify_text,
)

LOGS = Path(__file__).resolve().parent / "logs"
CORPUS = sorted(LOGS.glob("*.log"))
GPU_BACKENDS = {"cuda", "rocm", "npu", "xpu", "mps"}


def _expected(path: Path):
    verdict, rest = path.stem.split("__", 1)
    token = rest.split("_", 1)[0]
    return verdict, (token if token in GPU_BACKENDS else None)


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def test_corpus_is_there_and_named_right():
    assert len(CORPUS) >= 40
    verdicts = {_expected(p)[0] for p in CORPUS}
    assert verdicts == {GPU_OOM, HOST_OOM, NOT_OOM, SUCCESS, UNKNOWN}
    backends = {_expected(p)[1] for p in CORPUS if _expected(p)[0] == GPU_OOM}
    assert GPU_BACKENDS <= backends
    sources = (LOGS / "SOURCES.md").read_text(encoding="utf-8")
    missing = [p.name for p in CORPUS if p.name not in sources]
    assert not missing, f"corpus files without a SOURCES.md entry: {missing}"


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_corpus_verdict(path):
    verdict, backend = _expected(path)
    text = _read(path)
    if verdict == UNKNOWN:
        assert classify_text(text, None).verdict == UNKNOWN
        assert classify_text(text, 0).verdict == SUCCESS  # a clean exit is enough to call it a success
        return
    # The launcher knows the exit code (LLaMA-Factory exits 1 on any failure); diagnose does not.
    exit_code = 0 if verdict == SUCCESS else 1
    for code in (exit_code, None):
        found = classify_text(text, code)
        assert found.verdict == verdict, (code, found)
        if verdict == GPU_OOM:
            assert found.backend == backend, found
        elif verdict == HOST_OOM:
            assert found.backend == "cpu", found
        if verdict != UNKNOWN:
            assert found.evidence, found
            assert len(found.evidence) <= v.EVIDENCE_CHARS


@pytest.mark.parametrize("path", [p for p in CORPUS if _expected(p)[0] in (GPU_OOM, HOST_OOM)],
                         ids=lambda p: p.name)
def test_feed_reports_oom_when_confirmed(path):
    """feed() answers on the line that proves the OOM or on the later line that confirms a bare one (a
    traceback, an exception, a rank's exit), never before the OOM line, and the evidence is the OOM line.
    A bare OOM line at the very end of a log is never confirmed while streaming: the exit code decides."""
    clf = Classifier(clock=None)
    lines = _read(path).split("\n")
    oom_seen_at = None
    for i, line in enumerate(lines):
        found = clf.feed(line)
        if oom_seen_at is None and any(f.verdict in (GPU_OOM, HOST_OOM) for f in clf.findings):
            oom_seen_at = i
        if found is not None:
            assert oom_seen_at is not None and oom_seen_at <= i
            assert found.verdict == _expected(path)[0]
            assert found in clf.findings  # the OOM line's own Finding, whichever line confirmed it
            final = clf.conclude(1)
            assert final == found or (final.backend and dataclasses.replace(found, backend=final.backend) == final)
            return
    assert clf.pending is not None, "an OOM log whose OOM line was neither confirmed nor left pending"
    assert clf.conclude(1).verdict == _expected(path)[0]


# One real-format line per rule; the table must classify each with that very rule.
RULE_SAMPLES = {
    "static_tls": "ImportError: /opt/libgomp.so.1: cannot allocate memory in static TLS block",
    "ib_memlock": "host:1:2 [0] misc/ibvwrap.cc:278 NCCL WARN Call to ibv_reg_mr failed with error Cannot allocate memory",
    "shm_exhausted": "ERROR: Unexpected bus error encountered in worker. This might be caused by insufficient shared memory (shm).",
    "triton_out_of_resources": "triton.runtime.errors.OutOfResources: out of resource: shared memory, Required: 81920, Hardware limit: 65536",
    "illegal_memory_access": "RuntimeError: CUDA error: an illegal memory access was encountered",
    "cuda_oom": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB. GPU 0 has a total capacity of 79.25 GiB",
    "hip_oom": "torch.OutOfMemoryError: HIP out of memory. Tried to allocate 432.00 MiB.",
    "npu_oom": "RuntimeError: NPU out of memory. Tried to allocate 22.00 MiB (NPU 0; 60.97 GiB total capacity)",
    "xpu_oom": "RuntimeError: XPU out of memory. Tried to allocate 1.71 GiB (GPU 0; 15.56 GiB total capacity)",
    "mps_oom": "RuntimeError: MPS backend out of memory (MPS allocated: 2.44 GB, other allocations: 4.34 GB, max allowed: 6.77 GB).",
    "oom_exception_class": "torch.OutOfMemoryError",
    "cuda_error_oom": "RuntimeError: CUDA error: out of memory",
    "hip_error_oom": "RuntimeError: HIP error: out of memory",
    "hip_error_code": "hipMalloc failed: hipErrorOutOfMemory",
    "cublas_alloc_failed": "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cudnn_alloc_failed": "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "cuda_error_code": "triton: CUDA driver error: CUDA_ERROR_OUT_OF_MEMORY",
    "hipblas_alloc_failed": "RuntimeError: CUDA error: HIPBLAS_STATUS_ALLOC_FAILED when calling `hipblasCreate(handle)`",
    "rocblas_alloc_failed": "rocBLAS error: rocblas_status_memory_error",
    "nccl_cuda_oom": "node:1:2 [0] include/alloc.h:48 NCCL WARN Cuda failure 'out of memory'",
    "rccl_hip_oom": "node:1:2 [0] include/alloc.h:104 NCCL WARN HIP failure 'out of memory'",
    "npu_el0004": "EL0004: 2025-01-31-08:23:58.845.175 Failed to allocate memory.",
    "npu_fail_to_allocate": "[ERROR] RUNTIME: FAIL_TO_ALLOCATE_MEMORY on device 3",
    "xpu_ur_oom": "RuntimeError: level_zero backend failed with error: 39 (UR_RESULT_ERROR_OUT_OF_DEVICE_MEMORY)",
    "pinned_host_alloc": "RuntimeError: cudaHostAlloc failed: out of memory",
    "cpu_allocator": "RuntimeError: [enforce fail at alloc_cpu.cpp:124] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000000000 bytes.",
    "std_bad_alloc_terminate": "  what():  std::bad_alloc",
    "std_bad_alloc": "RuntimeError: std::bad_alloc",
    "ray_memory_monitor": "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.",
    "xpu_allocation_out_of_device_memory": "RuntimeError: Allocation is out of device memory on current platform.",
    "metal_oom": "libc++abi: terminating due to uncaught exception of type std::runtime_error: [METAL] Command buffer execution failed: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
    "vllm_no_kv_cache_memory": "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the engine.",
    "ascend_error_code": "EE9999: Inner Error!",
    "tf_host_alloc": "E tensorflow/stream_executor/cuda/cuda_driver.cc:802] failed to alloc 34359738368 bytes on host: CUDA_ERROR_OUT_OF_MEMORY: out of memory",
    "numpy_memory_error": "numpy.core._exceptions._ArrayMemoryError: Unable to allocate 1.2 TiB for an array with shape (400000, 400000)",
    "python_memory_error": "MemoryError",
    "rust_alloc_failed": "memory allocation of 21474836480 bytes failed",
    "errno_enomem": "OSError: [Errno 12] Cannot allocate memory",
    "kernel_oom_killer": "[1.2] Out of memory: Killed process 51342 (python3) total-vm:312410420kB",
    "torchrun_sigkill": "  traceback : Signal 9 (SIGKILL) received by PID 1234",
    "exit_code_sigkill": "  exitcode  : -9 (pid: 1234)",
    "killed_by_signal": "RuntimeError: DataLoader worker (pid 40213) is killed by signal: Killed.",
    "shell_killed": "Killed",
    "disk_full": "OSError: [Errno 28] No space left on device",
    "nccl_watchdog_timeout": "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE)",
    "collective_timeout": "RuntimeError: NCCL timeout in: ProcessGroupNCCL.cpp",
    "fp16_min_loss_scale": "Exception: Current loss scale already at minimum - cannot decrease scale anymore. Exiting run.",
    "fp16_overflow": "[deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 65536, reducing to 32768",
    "segfault": "Segmentation fault (core dumped)",
    "dataset_error": "ValueError: Undefined dataset foo in dataset_info.json.",
    "import_error": "ModuleNotFoundError: No module named 'flash_attn'",
    "accelerator_error": "RuntimeError: CUDA error: device not ready",
    "abort_signal": "Aborted (core dumped)",
    "launcher_wrapper": "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
    "python_exception": "KeyError: 'instruction'",
}


def test_every_rule_has_a_sample_and_matches_it():
    names = [r.name for r in v.RULES]
    assert len(names) == len(set(names)), "rule names must be unique"
    assert set(names) == set(RULE_SAMPLES)
    for name, line in RULE_SAMPLES.items():
        clf = Classifier()
        clf.feed(line)
        got = clf.findings
        assert got and got[0].rule == name, (name, got)


def test_rule_table_shape():
    allowed = {None, "cuda", "rocm", "npu", "xpu", "mps", "cpu"}
    for rule in v.RULES:
        assert rule.verdict in (GPU_OOM, HOST_OOM, NOT_OOM)
        assert rule.backend in allowed
        assert rule.needles and all(n == n.lower() for n in rule.needles), rule.name
        if rule.verdict == HOST_OOM:
            assert rule.backend == "cpu"


def test_constants_and_finding_shape():
    assert (v.GPU_OOM, v.HOST_OOM, v.NOT_OOM, v.SUCCESS, v.STALLED, v.INTERRUPTED, v.UNKNOWN) == (
        "gpu_oom", "host_oom", "not_oom", "success", "stalled", "interrupted", "unknown")
    f = Finding(GPU_OOM, "x", "cuda", "cuda_oom")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.verdict = NOT_OOM  # type: ignore[misc]
    assert [fl.name for fl in dataclasses.fields(Finding)] == ["verdict", "evidence", "backend", "rule"]


# --- split messages ------------------------------------------------------------------------------

def _oom_of(clf: Classifier):
    """The OOM the classifier holds, confirmed or not (what a failed exit would conclude)."""
    found = clf.conclude(1)
    return found if found.verdict in (GPU_OOM, HOST_OOM) else None


def test_split_across_lines_is_joined():
    clf = Classifier()
    assert clf.feed("RuntimeError: CUDA out of") is None
    assert clf.feed("memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.64 GiB") is None  # bare
    found = _oom_of(clf)
    assert found is not None and found.verdict == GPU_OOM and found.backend == "cuda"
    assert "CUDA out of" in found.evidence and "Tried to allocate" in found.evidence


def test_split_message_inside_a_traceback_is_confirmed_at_once():
    clf = Classifier()
    assert clf.feed('  File "/opt/venv/lib/python3.11/site-packages/torch/nn/modules/linear.py", line 125, in forward') is None
    assert clf.feed("RuntimeError: CUDA out of") is None
    found = clf.feed("memory. Tried to allocate 2.00 GiB.")
    assert found is not None and found.rule == "cuda_oom"


def test_first_half_of_a_split_message_is_not_its_own_traceback_context():
    clf = Classifier()
    clf.feed("torch.OutOfMemoryError: CUDA out of")  # an exception line, but it is the message itself
    assert clf.feed("memory. Tried to allocate 2.00 GiB.") is None
    assert clf.pending is not None


def test_split_in_the_middle_of_a_word():
    clf = Classifier()
    assert clf.feed("RuntimeError: HIP out of mem") is None
    clf.feed("ory. Tried to allocate 7.50 GiB.")
    found = _oom_of(clf)
    assert found is not None and found.backend == "rocm"


def test_split_message_with_another_rank_in_between():
    clf = Classifier()
    assert clf.feed("[rank1]: RuntimeError: CUDA out of") is None
    assert clf.feed("[rank0]: {'loss': 1.3215, 'grad_norm': 0.8172}") is None
    clf.feed("[rank1]: memory. Tried to allocate 1.95 GiB.")
    found = _oom_of(clf)
    assert found is not None and found.verdict == GPU_OOM


def test_message_torn_into_three_pieces():
    clf = Classifier()
    assert clf.feed("RuntimeError: CUDA") is None
    assert clf.feed(" out of ") is None
    clf.feed("memory. Tried to allocate 20.00 MiB")
    found = _oom_of(clf)
    assert found is not None and found.rule == "cuda_oom"


def test_halves_from_different_streams_are_not_joined():
    clf = Classifier()
    assert clf.feed("RuntimeError: CUDA out of", stream="stdout") is None
    assert clf.feed("memory. Tried to allocate 1.95 GiB.", stream="stderr") is None
    assert clf.conclude(None).verdict != GPU_OOM


def test_unrelated_neighbours_do_not_make_an_oom():
    clf = Classifier()
    for line in ["We are running out of", "memory-efficient attention: enabled", "Tried to allocate nothing"]:
        assert clf.feed(line) is None


# --- robustness (how fast: scripts/bench_classifier.py) -------------------------------------------

def test_one_megabyte_line_is_not_oom():
    clf = Classifier()
    assert clf.feed("x" * (1 << 20)) is None
    assert clf.feed("error memory alloc killed exit " * 35000) is None


def test_oom_at_the_start_of_a_huge_line_is_found():
    clf = Classifier()
    clf.feed("Traceback (most recent call last):")
    found = clf.feed("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 8.00 GiB. " + "y" * (1 << 20))
    assert found is not None and found.verdict == GPU_OOM
    assert len(found.evidence) <= v.EVIDENCE_CHARS


def test_random_garbage_never_makes_an_oom():
    rng = random.Random(1234)
    blob = bytes(rng.getrandbits(8) for _ in range(1 << 18))
    text = blob.decode("utf-8", errors="replace")
    clf = Classifier()
    for line in text.split("\n"):
        assert clf.feed(line) is None
    clf.feed("\x00\x1b[31m\x1b]0;title\x07\ufffd\ufffd" * 1000)
    assert clf.conclude(None).verdict in (UNKNOWN, NOT_OOM)
    assert not [f for f in clf.findings if f.verdict in (GPU_OOM, HOST_OOM)]


def test_many_lines_keep_the_findings_capped():
    lines = _read(LOGS / "host_oom__lf_torchrun_sigkill_exit1.log").split("\n")
    body = [ln for ln in lines if "exitcode" not in ln and "SIGKILL" not in ln] * 200
    clf = Classifier()
    for line in body:
        clf.feed(line)
    assert len(clf.findings) <= v.MAX_FINDINGS


def test_ansi_codes_and_rank_prefix_are_stripped_from_evidence():
    clf = Classifier()
    clf.feed("\x1b[31m[rank3]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1 GiB\x1b[0m")
    found = _oom_of(clf)
    assert found is not None and found.evidence.startswith("torch.OutOfMemoryError: CUDA out of memory")
    clf = Classifier()
    clf.feed("[default0]:[rank0]: Traceback (most recent call last):")
    found = clf.feed("[default0]:[rank0]: RuntimeError: NPU out of memory. Tried to allocate 2 GiB")
    assert found is not None and found.backend == "npu" and found.evidence.startswith("RuntimeError")


@pytest.mark.parametrize("line", [
    "Killed",
    " 88%|########8 | 15/17 [06:21<00:50, 25.32s/it]Killed",
    " 88%|########8 | 15/17 [06:21<00:50, 25.32s/it]run.sh: line 3:  4121 Killed                  python train.py",
    "[1]+  Killed                  llamafactory-cli train lf_zero3_offload.yaml",
])
def test_shell_kill_reports(line):
    found = Classifier().feed(line)
    assert found is not None and found.verdict == HOST_OOM and found.rule == "shell_killed"


def test_carriage_return_progress_bar_then_error():
    line = "\r  1%|          | 1/100 [00:01<02:00]\r  2%|▏         | 2/100 [00:02<02:00]\rtorch.OutOfMemoryError: CUDA out of memory."
    clf = Classifier()
    clf.feed(line)
    found = _oom_of(clf)
    assert found is not None and found.rule == "cuda_oom"


# --- things that mention memory but are not an OOM ---------------------------------------------------

BENIGN = [
    "[2025-06-02 14:04:19,562] [INFO] [utils.py:782:see_memory_usage] MA 28.37 GB         Max_MA 28.37 GB         CA 28.5 GB         Max_CA 29 GB ",
    "MA 1.2 GB         Max_MA 1.3 GB         CA 1.4 GB         Max_CA 2 GB ",
    "CPU Virtual Memory:  used = 20.5 GB, percent = 16.3%",
    "[INFO|2025-06-02 14:04:10] llamafactory.model.loader:143 >> trainable params: 7,615,616,512 || all params: 7,615,616,512 || trainable%: 100.0000",
    "[W1123 10:38:11.046834240 AllocatorConfig.cpp:28] Warning: PYTORCH_CUDA_ALLOC_CONF is deprecated, use PYTORCH_ALLOC_CONF instead (function operator())",
    "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.",
    "Estimated memory needed for params, optim states and gradients for a:",
    "  191.50GB |   2.03GB | offload_param=OffloadDeviceEnum.cpu, offload_optimizer=OffloadDeviceEnum.cpu, zero_init=1",
    "/venv/lib/python3.11/site-packages/torch/utils/data/dataloader.py:668: UserWarning: 'pin_memory' argument is set as true but no accelerator is found, then device pinned memory won't be used.",
    "[2025-06-02 14:20:01,337] [WARNING] [stage3.py:2139:step] 4 pytorch allocator cache flushes since last step. this happens when there is high memory pressure and is detrimental to performance.",
    "[2023-07-04 17:31:27,755] [INFO] [launch.py:315:sigkill_handler] Killing subprocess 953850",
    "W1123 10:35:52.116000 8765 torch/distributed/elastic/multiprocessing/api.py:908] Sending process 8768 closing signal SIGTERM",
    "[INFO|2025-06-02 14:03:24] llamafactory.hparams.parser:406 >> Process rank: 0, world size: 4, device: cuda:0, distributed training: True",
    '{"instruction": "Explain", "input": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB", "output": "x"}',
    "<|im_start|>user\nRuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB<|im_end|>",
    "The answer mentions that the process ran out of memory and was Killed by the OOM killer.",
    "  exitcode  : 1 (pid: 1234)",
    "exit code 1370",
]


@pytest.mark.parametrize("line", BENIGN)
def test_benign_memory_words_are_not_findings(line):
    clf = Classifier()
    assert clf.feed(line) is None
    assert clf.findings == []
    assert clf.conclude(0).verdict == SUCCESS


def test_dataset_echo_is_user_data_until_the_next_log_record():
    clf = Classifier()
    echo = ["training example:", "input_ids:", "[1, 85, 91]", "inputs:", "<|im_start|>user", "My run crashed with",
            "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB. What now?<|im_end|>",
            "Killed", "MemoryError", "label_ids:", "[-100, -100]", "labels:", "Segmentation fault is a crash.",
            "OSError: [Errno 12] Cannot allocate memory", ""]
    for line in echo:
        assert clf.feed(line) is None, line
    assert clf.findings == []
    assert clf.feed("[INFO|configuration_utils.py:769] 2026-11-23 10:36:40,579 >> loading configuration file") is None
    clf.feed("MemoryError")
    found = _oom_of(clf)
    assert found is not None and found.verdict == HOST_OOM


def test_traceback_ends_the_dataset_echo():
    clf = Classifier()
    for line in ["labels:", "Lower the batch size.<|im_end|>", "Traceback (most recent call last):",
                 '  File "train.py", line 3, in <module>']:
        assert clf.feed(line) is None
    assert clf.feed("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1 GiB").verdict == GPU_OOM


# --- conclusions ---------------------------------------------------------------------------------------

def test_sigkill_is_host_oom_even_though_llamafactory_exits_1():
    text = _read(LOGS / "host_oom__lf_torchrun_sigkill_exit1.log")
    assert "CalledProcessError" in text and "returned non-zero exit status 1" in text
    found = classify_text(text, exit_code=1)
    assert found.verdict == HOST_OOM
    assert found.rule in ("exit_code_sigkill", "torchrun_sigkill")


def test_exit_codes_alone():
    assert Classifier().conclude(0).verdict == SUCCESS
    assert Classifier().conclude(1) == Finding(NOT_OOM, "process exited with code 1", None, "exit_code")
    assert Classifier().conclude(-9).verdict == HOST_OOM
    assert Classifier().conclude(137).verdict == HOST_OOM
    assert Classifier().conclude(None).verdict == UNKNOWN


def test_first_oom_wins_over_later_sigkill_from_teardown():
    clf = Classifier()
    assert clf.feed("[rank2]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB") is None  # bare
    confirmed = clf.feed("  exitcode  : -9 (pid: 52015)")  # the teardown confirms the GPU OOM before it
    assert confirmed is not None and confirmed.verdict == GPU_OOM and confirmed.rule == "cuda_oom"
    assert clf.conclude(-9).verdict == GPU_OOM
    assert [f.verdict for f in clf.findings] == [GPU_OOM, HOST_OOM]


def test_confirmed_oom_beats_a_clean_exit_and_errors_a_bare_one_does_not():
    traced = ("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=3)\nTraceback (most recent call last):\n"
              '  File "train.py", line 3, in <module>\nMemoryError\n')
    assert classify_text(traced, 0).verdict == HOST_OOM
    assert classify_text(traced, 1).verdict == HOST_OOM
    bare = "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=3)\nMemoryError\n"
    assert classify_text(bare, 0).verdict == SUCCESS  # a clean exit: the run survived the line
    assert classify_text(bare, 1).verdict == HOST_OOM  # still waiting when the process died
    assert classify_text(bare, None).verdict == HOST_OOM


def test_success_needs_exit_zero_or_a_completion_marker():
    healthy = "[INFO|trainer.py:2409] >> ***** Running training *****\n 50%|#####     | 2/4 [00:01<00:01]\n"
    assert classify_text(healthy, 0).verdict == SUCCESS
    assert classify_text(healthy, None).verdict == UNKNOWN
    assert classify_text(healthy + "***** train metrics *****\n", None).rule == "lf_train_metrics"


def test_overflow_lines_alone_do_not_decide():
    text = "[deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 65536, reducing to 32768\n"
    assert classify_text(text, None).verdict == UNKNOWN
    assert classify_text(text, 0).verdict == SUCCESS
    assert classify_text(text, 1).rule == "exit_code"


def test_best_not_oom_evidence_is_the_specific_cause():
    text = ("OSError: [Errno 28] No space left on device\n"
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
            "subprocess.CalledProcessError: Command '['torchrun']' returned non-zero exit status 1.\n")
    found = classify_text(text, 1)
    assert found.verdict == NOT_OOM and found.rule == "disk_full"


def test_pinned_memory_context_makes_cuda_error_a_host_oom():
    clf = Classifier()
    clf.feed('  File "/venv/lib/python3.11/site-packages/deepspeed/accelerator/cuda_accelerator.py", line 296, in pin_memory')
    clf.feed("    return tensor.pin_memory()")
    found = clf.feed("RuntimeError: CUDA error: out of memory")
    assert found is not None and found.verdict == HOST_OOM and found.rule == "pinned_host_alloc"
    plain = Classifier()
    plain.feed("RuntimeError: CUDA error: out of memory")
    assert plain.conclude(1).verdict == GPU_OOM


def test_findings_are_capped():
    clf = Classifier()
    for _ in range(v.MAX_FINDINGS + 50):
        clf.feed("KeyError: 'x'")
    assert len(clf.findings) == v.MAX_FINDINGS
    assert clf.conclude(1).rule == "python_exception"


def test_modules_do_not_import_the_training_stack():
    code = ("import sys, dsplan.logs.rules, dsplan.logs.classifier, dsplan.logs.diagnose\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'llamafactory',"
            " 'transformers', 'numpy'))\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# --- recovered and bare OOM lines: kill at once only on a confirmed OOM -----------------------------

ISSUE_RECOVERED = ("WARNING 2025-06-02 14:04:22 trainer.py:88 caught torch.OutOfMemoryError: CUDA out of memory. "
                   "Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.25 GiB; retrying")
FRAME = '  File "/opt/venv/lib/python3.11/site-packages/torch/nn/modules/linear.py", line 125, in forward'
BARE_OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_caught_and_retried_oom_is_never_returned_and_a_clean_exit_is_a_success():
    clf = Classifier()
    for line in [ISSUE_RECOVERED, " 50%|#####     | 2/4 [00:01<00:01]", "***** train metrics *****"]:
        assert clf.feed(line) is None
    assert clf.pending is None
    assert clf.conclude(0).verdict == SUCCESS
    assert clf.conclude(None).verdict == SUCCESS  # diagnose on the same log
    assert [f.rule for f in clf.findings] == ["cuda_oom"]  # still listed for people


def test_a_recovered_oom_alone_is_not_an_oom_for_diagnose_but_explains_a_bare_failure():
    text = ISSUE_RECOVERED + "\n 75%|#######5  | 3/4 [00:02<00:00]\n"
    assert classify_text(text, None).verdict == UNKNOWN  # the run went on after it
    assert classify_text(text, 1).verdict == GPU_OOM  # it died later and nothing else explains why
    later = text + "Traceback (most recent call last):\n" + FRAME + "\nValueError: bad label\n"
    assert classify_text(later, 1).verdict == NOT_OOM  # a concrete later error wins over a survived OOM
    assert classify_text(later, 1).rule == "python_exception"


def test_recovery_announced_on_the_next_line_of_the_same_stream():
    clf = Classifier(clock=None)
    assert clf.feed("| WARNING: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB") is None
    assert clf.pending is not None
    assert clf.feed("  Skipping batch") is None
    assert clf.pending is None
    assert clf.feed("Traceback (most recent call last):") is None  # too late: that OOM was handled
    assert clf.conclude(None).verdict == UNKNOWN


@pytest.mark.parametrize("confirming", [
    "[rank1]: Traceback (most recent call last):",
    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
    "E1123 10:36:50.557000 8765 torch/distributed/elastic/multiprocessing/api.py:869] failed (exitcode: 1) local_rank: 0",
    "RuntimeError: DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970",
    "Aborted (core dumped)",
    "Killed",
])
def test_a_bare_oom_is_confirmed_by_a_traceback_or_a_failure_that_follows(confirming):
    clf = Classifier(clock=FakeClock())
    assert clf.feed("[rank0]: " + BARE_OOM) is None
    assert clf.feed("[rank2]: {'loss': 1.2, 'grad_norm': 0.8}") is None
    found = clf.feed(confirming)
    assert found is not None and found.verdict == GPU_OOM and found.evidence == BARE_OOM
    assert clf.pending is None and clf.conclude(1) == found


def test_a_bare_oom_stops_waiting_after_the_horizon_on_the_clock():
    clock = FakeClock()
    clf = Classifier(clock=clock)
    assert clf.feed(BARE_OOM) is None
    assert clf.feed("  3%|▎         | 3/100 [00:04<02:10,  1.3s/it]") is None  # its stream goes on
    clock.now = v.CONFIRM_SECONDS + 0.1
    assert clf.tick() is None and clf.pending is None
    assert clf.feed("Traceback (most recent call last):") is None
    assert clf.feed("ValueError: unrelated") is None
    assert clf.conclude(1).verdict == NOT_OOM


def test_a_bare_oom_whose_stream_falls_silent_is_confirmed_by_tick():
    clock = FakeClock()
    clf = Classifier(clock=clock)
    assert clf.feed(BARE_OOM, stream="stderr") is None
    assert clf.feed("  3%|▎         | 3/100", stream="stdout") is None  # another stream going on proves nothing
    assert clf.tick() is None  # still inside the confirmation wait
    clock.now = v.CONFIRM_SECONDS / 2
    assert clf.tick() is None
    clock.now = v.CONFIRM_SECONDS + 0.1
    assert clf.pending is not None  # reading the state does not give up on a silent stream
    found = clf.tick()
    assert found is not None and found.verdict == GPU_OOM and clf.tick() is None
    assert clf.conclude(-15) == found


def test_tick_never_confirms_without_a_clock():
    clf = Classifier(clock=None)
    assert clf.feed(BARE_OOM) is None
    assert clf.tick() is None and clf.pending is not None


def test_a_bare_oom_stops_waiting_after_the_horizon_in_lines_without_a_clock():
    clf = Classifier(clock=None)
    clf.feed(BARE_OOM)
    for i in range(v.CONFIRM_LINES + 1):
        clf.feed(f"step {i} ok")
    assert clf.pending is None
    assert clf.feed("Traceback (most recent call last):") is None
    assert clf.conclude(None).verdict == UNKNOWN


def test_a_bare_oom_at_the_end_of_a_log_decides_when_the_process_failed_or_the_exit_is_unknown():
    for code, verdict in ((1, GPU_OOM), (None, GPU_OOM), (-9, GPU_OOM), (0, SUCCESS)):
        clf = Classifier(clock=None)
        clf.feed("step 7 ok")
        clf.feed(BARE_OOM)
        assert clf.conclude(code).verdict == verdict, code


def test_a_completion_marker_after_a_bare_oom_means_the_run_survived_it():
    clf = Classifier(clock=None)
    clf.feed(BARE_OOM)
    clf.feed("***** train metrics *****")
    assert clf.pending is None and clf.conclude(None).verdict == SUCCESS


@pytest.mark.parametrize("before, line", [
    (["Traceback (most recent call last):"], BARE_OOM),
    ([FRAME, "    return F.linear(input, self.weight, self.bias)"], BARE_OOM),
    ([FRAME, "           ^^^^^^^^^^^^^^^^^^^^^"], BARE_OOM),
    ([], "OutOfMemoryError                          Traceback (most recent call last)"),  # IPython
    (["Cell In[21], line 2", "----> 2 model.save_pretrained_merged(new_model_local, tokenizer)"],
     "OutOfMemoryError: CUDA out of memory. Tried to allocate 280.00 MiB."),
    (["│ /root/lib/python3.10/site-packages/peft/peft_model.py:1430 in forward │",
      "╰──────────────────────────────────────────────────────────────────────╯"], BARE_OOM),  # Rich
    (["ERROR 04-30 10:20:36 [core.py:396]   File \"/vllm/v1/engine/core.py\", line 387, in run_engine_core"],
     "ERROR 04-30 10:20:36 [core.py:396] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"),
    (["RuntimeError: ACL stream synchronize failed, error code:507899"],
     "EL0004: 2025-01-31-08:23:58.845.175 Failed to allocate memory."),
    (["During handling of the above exception, another exception occurred:"], "MemoryError"),
])
def test_an_oom_inside_a_traceback_is_confirmed_at_once(before, line):
    clf = Classifier()
    for b in before:
        assert clf.feed(b) is None
    found = clf.feed(line)
    assert found is not None and found.verdict in (GPU_OOM, HOST_OOM)


@pytest.mark.parametrize("line", [
    "Killed",
    "[12345.6] Out of memory: Killed process 576419 (python) total-vm:78521468kB, anon-rss:54398260kB",
    "  exitcode  : -9 (pid: 1234)",
    "memory allocation of 2147483648 bytes failed",
    "terminate called after throwing an instance of 'std::bad_alloc'",
    "(raylet) [2023-07-23 15:21:29,851 E 9751 9751] (raylet) node_manager.cc:3084: 4 Workers (tasks / actors) "
    "killed due to memory pressure (OOM), 0 Workers crashed due to other reasons at node",
])
def test_a_line_that_reports_a_death_needs_no_traceback(line):
    found = Classifier().feed(line)
    assert found is not None and found.verdict == HOST_OOM and found.rule in v.DEATH_RULES


def test_a_recovery_word_inside_a_traceback_does_not_save_the_run():
    clf = Classifier()
    clf.feed("Traceback (most recent call last):")
    found = clf.feed("torch.OutOfMemoryError: CUDA out of memory while retrying the batch")
    assert found is not None and found.verdict == GPU_OOM


def test_pending_oom_lines_are_bounded():
    clf = Classifier(clock=FakeClock())
    for i in range(v.MAX_PENDING * 3):
        clf.feed(f"[rank{i}]: " + BARE_OOM)
    assert len(clf._pending) == v.MAX_PENDING
    found = clf.feed("Traceback (most recent call last):")
    assert found is not None and found.verdict == GPU_OOM
    assert clf.conclude(1).verdict == GPU_OOM


# --- wordings from the public corpus (tests/logs/public), one rule each -------------------------------

@pytest.mark.parametrize("line, verdict, backend, rule", [
    ("RuntimeError: [enforce fail at C:\\b\\alloc_cpu.cpp:81] data. DefaultCPUAllocator: not enough memory: "
     "you tried to allocate 1981808640 bytes.", HOST_OOM, "cpu", "cpu_allocator"),
    ("2024-10-22 09:22:17.233972: E tensorflow/stream_executor/cuda/cuda_driver.cc:802] failed to alloc "
     "34359738368 bytes on host: CUDA_ERROR_OUT_OF_MEMORY: out of memory", HOST_OOM, "cpu", "tf_host_alloc"),
    ("W .\\tensorflow/core/common_runtime/device/device_host_allocator.h:46] could not allocate pinned host "
     "memory of size: 34359738368", HOST_OOM, "cpu", "tf_host_alloc"),
    ("ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.", HOST_OOM, "cpu",
     "ray_memory_monitor"),
    ("Memory on the node (IP: 10.1.180.84, ID: ba65c80c) where the task (task ID: d221d262, name=head, rank=0,, "
     "pid=4503, memory used", HOST_OOM, "cpu", "ray_memory_monitor"),
    ("(raylet, ip=172.31.66.10) [2022-09-22 16:02:34,214 E 138 138] (raylet) node_manager.cc:2966: System memory "
     "low at node with IP 172.31.66.10.", HOST_OOM, "cpu", "ray_memory_monitor"),
    ("RuntimeError: Allocation is out of device memory on current platform.", GPU_OOM, "xpu",
     "xpu_allocation_out_of_device_memory"),
    ("libc++abi: terminating due to uncaught exception of type std::runtime_error: [malloc_or_wait] Unable to "
     "allocate 12 bytes.", GPU_OOM, "mps", "metal_oom"),
    ("INFO 02-26 09:54:05 worker.py:267] model weights take 5.20GiB; non_torch_memory takes 0.03GiB; PyTorch "
     "activation peak memory takes 1.42GiB; the rest of the memory reserved for KV Cache is -1.05GiB.", GPU_OOM,
     None, "vllm_no_kv_cache_memory"),
    ("**Killed**", HOST_OOM, "cpu", "shell_killed"),
    ("`RuntimeError: [enforce fail at CPUAllocator.cpp:73] data. DefaultCPUAllocator: not enough memory: you "
     "tried to allocate 473909280 bytes. Buy new RAM!`", HOST_OOM, "cpu", "cpu_allocator"),
    ("RuntimeErrorRuntimeErrorRuntimeError: : : CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
     "cublasCreate(handle)CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)", GPU_OOM, "cuda",
     "cublas_alloc_failed"),  # three ranks' half-lines glued into one
])
def test_public_corpus_wordings(line, verdict, backend, rule):
    clf = Classifier(clock=None)
    clf.feed(line)
    found = clf.conclude(1)
    assert (found.verdict, found.backend, found.rule) == (verdict, backend, rule)


@pytest.mark.parametrize("line, rule", [
    ("VM-0-16-ubuntu:392:494 [2] include/alloc.h:102 NCCL WARN Cuda failure 1 'invalid argument'", "accelerator_error"),
    ("ERROR 03-25 06:14:02 [multiproc_executor.py:880] EE9999: Inner Error!", "ascend_error_code"),
    ("[rank4]:[E602 11:18:52.531176265 ProcessGroupNCCL.cpp:684] [Rank 4] Some NCCL operations have failed or "
     "timed out.", "collective_timeout"),
    ("stderr: Root Cause (first observed failure):", "launcher_wrapper"),
])
def test_public_corpus_not_oom_wordings(line, rule):
    clf = Classifier(clock=None)
    assert clf.feed(line) is None
    found = clf.conclude(1)
    assert found.verdict == NOT_OOM and found.rule == rule


@pytest.mark.parametrize("line, rule", [
    ("{'train_runtime': 162.7664, 'train_samples_per_second': 1.475, 'train_loss': 1.35, 'epoch': 0.15}",
     "hf_train_summary"),
    ('{"train_runtime": 633.3231, "train_samples_per_second": 7.737, "train_steps_per_second": 7.737}',
     "hf_train_summary"),
    ("work-1: [2023-08-06 05:27:07,537] [INFO] [launch.py:347:main] Process 1555224 exits successfully.",
     "deepspeed_launcher_success"),
])
def test_completion_markers(line, rule):
    found = classify_text(line + "\n", None)
    assert found.verdict == SUCCESS and found.rule == rule


@pytest.mark.parametrize("line", [
    "2023/10/26 09:19:04 W tensorflow/core/common_runtime/bfc_allocator.cc:242] Allocator (GPU_0_bfc) ran out of "
    "memory trying to allocate 0B with freed_by_count=0. The caller indicates that this is not a failure",
    "W tensorflow/core/framework/allocator.cc:107] Allocation of 1194393600 exceeds 10% of system memory.",
    '{"loss": 0.0794, "memory(GiB)": 66.28, "train_speed(iter/s)": 0.082341, "epoch": 2.28}',
    "Unsloth: Will use up to 6.42 out of 12.67 RAM for saving.",
    "If you encounter CUDA out of memory, try to set --tile with a smaller number.",
    "    raise ValueError(\"No available memory for the cache blocks. \"",  # source line inside a traceback
])
def test_public_corpus_lines_that_are_not_an_oom(line):
    clf = Classifier(clock=None)
    clf.feed(line)
    assert clf.findings == [] or all(f.verdict not in (GPU_OOM, HOST_OOM) for f in clf.findings)


# --- the public corpus: real logs from public issues, labelled by hand ---------------------------------

PUBLIC = LOGS / "public"
PUBLIC_CORPUS = sorted(PUBLIC.glob("*.log"))


@functools.lru_cache(maxsize=1)
def _bench():
    """scripts/bench_diagnose_corpus.py, imported (it reads the corpus headers and judges a case)."""
    spec = importlib.util.spec_from_file_location(
        "bench_diagnose_corpus", Path(__file__).resolve().parents[1] / "scripts" / "bench_diagnose_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_public_corpus_has_100_labelled_logs_and_an_up_to_date_manifest(tmp_path):
    bench = _bench()
    cases = bench.load(PUBLIC)
    assert len(cases) >= 100
    assert len({c.source for c in cases}) >= 90
    labels = {c.label for c in cases}
    assert {"gpu_oom", "host_oom", "not_oom", "unknown", "success"} <= labels
    assert {"cuda", "rocm", "npu", "xpu", "mps"} <= {c.backend for c in cases if c.label == "gpu_oom"}
    for p in PUBLIC_CORPUS:  # the copy in tests/logs/public is the one described by SOURCES.md
        (tmp_path / p.name).write_bytes(p.read_bytes())
    assert bench.write_manifest(bench.load(tmp_path), tmp_path).read_text() == (PUBLIC / "SOURCES.md").read_text()


@pytest.mark.parametrize("path", PUBLIC_CORPUS, ids=[p.name for p in PUBLIC_CORPUS])
def test_public_corpus_case(path):
    """No log labelled not_oom, unknown or success is called an OOM; every OOM log is called the right kind,
    and a GPU OOM names the right backend unless the log never says which one it is."""
    bench = _bench()
    case = bench.read_case(path)
    row = bench.judge(case)
    if case.known_miss:  # strict: a fix must also remove the marker (and be reported as one)
        assert not row.get("kind", not row.get("false_oom")), ("no longer a miss", case.known_miss, row)
        return
    if case.label in ("gpu_oom", "host_oom"):
        assert row["kind"], row
        assert row["got_backend"] in ((case.backend, None) if case.label == "gpu_oom" else ("cpu",)), row
    else:
        assert not row["false_oom"], row


# --- the launcher with the real classifier: a recovered OOM is not killed, a traced one is ----------------

RECOVERING_CHILD = """
import sys, time
print("[INFO|trainer.py:2409] >> ***** Running training *****", flush=True)
print("WARNING train.py:88 caught torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB; "
      "retrying with micro-batch 2", file=sys.stderr, flush=True)
for step in range(3):
    time.sleep(0.3)
    print(f" {step + 1}/3 steps", flush=True)
print("***** train metrics *****", flush=True)
"""

DYING_CHILD = """
import sys, time
print("Traceback (most recent call last):", file=sys.stderr, flush=True)
print('  File "train.py", line 3, in <module>', file=sys.stderr, flush=True)
print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.", file=sys.stderr, flush=True)
time.sleep(60)  # a rank that hangs after its OOM, as ranks waiting in a collective do
"""


def test_launcher_lets_a_recovered_oom_finish_and_kills_a_traced_one(tmp_path):
    from dsplan.launch.attempt import run_attempt

    out = run_attempt([sys.executable, "-c", RECOVERING_CHILD], dict(os.environ), tmp_path, tmp_path / "a.log",
                      None, Classifier(), stall_timeout=60, grace=1.0, echo=False)
    assert out.exit_code == 0 and not out.killed
    assert out.finding.verdict == SUCCESS
    out = run_attempt([sys.executable, "-c", DYING_CHILD], dict(os.environ), tmp_path, tmp_path / "b.log",
                      None, Classifier(), stall_timeout=60, grace=1.0, echo=False)
    assert out.killed and out.finding.verdict == GPU_OOM
