"""Tests for ``dsplan.inputs.detect``.

The ``nvidia-smi``, ``rocm-smi`` and ``hy-smi`` run here are FAKES: small Python
scripts in ``tests/fakes/bin/`` that replay recorded real tool output from
``tests/fakes/recorded/`` (SOURCES.md there says where each format comes from).
They are put first on ``PATH`` so that ``detect_profile`` goes through its real
subprocess path, and they reject any invocation other than the one dsplan is
meant to send.  No GPU is needed or touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from dsplan.inputs import detect
from dsplan.inputs.detect import DetectionError, detect_profile, parse_amd_smi, parse_nvidia_smi
from dsplan.errors import UserError
from dsplan.units import MiB

REPO = Path(__file__).resolve().parent.parent
FAKES = Path(__file__).resolve().parent / "fakes"
FAKE_BIN = FAKES / "bin"
RECORDED = FAKES / "recorded"
MASK_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")

MI300X_BYTES = 206141652992
K100_AI_BYTES = 65520 * MiB
Z100L_BYTES = 34342961152


@pytest.fixture
def fake_smi(monkeypatch):
    """Put the fake tools first on PATH, clear device masks; returns a recording picker."""
    monkeypatch.setenv("PATH", str(FAKE_BIN) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.delenv("DSPLAN_FAKE_SMI_DELAY", raising=False)
    for var in MASK_VARS:
        monkeypatch.delenv(var, raising=False)

    def use(recording: str | Path) -> None:
        monkeypatch.setenv("DSPLAN_FAKE_SMI", str(recording))

    return use


@pytest.fixture
def isolated_bin(tmp_path):
    """A PATH holding only the chosen fakes and a python3 for their shebang."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)

    def make(*tools: str) -> str:
        for tool in tools:
            (bin_dir / tool).symlink_to(FAKE_BIN / tool)
        return str(bin_dir)

    return make


def host_expectations() -> tuple[int, int | None]:
    return psutil.virtual_memory().total, psutil.cpu_count(logical=False) or os.cpu_count()


# ----------------------------------------------------------------------------- recordings

CASES = [
    # recording, backend asked for, backend, GPUs, bytes per GPU, model
    ("nvidia-smi_8xA100-80GB.csv", None, "cuda", 8, 81920 * MiB, "A100"),
    ("nvidia-smi_8xA100-80GB.csv", "cuda", "cuda", 8, 81920 * MiB, "A100"),
    ("nvidia-smi_1x4090.csv", None, "cuda", 1, 24564 * MiB, "4090"),
    ("nvidia-smi_4xA100-80GB-40GB.csv", None, "cuda", 4, 40960 * MiB, "A100"),
    ("rocm-smi_8xMI300X.json", None, "rocm", 8, MI300X_BYTES, "MI300X"),
    ("rocm-smi_8xMI300X.json", "rocm", "rocm", 8, MI300X_BYTES, "MI300X"),
    ("rocm-smi_8xMI300X.txt", "rocm", "rocm", 8, MI300X_BYTES, "MI300X"),
    ("hy-smi_8xK100_AI.json", None, "dcu", 8, K100_AI_BYTES, "K100"),
    ("hy-smi_8xK100_AI.json", "dcu", "dcu", 8, K100_AI_BYTES, "K100"),
    ("hy-smi_8xK100_AI.txt", "dcu", "dcu", 8, K100_AI_BYTES, "K100"),
    ("hy-smi_4xZ100L_legacy.txt", None, "dcu", 4, Z100L_BYTES, "Z100"),
]


@pytest.mark.parametrize(("recording", "asked", "backend", "count", "mem", "model"), CASES)
def test_profile_from_recording(fake_smi, recording, asked, backend, count, mem, model):
    fake_smi(recording)
    profile = detect_profile(asked)
    assert profile.nodes == 1
    assert profile.gpus_per_node == count
    assert profile.gpu_mem == mem
    assert profile.backend == backend
    assert profile.gpu_name == model
    assert (profile.host_ram, profile.cpu_cores) == host_expectations()


def test_every_recording_is_exercised_and_documented():
    recordings = {p.name for p in RECORDED.iterdir() if p.name != "SOURCES.md"}
    assert recordings == {case[0] for case in CASES}
    sources = (RECORDED / "SOURCES.md").read_text(encoding="utf-8")
    for name in recordings:
        assert f"`{name}`" in sources


def test_auto_detection_skips_an_installed_tool_that_fails(fake_smi):
    # All three fakes are on PATH; for a rocm-smi recording the fake nvidia-smi
    # answers like a machine without the NVIDIA driver and hy-smi finds no card.
    fake_smi("rocm-smi_8xMI300X.json")
    assert detect_profile().backend == "rocm"


def test_hygon_card_seen_through_rocm_smi_is_dcu(monkeypatch, tmp_path, isolated_bin):
    # Older DTK releases ship rocm-smi rather than hy-smi.  This recording is made up
    # from the K100 AI facts (65520 MiB, card series K500SM_AI) in rocm-smi's spelling.
    recording = tmp_path / "rocm-smi_hygon.json"
    recording.write_text('{"card0": {"VRAM Total Memory (B)": "%d", "Card Series": "K500SM_AI"}}' % K100_AI_BYTES)
    env = {"PATH": isolated_bin("rocm-smi"), "DSPLAN_FAKE_SMI": str(recording)}
    profile = detect_profile(env=env)
    assert (profile.backend, profile.gpu_name, profile.gpu_mem) == ("dcu", "K100", K100_AI_BYTES)


def test_env_argument_replaces_os_environ(monkeypatch, isolated_bin):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    env = {"PATH": isolated_bin("nvidia-smi"), "DSPLAN_FAKE_SMI": "nvidia-smi_8xA100-80GB.csv"}
    assert detect_profile(env=env).gpus_per_node == 8


# ----------------------------------------------------------------------------- no tool

def test_no_tool_on_path(tmp_path):
    with pytest.raises(DetectionError, match="no GPU tool found on PATH") as err:
        detect_profile(env={"PATH": str(tmp_path)})
    for tool in ("nvidia-smi", "hy-smi", "rocm-smi"):
        assert tool in str(err.value)
    assert isinstance(err.value, UserError)


def test_named_backend_without_its_tool(fake_smi, isolated_bin):
    env = {"PATH": isolated_bin("rocm-smi"), "DSPLAN_FAKE_SMI": "rocm-smi_8xMI300X.json"}
    with pytest.raises(DetectionError, match=r"looked for nvidia-smi\)"):
        detect_profile("cuda", env=env)


def test_unknown_backend():
    with pytest.raises(UserError, match="unknown backend"):
        detect_profile("tpu")


def test_tool_present_but_no_device(fake_smi, isolated_bin):
    env = {"PATH": isolated_bin("nvidia-smi"), "DSPLAN_FAKE_SMI": "rocm-smi_8xMI300X.json"}
    with pytest.raises(DetectionError, match="couldn't communicate with the NVIDIA driver"):
        detect_profile(env=env)


# ----------------------------------------------------------------------------- device masks

@pytest.mark.parametrize(
    ("recording", "var", "value", "count", "mem"),
    [
        ("nvidia-smi_8xA100-80GB.csv", "CUDA_VISIBLE_DEVICES", "0,1", 2, 81920 * MiB),
        ("nvidia-smi_4xA100-80GB-40GB.csv", "CUDA_VISIBLE_DEVICES", "0,1", 2, 81920 * MiB),
        ("nvidia-smi_4xA100-80GB-40GB.csv", "CUDA_VISIBLE_DEVICES", "1,2", 2, 40960 * MiB),
        ("nvidia-smi_4xA100-80GB-40GB.csv", "CUDA_VISIBLE_DEVICES", "0,9,2", 1, 81920 * MiB),  # stops at 9
        ("nvidia-smi_4xA100-80GB-40GB.csv", "CUDA_VISIBLE_DEVICES", "GPU-1a2b,GPU-3c4d", 2, 40960 * MiB),
        ("nvidia-smi_8xA100-80GB.csv", "HIP_VISIBLE_DEVICES", "0", 8, 81920 * MiB),  # not CUDA's mask
        ("rocm-smi_8xMI300X.json", "HIP_VISIBLE_DEVICES", "3", 1, MI300X_BYTES),
        ("rocm-smi_8xMI300X.json", "CUDA_VISIBLE_DEVICES", "0,1,2,3", 4, MI300X_BYTES),
        ("hy-smi_8xK100_AI.json", "HIP_VISIBLE_DEVICES", "4,5,6,7", 4, K100_AI_BYTES),
    ],
)
def test_device_mask_narrows(fake_smi, monkeypatch, recording, var, value, count, mem):
    fake_smi(recording)
    monkeypatch.setenv(var, value)
    profile = detect_profile()
    assert (profile.gpus_per_node, profile.gpu_mem) == (count, mem)


@pytest.mark.parametrize(("value", "message"), [("", "set but empty"), ("9", "selects none"), ("-1", "selects none")])
def test_device_mask_hiding_everything(fake_smi, monkeypatch, value, message):
    fake_smi("nvidia-smi_8xA100-80GB.csv")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    with pytest.raises(DetectionError, match=message):
        detect_profile()


# ----------------------------------------------------------------------------- bad output

BAD_OUTPUT = [
    ("nvidia-smi_bad.csv", "NVIDIA A100-SXM4-80GB, [N/A]\n", r"memory '\[N/A\]'"),
    ("nvidia-smi_bad.csv", "this is not csv\n", "did not list GPUs"),
    ("nvidia-smi_bad.csv", "", "reported no GPUs"),
    ("rocm-smi_bad.json", '{"card0": {"Card Series": "AMD Instinct MI300X OAM", "VRAM Tot', "no card with a VRAM total"),
    ("rocm-smi_bad.json", '{"card0": {"VRAM Total Memory (B)": "N/A"}}', "VRAM total 'N/A'"),
    ("rocm-smi_bad.json", '{"card0": {"Card Series": "AMD Instinct MI300X OAM"}}', "no VRAM total for card0"),
    ("rocm-smi_bad.json", '{"system": {"Driver version": "6.8.5"}}', "no card with a VRAM total"),
    ("hy-smi_bad.json", "", "empty output"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_OUTPUT)
def test_malformed_output_is_a_clear_error(fake_smi, tmp_path, name, content, message):
    recording = tmp_path / name
    recording.write_text(content)
    fake_smi(recording)
    backend = {"nvidia-smi": "cuda", "rocm-smi": "rocm", "hy-smi": "dcu"}[name.split("_")[0]]
    with pytest.raises(DetectionError, match=message) as err:
        detect_profile(backend)
    assert "\n" not in str(err.value)  # reported as one line


def test_missing_recording_surfaces_the_tool_failure(fake_smi):
    fake_smi("nvidia-smi_no-such-recording.csv")
    with pytest.raises(DetectionError, match=r"nvidia-smi failed \(exit 1\): FAKE nvidia-smi: no recording"):
        detect_profile("cuda")


def test_json_with_surrounding_text(fake_smi, tmp_path):
    # Made-up noise around a real-format object: hy-smi has been reported to mix
    # non-JSON lines into its --json output.
    recording = tmp_path / "hy-smi_noisy.json"
    body = (RECORDED / "hy-smi_8xK100_AI.json").read_text()
    recording.write_text("WARNING: some notice from the tool\n" + body + "trailing line\n")
    fake_smi(recording)
    profile = detect_profile("dcu")
    assert (profile.gpus_per_node, profile.gpu_mem, profile.gpu_name) == (8, K100_AI_BYTES, "K100")


def test_timeout(fake_smi, monkeypatch):
    fake_smi("nvidia-smi_8xA100-80GB.csv")
    monkeypatch.setenv("DSPLAN_FAKE_SMI_DELAY", "5")
    monkeypatch.setattr(detect, "TIMEOUT_S", 0.5)
    with pytest.raises(DetectionError, match="did not answer within 0.5 s"):
        detect_profile("cuda")


# ----------------------------------------------------------------------------- parsers, fakes, imports

def test_parsers_on_recordings():
    gpus = parse_nvidia_smi((RECORDED / "nvidia-smi_4xA100-80GB-40GB.csv").read_text())
    assert [g.memory // MiB for g in gpus] == [81920, 81920, 40960, 40960]
    assert gpus[2].name == "NVIDIA A100-SXM4-40GB"
    amd = parse_amd_smi((RECORDED / "rocm-smi_8xMI300X.txt").read_text())
    assert [g.index for g in amd] == list(range(8))
    assert amd[0].names == ("AMD Instinct MI300X OAM", "MI3SRIOV")  # the hex model id is skipped
    legacy = parse_amd_smi((RECORDED / "hy-smi_4xZ100L_legacy.txt").read_text(), "hy-smi")
    assert [(g.name, g.memory) for g in legacy] == [("Z100L", Z100L_BYTES)] * 4


def test_fake_rejects_unexpected_arguments():
    env = {**os.environ, "DSPLAN_FAKE_SMI": "nvidia-smi_1x4090.csv"}
    proc = subprocess.run(
        [sys.executable, str(FAKE_BIN / "nvidia-smi"), "--query-gpu=name", "--format=csv"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 1
    assert "unexpected arguments" in proc.stderr


def test_importing_detect_pulls_in_no_heavy_modules():
    code = (
        "import sys, dsplan.inputs.detect\n"
        "print(','.join(m for m in ('torch', 'deepspeed', 'llamafactory', 'psutil') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, check=True)
    assert proc.stdout.strip() == ""
