"""target="host": the built-in spec matching the CPU flags (hago_py/hw/host.py), and the AMX spec."""
from __future__ import annotations

import pytest

import hago_py
from hago_py.errors import SpecError
from hago_py.hw import host as hw_host
from hago_py.hw.host import HostCpu, match_host, read_host

from models import calib, small_cnn

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2
"""
ARM = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU part\t: 0xd0b
"""


def cpu(arch, *flags):
    return HostCpu(arch, "test cpu", frozenset(flags))


def test_read_host_parses_x86_and_arm_cpuinfo():
    h = read_host(X86, "x86_64")
    assert h.model == "Intel(R) Xeon(R) Platinum 8480+" and h.arch == "x86_64"
    assert {"amx_int8", "avx512_vnni", "avx2"} <= h.flags  # the first processor's flags line
    a = read_host(ARM, "aarch64")
    assert "asimddp" in a.flags and a.deciding() == ["asimddp", "asimd"]


@pytest.mark.parametrize("arch,flags,want", [
    ("x86_64", ("avx2", "avx512f", "avx512_vnni", "amx_int8"), "x86_amx"),
    ("x86_64", ("avx2", "avx512f", "avx512_vnni"), "x86_avx512_vnni"),
    ("x86_64", ("avx2", "avx_vnni"), "x86_avx512_vnni"),
    ("x86_64", ("avx2",), "x86_avx2"),
    ("aarch64", ("asimd", "asimddp"), "arm_cortex_a76"),
    ("aarch64", ("asimd",), "arm_cortex_a72"),
])
def test_match_host_by_flags(arch, flags, want):
    name, why = match_host(cpu(arch, *flags))
    assert name == want
    assert want in why and "test cpu" in why and flags[-1] in why


@pytest.mark.parametrize("c", [cpu("x86_64", "sse2"), cpu("riscv64", "rv64")])
def test_no_matching_spec_is_a_spec_error(c):
    with pytest.raises(SpecError, match="target='host': no built-in spec matches this CPU.*pass a built-in target"):
        match_host(c)


def test_load_spec_host_and_quantize_report(monkeypatch):
    monkeypatch.setattr(hw_host, "read_host", lambda *a, **k: cpu("x86_64", "avx2"))
    spec = hago_py.load_spec("host")
    assert spec.name == "x86_avx2" and "AVX2 without VNNI" in spec.host_match
    res = hago_py.quantize(small_cnn(), calib(), target="host", measure_latency=False)
    assert res.report["target"] == "x86_avx2" and "-> x86_avx2" in res.report["target_host"]
    from hago_py.report.write import render_markdown

    assert "target `host`: host CPU test cpu" in render_markdown(res.report)
    assert hago_py.quantize(small_cnn(), calib(), measure_latency=False).report["target_host"] is None


def test_amx_spec_is_valid_and_says_its_figures_are_estimates():
    s = hago_py.load_spec("x86_amx")
    v = hago_py.load_spec("x86_avx512_vnni")
    assert "amx_int8" in s.isa and s.tvm_target == {"kind": "llvm", "mcpu": "sapphirerapids"}
    assert s.cost_model.peak_int8_ops_per_s > v.cost_model.peak_int8_ops_per_s
    assert any("ESTIMATE" in src for src in s.cost_model.sources)
    assert "x86_amx" in {d["name"] for d in hago_py.list_specs()}
