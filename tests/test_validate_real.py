"""Rendered files pass DeepSpeed's and LLaMA-Factory's own validators (the real packages).

One ``dsplan validate`` call checks the whole matrix, so LLaMA-Factory is imported once.
"""

import json

import pytest
import yaml

from tests.conftest import run_dsplan

pytestmark = pytest.mark.real  # runs DeepSpeed's and LLaMA-Factory's own validators

PROFILES = {
    "1x16G-cuda-T4": ["--gpus", "1x16G", "--gpu-name", "T4"],
    "2x24G-cuda-4090": ["--gpus", "2x24G", "--gpu-name", "4090", "--host-ram", "128G"],
    "8x80G-cuda-A100": ["--gpus", "8x80G", "--gpu-name", "A100", "--host-ram", "1024G"],
    "8x64G-dcu-K100": ["--gpus", "8x64G", "--backend", "rocm", "--gpu-name", "K100", "--host-ram", "512G"],
    "8x192G-rocm-MI300X": ["--gpus", "8x192G", "--backend", "rocm", "--gpu-name", "MI300X"],
    "2x8x80G-cuda-H100": ["--gpus", "2x8x80G", "--gpu-name", "H100", "--host-ram", "2048G"],
    "8x32G-cuda-V100": ["--gpus", "8x32G", "--gpu-name", "V100"],
}
METHODS = ["lora", "qlora", "full"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, train_python):
    root = tmp_path_factory.mktemp("matrix")
    model = root / "Qwen2.5-0.5B"
    model.mkdir()
    from tests.conftest import QWEN_SMALL

    (model / "config.json").write_text(json.dumps(QWEN_SMALL))
    dirs = []
    for pname, pargs in PROFILES.items():
        for method in METHODS:
            out = root / f"{pname}-{method}"
            r = run_dsplan("render", *pargs, "--model", str(model), "--method", method, "-o", str(out),
                           "--output-dir", str(root / "saves" / f"{pname}-{method}"))
            assert r.returncode == 0, r.stderr
            dirs.append(out)
    # Every checked-in preset renders and validates too (with its own training defaults).
    from dsplan.inputs.presets import all_presets

    for name in sorted(all_presets()[0]):
        out = root / f"preset-{name}"
        r = run_dsplan("render", "--preset", name, "--model", str(model), "-o", str(out),
                       "--output-dir", str(root / "saves" / name))
        assert r.returncode == 0, r.stderr
        dirs.append(out)
    r = run_dsplan("validate", *map(str, dirs), "--json", "--strict", "--python", train_python)
    return dirs, r


def test_every_file_passes_real_validators(matrix):
    dirs, r = matrix
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(r.stdout)["results"]
    from dsplan.inputs.presets import all_presets

    n_presets = len(all_presets()[0])
    assert n_presets >= 12
    assert len(results) == (len(PROFILES) * len(METHODS) + n_presets) * 4 * 2
    assert all(x["ok"] is True for x in results), [x for x in results if not x["ok"]]
    ds = [x for x in results if x["kind"] == "deepspeed"]
    # DeepSpeed saw each profile's real world size (16 for the two-node H100 profile).
    assert any("world 16," in x["detail"] for x in ds) and any("world 1," in x["detail"] for x in ds)
    assert {x["detail"].split(",")[0] for x in ds} == {"stage 2", "stage 3"}


def test_fp16_profiles_render_fp16(matrix):
    dirs, _ = matrix
    for d in dirs:
        lf = yaml.safe_load((d / "lf_zero3.yaml").read_text())
        fp16_hw = any(k in d.name for k in ("V100", "T4", "v100", "single-16g"))
        assert lf.get("fp16" if fp16_hw else "bf16") is True
        assert ("bf16" if fp16_hw else "fp16") not in lf


def _render_one(tmp_path, model_dir, tier="zero2"):
    out = tmp_path / "one"
    r = run_dsplan("render", "--gpus", "8x80G", "--model", str(model_dir), "--tier", tier, "-o", str(out),
                   "--output-dir", str(tmp_path / "saves"))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d["zero_optimization"].update(stage3_max_live_paramters=1e9), "stage3_max_live_paramters"),
    (lambda d: d["zero_optimization"].update(stage=7), "stage"),
    (lambda d: d.update(train_batch_size=3), "train_batch"),
    (lambda d: d["zero_optimization"].update(offload_optimizer={"device": "gpu"}), "device"),
])
def test_real_deepspeed_validator_catches_bad_json(tmp_path, model_dir, train_python, mutate, needle):
    out = _render_one(tmp_path, model_dir)
    path = out / "ds_zero2.json"
    cfg = json.loads(path.read_text())
    mutate(cfg)
    path.write_text(json.dumps(cfg))
    r = run_dsplan("validate", str(path), "--json", "--python", train_python)
    assert r.returncode == 1, r.stdout + r.stderr
    res = json.loads(r.stdout)["results"]
    assert res[0]["ok"] is False and needle in res[0]["detail"]


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(not_an_lf_argument=1), "not_an_lf_argument"),  # HfArgumentParser rejects it
    (lambda d: d.update(finetuning_type="full", quantization_bit=4), "Quantization is only compatible"),
    (lambda d: d.update(finetuning_type="lorra"), "finetuning_type"),  # dsplan's own enum check
    (lambda d: d.update(deepspeed="/nonexistent/ds.json"), "does not exist"),
])
def test_real_lf_validator_catches_bad_yaml(tmp_path, model_dir, train_python, mutate, needle):
    out = _render_one(tmp_path, model_dir)
    path = out / "lf_zero2.yaml"
    cfg = yaml.safe_load(path.read_text())
    mutate(cfg)
    path.write_text(yaml.safe_dump(cfg))
    r = run_dsplan("validate", str(path), "--json", "--python", train_python)
    assert r.returncode == 1, r.stdout + r.stderr
    res = json.loads(r.stdout)["results"]
    lf = [x for x in res if x["kind"] == "lf"][0]
    assert lf["ok"] is False and needle in lf["detail"]


def test_without_deepspeed_or_lf_it_says_so(tmp_path, model_dir):
    """A Python with neither package (a bare venv): only dsplan's own checks run, and it says so."""
    import subprocess
    import sys

    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    out = _render_one(tmp_path, model_dir)
    r = run_dsplan("validate", str(out), "--python", str(bare / "bin" / "python"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deepspeed is not installed" in r.stdout and "llamafactory is not installed" in r.stdout
    assert r.stdout.count("skip") == 2  # one tier: its DeepSpeed JSON and its LF YAML
    r = run_dsplan("validate", str(out), "--python", str(bare / "bin" / "python"), "--strict")
    assert r.returncode == 3
