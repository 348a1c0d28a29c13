"""Presets: the checked-in set, site presets, and the commands."""

import json
import subprocess
import sys

import yaml

from dsplan.inputs.hardware import make_profile
from dsplan.inputs.presets import all_presets
from tests.conftest import run_dsplan

REQUIRED = {
    "hygon-k100-8x64g": ("8x64G", "dcu", True),
    "amd-mi250x-8x": ("8x64G", "rocm", True),
    "amd-mi300x-8x": ("8x192G", "rocm", True),
    "nvidia-a100-40g-8x": ("8x40G", "cuda", True),
    "nvidia-a100-80g-8x": ("8x80G", "cuda", True),
    "nvidia-h100-80g-8x": ("8x80G", "cuda", True),
    "rtx3090-24g-1x": ("1x24G", "cuda", True),
    "rtx3090-24g-8x": ("8x24G", "cuda", True),
    "rtx4090-24g-1x": ("1x24G", "cuda", True),
    "rtx4090-24g-8x": ("8x24G", "cuda", True),
    "nvidia-v100-32g-8x": ("8x32G", "cuda", False),
    "single-16g": ("1x16G", "cuda", False),
}


def test_required_presets_exist_with_sources():
    found, warnings = all_presets()
    assert not warnings
    for name, (gpus, backend, bf16) in REQUIRED.items():
        p = found[name]
        assert p.hardware["gpus"] == gpus and p.hardware["backend"] == backend
        prof = make_profile(p.hardware["gpus"], p.hardware["backend"], p.hardware.get("host_ram"),
                            p.hardware.get("gpu_name"))
        assert prof.bf16 is bf16
        assert prof.precision == ("bf16" if bf16 else "fp16") and prof.flash_attn in ("auto", "sdpa")
        assert p.sources, name


def test_flags_override_preset(tmp_path):
    r = run_dsplan("plan", "--preset", "rtx4090-24g-8x", "--model", "Qwen2.5-7B", "--gpus", "2x24G",
                   "--cutoff-len", "512", "--json")
    d = json.loads(r.stdout)
    assert d["hardware"]["world_size"] == 2 and d["hardware"]["gpu_name"] == "4090"
    assert d["workload"]["cutoff_len"] == 512
    r = run_dsplan("plan", "--preset", "rtx4090-24g-8x", "--model", "Qwen2.5-7B", "--json")
    d = json.loads(r.stdout)
    assert d["hardware"]["world_size"] == 8 and d["workload"]["cutoff_len"] == 1024  # preset default


def test_site_presets_from_env_folder(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "our-cluster.yaml").write_text(yaml.safe_dump({
        "name": "our-cluster", "description": "Lab cluster, 4 x A800 80G",
        "hardware": {"gpus": "4x80G", "backend": "cuda", "gpu_name": "A800", "host_ram": "1024G"},
        "training": {"cutoff_len": 4096},
        "sources": ["our admins"]}))
    (site / "broken.yaml").write_text("hardware: [oops\n")
    env = {"DSPLAN_PRESETS": str(site)}
    r = run_dsplan("presets", "list", env=env)
    assert r.returncode == 0 and "our-cluster" in r.stdout and "[$DSPLAN_PRESETS]" in r.stdout
    assert "broken.yaml" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_dsplan("plan", "--preset", "our-cluster", "--model", "Qwen2.5-7B", "--json", env=env)
    d = json.loads(r.stdout)
    assert d["hardware"]["world_size"] == 4 and d["workload"]["cutoff_len"] == 4096
    r = run_dsplan("presets", "show", "our-cluster", env=env)
    assert "Lab cluster" in r.stdout


def test_user_config_dir_presets(tmp_path):
    folder = tmp_path / "cfg" / "dsplan" / "presets"
    folder.mkdir(parents=True)
    (folder / "home-box.yaml").write_text(yaml.safe_dump({"hardware": {"gpus": "2x24G", "gpu_name": "3090"}}))
    r = run_dsplan("presets", "list", env={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert "home-box" in r.stdout and "[user config]" in r.stdout


def test_attention_precedence_hardware_then_preset_then_yaml(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "a100-sdpa.yaml").write_text(yaml.safe_dump({
        "hardware": {"gpus": "8x80G", "gpu_name": "A100"}, "training": {"flash_attn": "sdpa"}}))
    env = {"DSPLAN_PRESETS": str(site)}

    def attn(*args):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        r = run_dsplan("render", *args, "--model", "Qwen2.5-7B", "--tier", "zero2", "-o", str(out), env=env)
        assert r.returncode == 0, r.stderr
        return yaml.safe_load((out / "lf_zero2.yaml").read_text())["flash_attn"]

    assert attn("--gpus", "8x80G", "--gpu-name", "A100") == "auto"  # hardware default: FA2 exists
    assert attn("--gpus", "8x80G", "--gpu-name", "V100") == "sdpa"
    assert attn("--preset", "a100-sdpa") == "sdpa"  # the preset beats the hardware default
    user = tmp_path / "u.yaml"
    user.write_text(yaml.safe_dump({"flash_attn": "disabled"}))
    assert attn(str(user), "--preset", "a100-sdpa") == "disabled"  # the user's YAML beats the preset


def test_unknown_preset_is_a_user_error():
    r = run_dsplan("plan", "--preset", "nope", "--model", "Qwen2.5-7B")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "unknown preset" in r.stderr


def test_presets_list_without_torch():
    code = ("import sys\nfrom dsplan.cli import cli\n"
            "try:\n    cli.main(['presets', 'list'], prog_name='dsplan')\n"
            "except SystemExit:\n    pass\n"
            "print('HEAVY:' + ','.join(m for m in ('torch', 'deepspeed', 'llamafactory') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().endswith("HEAVY:")
