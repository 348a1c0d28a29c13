import pytest

from dsplan.errors import UserError
from dsplan.inputs.hardware import find_gpu_model, make_profile, parse_gpus
from dsplan.units import GiB


@pytest.mark.parametrize("spec,expected", [
    ("8x64G", (1, 8, 64 * GiB)),
    ("8x64GB", (1, 8, 64 * GiB)),
    ("1x24G", (1, 1, 24 * GiB)),
    ("4x80GiB", (1, 4, 80 * GiB)),
    ("2x8x80G", (2, 8, 80 * GiB)),
    ("2X8X80gb", (2, 8, 80 * GiB)),
    ("1x16384M", (1, 1, 16 * GiB)),
])
def test_parse_gpus_accepts(spec, expected):
    assert parse_gpus(spec) == expected


@pytest.mark.parametrize("spec", ["", "8", "x64G", "8x", "8x64", "0x64G", "8x64Q", "8x0G", "a8x64G", "8x512M",
                                  "1x2x3x4G"])
def test_parse_gpus_rejects(spec):
    with pytest.raises(UserError):
        parse_gpus(spec)


def test_profile_fields_and_spec_roundtrip():
    p = make_profile("2x8x80G", "cuda", "1024G", "H100")
    assert p.world_size == 16 and p.nodes == 2 and p.gpus_per_node == 8
    assert p.host_ram == 1024 * GiB and p.bf16 and p.precision == "bf16"
    assert p.spec == "2x8x80G"
    assert make_profile(p.spec).gpu_mem == p.gpu_mem


@pytest.mark.parametrize("name,bf16", [("V100", False), ("Tesla V100-SXM2-32GB", False), ("A100", True),
                                       ("NVIDIA A100-SXM4-80GB", True), ("4090", True), ("T4", False)])
def test_bf16_by_gpu_model(name, bf16):
    assert make_profile("8x32G", "cuda", gpu_name=name).bf16 is bf16


def test_rocm_and_dcu():
    k100 = make_profile("8x64G", "rocm", gpu_name="K100")
    assert k100.backend == "dcu" and k100.bf16 and k100.device_mask_var == "HIP_VISIBLE_DEVICES"
    assert k100.flash_attn == "sdpa"
    mi = make_profile("8x192G", "rocm", gpu_name="MI300X")
    assert mi.flash_attn == "auto" and mi.device_mask_var == "HIP_VISIBLE_DEVICES"
    assert make_profile("8x80G", "cuda").device_mask_var == "CUDA_VISIBLE_DEVICES"
    assert find_gpu_model("K100_AI").name == "K100"


def test_backend_mismatch_and_unknown_name():
    with pytest.raises(UserError):
        make_profile("8x80G", "rocm", gpu_name="A100")
    with pytest.raises(UserError):
        make_profile("8x80G", "cuda", gpu_name="Voodoo5")
    with pytest.raises(UserError):
        make_profile("8x80G", "metal")


@pytest.mark.parametrize("spec,needle", [
    ("65x80G", "at most 64 GPUs per node"),
    ("1025x8x80G", "at most 1024 nodes"),
    ("100000000x80G", "at most 64 GPUs per node"),
    ("1x9999999999999999999999999999G", "at most 2T"),
    ("1x3T", "at most 2T"),
    ("8x" + "9" * 5000 + "G", "expected COUNTxMEMORY"),
    ("\u0668x64G", "expected COUNTxMEMORY"),  # only ASCII digits
])
def test_parse_gpus_bounds_say_the_bound(spec, needle):
    with pytest.raises(UserError) as e:
        parse_gpus(spec)
    assert needle in str(e.value) and len(str(e.value)) < 300


def test_largest_hardware_is_accepted_and_host_ram_is_bounded():
    assert parse_gpus("1024x64x2T") == (1024, 64, 2048 * GiB)
    assert make_profile("8x80G", host_ram="64T").host_ram == 64 * 1024 * GiB
    for ram in ("65T", "0G", "nanG", "1e9G"):
        with pytest.raises(UserError, match="--host-ram"):
            make_profile("8x80G", host_ram=ram)
