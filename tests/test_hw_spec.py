"""Hardware specs: built-ins load and validate, malformed specs fail with a SpecError naming file and field."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from hago_py.errors import HagoError, OptionError, SpecError
from hago_py.hw import (
    BUILTIN_DIR,
    CostModel,
    HardwareSpec,
    Scheme,
    list_specs,
    load_spec,
    predict_latency,
    predict_speedup,
)

BUILTINS = ["arm_cortex_a72", "arm_cortex_a76", "cuda_t4", "x86_amx", "x86_avx2", "x86_avx512_vnni"]
REQUIRED_OPS = ["Conv", "MatMul", "Gemm", "Add", "GlobalAveragePool"]


def _raw(name: str = "x86_avx2") -> dict:
    return json.loads((BUILTIN_DIR / f"{name}.json").read_text())


def _write(tmp_path: Path, data, name: str = "user_spec.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return p


# --- built-ins --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_and_validates(name):
    spec = load_spec(name)
    assert isinstance(spec, HardwareSpec)
    assert spec.name == name
    assert spec.source_path == str(BUILTIN_DIR / f"{name}.json")
    for op in REQUIRED_OPS:
        assert spec.schemes(op), f"{name} lacks {op}"
        for s in spec.schemes(op):
            assert isinstance(s, Scheme)
            assert isinstance(s.weight_symmetric, tuple) and isinstance(s.granularity, tuple)
    for op in ("Conv", "MatMul", "Gemm"):
        assert any(s.native and s.weight_bits == 8 and s.activation_bits == 8 for s in spec.schemes(op))
    assert spec.passthrough_ops and spec.fusion_patterns
    assert spec.accumulator_bits == 32
    assert "kind" in spec.tvm_target and spec.tvm_target == spec.backend["tvm_target"]
    cm = spec.cost_model
    assert isinstance(cm, CostModel)
    assert cm.peak_int8_ops_per_s > 0 and cm.peak_fp32_flops_per_s > 0 and cm.memory_bandwidth_bytes_per_s > 0
    assert cm.sources and all(isinstance(x, str) and x for x in cm.sources)
    # a round trip through to_dict gives the same spec
    again = load_spec(spec.to_dict())
    assert again.ops == spec.ops and again.cost_model == spec.cost_model and again.source_path is None
    hash(spec)  # frozen and hashable despite dict fields


def test_list_specs_returns_the_builtins():
    specs = list_specs()
    assert [s["name"] for s in specs] == BUILTINS
    for s in specs:
        assert set(s) >= {"name", "description", "backend", "path"}
        assert Path(s["path"]).is_file() and s["description"]


def test_tvm_targets():
    assert load_spec("x86_avx512_vnni").tvm_target == {"kind": "llvm", "mcpu": "cascadelake"}
    assert load_spec("cuda_t4").tvm_target == {"kind": "cuda", "arch": "sm_75"}
    a72 = load_spec("arm_cortex_a72").tvm_target
    assert a72["mcpu"] == "cortex-a72" and a72["mattr"] == ["+neon"]
    a76 = load_spec("arm_cortex_a76").tvm_target
    assert a76["mcpu"] == "cortex-a76" and "+dotprod" in a76["mattr"]


def test_hazards():
    avx2 = load_spec("x86_avx2")
    h = avx2.hazard_for("uint8", "int8")
    assert h is not None and h.instruction == "vpmaddubsw" and "reduce_range" in h.remedies
    assert h.intermediate_bits == 16 and h.max_safe_weight_bits == 7
    assert avx2.hazard_for("uint8", "int8", weight_bits=7) is None
    assert avx2.hazard_for("uint8", "uint8") is None
    vnni = load_spec("x86_avx512_vnni")
    assert vnni.saturation_hazards == ()
    assert vnni.hazard_for("uint8", "int8") is None
    assert load_spec("arm_cortex_a76").saturation_hazards == ()
    assert load_spec("cuda_t4").saturation_hazards == ()
    a72 = load_spec("arm_cortex_a72")
    assert a72.hazard_for("uint8", "int8") is None  # U8X8 kernel widens to 16 bits, umlal into int32


def test_t4_is_symmetric_int8():
    t4 = load_spec("cuda_t4")
    s = t4.find_scheme("Conv", 8, 8)
    assert s.weight_dtype == "int8" and s.activation_dtype == "int8"
    assert s.weight_symmetric == (True,) and s.activation_symmetric == (True,)
    assert "per_channel" in s.granularity
    assert not t4.supports_dynamic("MatMul")


# --- supports / find_scheme ---------------------------------------------------------------------------------


def test_supports_and_find_scheme():
    spec = load_spec("x86_avx2")
    assert spec.supports("Conv", 8, 8)
    assert spec.supports("Conv", 4, 8)
    assert spec.supports("Conv", 8, 8, weight_dtype="uint8")
    assert not spec.supports("Conv", 8, 8, activation_dtype="int8")
    assert not spec.supports("Conv", 2, 8)
    assert not spec.supports("Conv", 8, 4)
    assert spec.supports("Add")  # weightless op, default activation_bits=8
    assert not spec.supports("Add", 8, 8)  # Add has no weights
    assert not spec.supports("LSTM")
    assert spec.schemes("LSTM") == ()

    s = spec.find_scheme("Conv", 8, 8)
    assert s.native and s.weight_dtype == "int8" and s.kernel == "QLinearConv"
    assert spec.find_scheme("Conv", 8, 8, weight_dtype="uint8").weight_symmetric == (True, False)
    s4 = spec.find_scheme("Conv", 4, 8)
    assert s4 is not None and not s4.native and s4.kernel is None
    assert spec.find_scheme("Conv", 16, 16) is None
    assert spec.find_scheme("Nope", 8, 8) is None
    add = spec.find_scheme("Add", None, 8)
    assert add.weight_bits is None and add.weight_dtype is None and add.granularity == ()

    assert spec.supports_dynamic("MatMul") and spec.supports_dynamic("Gemm")
    assert not spec.supports_dynamic("Conv")


def test_find_scheme_prefers_native():
    raw = _raw()
    schemes = raw["ops"]["Conv"]["schemes"]
    non_native = copy.deepcopy(schemes[0])
    non_native["native"] = False
    non_native["kernel"] = None
    raw["ops"]["Conv"]["schemes"] = [non_native] + schemes
    spec = load_spec(raw)
    assert spec.find_scheme("Conv", 8, 8).native


# --- name lookup -------------------------------------------------------------------------------------------


def test_unknown_name_suggests_closest():
    with pytest.raises(SpecError) as ei:
        load_spec("x86_avx")
    msg = str(ei.value)
    assert "did you mean 'x86_avx2'" in msg
    for n in BUILTINS:
        assert n in msg
    with pytest.raises(SpecError, match="cuda_t4"):
        load_spec("cuda_t5")


def test_spec_error_is_hago_error():
    with pytest.raises(HagoError):
        load_spec("definitely_not_a_spec")


def test_bare_builtin_file_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_spec("x86_avx2.json").name == "x86_avx2"


def test_missing_file(tmp_path):
    p = tmp_path / "nope.json"
    with pytest.raises(SpecError, match="not found") as ei:
        load_spec(str(p))
    assert str(p) in str(ei.value)


# --- user specs and malformed files --------------------------------------------------------------------------


def test_user_spec_from_tmp_path(tmp_path):
    raw = _raw()
    raw["name"] = "my_board"
    raw["ops"]["Conv"]["schemes"] = raw["ops"]["Conv"]["schemes"][:1]
    p = _write(tmp_path, raw)
    for src in (str(p), p):
        spec = load_spec(src)
        assert spec.name == "my_board" and spec.source_path == str(p)
        assert len(spec.schemes("Conv")) == 1
    # a path without .json / separators still works when the file exists
    spec = load_spec(load_spec(str(p)))
    assert spec.name == "my_board"


def test_bad_json_names_file_and_position(tmp_path):
    p = _write(tmp_path, '{"name": "x",\n  "description": oops}\n', "broken.json")
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    msg = str(ei.value)
    assert str(p) in msg and "not valid JSON" in msg and "line 2" in msg and "column" in msg


def test_not_an_object(tmp_path):
    p = _write(tmp_path, "[1, 2]", "list.json")
    with pytest.raises(SpecError, match="JSON object") as ei:
        load_spec(p)
    assert str(p) in str(ei.value)


def test_schema_violation_gives_json_path(tmp_path):
    raw = _raw()
    raw["ops"]["Conv"]["schemes"][0]["weight_bits"] = "eight"
    p = _write(tmp_path, raw, "bad_type.json")
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    msg = str(ei.value)
    assert "ops.Conv.schemes[0].weight_bits: 'eight' is not of type 'integer'" in msg
    assert str(p) in msg


def test_schema_catches_typos_and_missing_fields(tmp_path):
    raw = _raw()
    raw["ops"]["MatMul"]["schemes"][0]["weight_bit"] = raw["ops"]["MatMul"]["schemes"][0].pop("weight_bits")
    p = _write(tmp_path, raw, "typo.json")
    with pytest.raises(SpecError) as ei:
        load_spec(p)
    msg = str(ei.value)
    assert "ops.MatMul.schemes[0]" in msg and "weight_bit" in msg and "did you mean 'weight_bits'" in msg

    raw = _raw()
    raw["colour"] = "blue"
    with pytest.raises(SpecError, match=r"\(top level\).*colour"):
        load_spec(raw)

    raw = _raw()
    del raw["cost_model"]["sources"]
    with pytest.raises(SpecError, match=r"cost_model: 'sources' is a required property"):
        load_spec(raw)

    raw = _raw()
    raw["cost_model"]["sources"] = ["ok", ""]
    with pytest.raises(SpecError, match=r"cost_model\.sources\[1\]"):
        load_spec(raw)

    raw = _raw()
    raw["requantize"]["style"] = "magic"
    with pytest.raises(SpecError, match=r"requantize\.style"):
        load_spec(raw)

    raw = _raw()
    raw["ops"]["Conv"]["schemes"][0]["granularity"] = ["per_row"]
    with pytest.raises(SpecError, match=r"ops\.Conv\.schemes\[0\]\.granularity\[0\]"):
        load_spec(raw)

    raw = _raw()
    raw["accumulator"]["saturation_hazards"][0]["remedies"] = ["pray"]
    with pytest.raises(SpecError, match=r"accumulator\.saturation_hazards\[0\]\.remedies\[0\]"):
        load_spec(raw)

    raw = _raw()
    raw["backend"]["tvm_target"] = {"mcpu": "znver3"}
    with pytest.raises(SpecError, match=r"backend\.tvm_target: 'kind' is a required property"):
        load_spec(raw)


@pytest.mark.parametrize("mutate, expect", [
    (lambda r: r["ops"]["Conv"]["schemes"][0].pop("weight_dtype"),
     r"ops\.Conv\.schemes\[0\]: has weight_bits but no weight_dtype"),
    (lambda r: r["ops"]["Conv"]["schemes"][0].pop("granularity"),
     r"ops\.Conv\.schemes\[0\]: has weight_bits but no granularity"),
    (lambda r: r["ops"]["Conv"]["schemes"][0].pop("weight_symmetric"),
     r"ops\.Conv\.schemes\[0\]: has weight_bits but no weight_symmetric"),
    (lambda r: r["ops"]["Add"]["schemes"][0].__setitem__("weight_dtype", "int8"),
     r"ops\.Add\.schemes\[0\]: has weight_dtype but no weight_bits"),
    (lambda r: r["ops"]["Conv"]["schemes"][2].__setitem__("weight_bits", 8),
     r"ops\.Conv\.schemes\[2\]\.weight_bits: 8 bits do not fit weight_dtype int4"),
    (lambda r: r["ops"]["Conv"]["schemes"][0].__setitem__("activation_bits", 12),
     r"ops\.Conv\.schemes\[0\]\.activation_bits: 12 bits do not fit activation_dtype uint8"),
    (lambda r: r["fusion_patterns"].insert(0, ["Conv", "Rleu"]),
     r"fusion_patterns\[0\]\[1\]: unknown op 'Rleu' \(did you mean 'Relu'\?\)"),
    (lambda r: r["accumulator"]["saturation_hazards"][0].__setitem__("remedies", []),
     r"saturation_hazards\[0\]\.remedies"),
    (lambda r: r["dynamic_activations"]["ops"].append("Conv"),
     r"dynamic_activations\.ops\[2\]: no scheme of 'Conv'"),
    (lambda r: r["ops"]["Gemm"]["schemes"][0].__setitem__("activation_mode", ["static"]),
     r"dynamic_activations\.ops\[1\]: no scheme of 'Gemm'"),
    (lambda r: r["requantize"].update(style="fixed_point") or r["requantize"].pop("multiplier_bits"),
     r"requantize\.multiplier_bits"),
])
def test_semantic_violations(tmp_path, mutate, expect):
    raw = _raw()
    mutate(raw)
    p = _write(tmp_path, raw, "semantic.json")
    with pytest.raises(SpecError, match=expect) as ei:
        load_spec(p)
    assert str(p) in str(ei.value)


def test_fusion_with_common_activation_is_allowed():
    raw = _raw()
    raw["passthrough_ops"] = [o for o in raw["passthrough_ops"] if o not in ("Relu", "Clip")]
    raw["fusion_patterns"].append(["Conv", "LeakyRelu"])
    spec = load_spec(raw)
    assert spec.is_fusable(["Conv", "LeakyRelu"])


def test_dict_input_is_not_mutated():
    raw = _raw()
    before = copy.deepcopy(raw)
    spec = load_spec(raw)
    spec.to_dict()["name"] = "changed"
    assert raw == before and spec.name == "x86_avx2"


def test_bad_source_type():
    with pytest.raises(SpecError):
        load_spec(42)  # type: ignore[arg-type]


# --- cost model ---------------------------------------------------------------------------------------------


def test_predict_latency_roofline():
    cm = CostModel(peak_int8_ops_per_s=4e9, peak_fp32_flops_per_s=1e9, memory_bandwidth_bytes_per_s=1e9,
                   cores=1, sources=("test",))
    assert predict_latency(2e9, 1e6, cm, int8=False) == pytest.approx(2.0)   # compute bound
    assert predict_latency(2e9, 1e6, cm, int8=True) == pytest.approx(0.5)
    assert predict_latency(1e3, 3e9, cm, int8=True) == pytest.approx(3.0)    # memory bound
    with pytest.raises(OptionError):
        predict_latency(-1, 0, cm, int8=True)


def test_predict_speedup():
    cm = CostModel(peak_int8_ops_per_s=4e9, peak_fp32_flops_per_s=1e9, memory_bandwidth_bytes_per_s=1e9,
                   cores=1, sources=("test",))
    compute = {"macs": 10**9, "weight_bytes_fp32": 4000, "act_bytes_fp32": 4000, "quantized": True}
    memory = {"macs": 10, "weight_bytes_fp32": 4 * 10**9, "act_bytes_fp32": 0, "quantized": True}
    assert predict_speedup([compute], cm) == pytest.approx(4.0)
    assert predict_speedup([memory], cm) == pytest.approx(4.0)
    assert predict_speedup([dict(compute, quantized=False)], cm) == pytest.approx(1.0)
    mixed = predict_speedup([compute, dict(compute, quantized=False)], cm)
    assert 1.0 < mixed < 4.0
    assert predict_speedup([compute], load_spec("x86_avx512_vnni")) > predict_speedup([compute], load_spec("x86_avx2"))
    with pytest.raises(OptionError):
        predict_speedup([], cm)
    with pytest.raises(OptionError, match="macs"):
        predict_speedup([{"quantized": True}], cm)


# --- SPARQ (optional, hypothetical hardware) ------------------------------------------------------------------

_SPARQ = {"window_bits": 4, "window_options": [5, 3], "pairs": True, "mac_speedup": 2.0,
          "source": "Shomron et al., NeurIPS 2021: 4-bit windows with pairs, 2x int8 MAC throughput"}


def test_sparq_spec_loads():
    raw = _raw()
    raw["sparq"] = copy.deepcopy(_SPARQ)
    spec = load_spec(raw)
    assert spec.sparq == _SPARQ and spec.to_dict()["sparq"] == _SPARQ
    hash(spec)
    assert load_spec(spec.to_dict()).sparq == _SPARQ
    for name in BUILTINS:  # no real product has SPARQ hardware
        assert load_spec(name).sparq is None


@pytest.mark.parametrize("mutate, expect", [
    (lambda s: s.__setitem__("window_bits", 8), r"sparq\.window_bits"),
    (lambda s: s.__setitem__("window_options", [4]), r"sparq\.window_options\[0\]"),
    (lambda s: s.__setitem__("mac_speedup", 1.0), r"sparq\.mac_speedup"),
    (lambda s: s.pop("source"), r"sparq: 'source' is a required property"),
    (lambda s: s.__setitem__("pair", True), r"sparq.*'pair'.*did you mean 'pairs'"),
    (lambda s: s.update(window_bits=6, window_options=[3, 5]), r"sparq\.window_options\[1\]: 5 window placements"),
    (lambda s: s.update(window_bits=7, window_options=[2, 3]), r"sparq\.window_options\[1\]: 3 window placements"),
])
def test_sparq_spec_refused(tmp_path, mutate, expect):
    raw = _raw()
    raw["sparq"] = copy.deepcopy(_SPARQ)
    mutate(raw["sparq"])
    p = _write(tmp_path, raw, "sparq.json")
    with pytest.raises(SpecError, match=expect) as ei:
        load_spec(p)
    assert str(p) in str(ei.value)


def test_predict_sparq_speedup():
    from hago_py.hw.cost import predict_layer_latency, predict_sparq_speedup

    cm = CostModel(peak_int8_ops_per_s=4e9, peak_fp32_flops_per_s=1e9, memory_bandwidth_bytes_per_s=1e9,
                   cores=1, sources=("test",))
    compute = {"macs": 10**9, "weight_bytes_fp32": 4000, "act_bytes_fp32": 4000, "quantized": True}
    memory = {"macs": 10, "weight_bytes_fp32": 4 * 10**9, "act_bytes_fp32": 0, "quantized": True}
    sp = {"mac_speedup": 2.0}
    assert predict_sparq_speedup([compute], cm, sp) == pytest.approx(8.0)        # MAC bound: 4x -> 8x
    assert predict_sparq_speedup([compute], cm, sp) > predict_speedup([compute], cm)
    assert predict_sparq_speedup([memory], cm, sp) == pytest.approx(predict_speedup([memory], cm))
    # layers opt out, FP32 layers and non-8-bit activations gain nothing
    assert predict_sparq_speedup([dict(compute, sparq=False)], cm, sp) == pytest.approx(4.0)
    assert predict_sparq_speedup([dict(compute, quantized=False)], cm, sp) == pytest.approx(1.0)
    assert predict_layer_latency(dict(compute, activation_bits=16), cm, sparq=sp) == pytest.approx(
        predict_layer_latency(dict(compute, activation_bits=16), cm))
    # a spec with a sparq object supplies it; one without is refused
    raw = _raw()
    raw["sparq"] = dict(_SPARQ, mac_speedup=3.0)
    spec = load_spec(raw)
    assert predict_sparq_speedup([compute], spec) == pytest.approx(predict_speedup([compute], spec) * 3.0)
    with pytest.raises(OptionError, match="sparq"):
        predict_sparq_speedup([compute], load_spec("x86_avx2"))
    with pytest.raises(OptionError, match="mac_speedup"):
        predict_sparq_speedup([compute], cm, {"mac_speedup": float("nan")})
    with pytest.raises(OptionError):
        predict_sparq_speedup([], cm, sp)
