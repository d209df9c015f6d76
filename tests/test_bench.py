"""`hago bench` (hago_py/bench.py): JSON fields, the baseline gate, usage errors. Tiny models, few rounds; no
assertion on absolute speed."""
from __future__ import annotations

import json

import onnx
import pytest

from models import small_cnn

from hago_py import bench
from hago_py.cli import main
from hago_py.errors import OptionError

FAST = ["--sessions", "2", "--repeats", "30", "--min-time", "0.2", "--warmup", "2", "--shape", "input=4x3x8x8"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    a, b = d / "a.onnx", d / "b.onnx"
    onnx.save(small_cnn(seed=0), a)
    onnx.save(small_cnn(seed=1), b)
    return d, a, b


def _bench(args, capsys):
    rc = main(["bench", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_has_the_fields(models, capsys, tmp_path):
    _, a, b = models
    out = tmp_path / "bench.json"
    rc, text, err = _bench([f"fp32={a}", f"other={b}", a, "--target", "x86_avx2", "--json", out, *FAST], capsys)
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert r["format"] == 1 and r["target"] == "x86_avx2" and r["first_model"] == "fp32"
    assert r["host"]["cpu"] and isinstance(r["host"]["int8_flags"], list) and r["host"]["logical_cpus"] >= 1
    assert r["settings"]["sessions"] == 2 and r["settings"]["inputs"]["input"] == {"shape": [4, 3, 8, 8],
                                                                                   "dtype": "float32"}
    assert list(r["models"]) == ["fp32", "other", str(a)]          # order kept; labels NAME= or the path
    for label, m in r["models"].items():
        assert m["kind"] == "onnx" and m["rounds"] >= 30
        assert 0 < m["p10_ms"] <= m["median_ms"] <= m["p90_ms"]
        assert len(m["session_median_ms"]) == 2 and all(x > 0 for x in m["session_median_ms"])
        assert 0 < m["speedup_p10"] <= m["speedup_p90"] and m["speedup"] > 0
        assert m["paired_speedup"]["p10"] <= m["paired_speedup"]["median"] <= m["paired_speedup"]["p90"]
    assert r["models"]["fp32"]["speedup"] == 1.0
    assert 0.2 < r["models"]["other"]["speedup"] < 5                # same architecture: a ratio near 1
    assert "fp32" in text and "speedup" in text and f"wrote {out}" in text


def test_dynamic_dims_default_to_one_and_same_file_twice(models, capsys, tmp_path):
    _, a, _ = models
    out = tmp_path / "b.json"
    rc, _, err = _bench([a, a, "--target", "host", "--json", out, "--sessions", "1", "--repeats", "5",
                         "--min-time", "0", "--warmup", "1"], capsys)
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert r["settings"]["inputs"]["input"]["shape"] == [1, 3, 8, 8]
    assert list(r["models"]) == [str(a), f"{a}#2"]


def test_own_baseline_passes(models, capsys, tmp_path):
    _, a, b = models
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    args = [f"fp32={a}", f"other={b}", "--target", "x86_avx2", *FAST]
    assert _bench([*args, "--json", base], capsys)[0] == 0
    # the CLI logic, not the noise of a shared host: a wide tolerance (the 5 % check is run on the demo model)
    rc, text, err = _bench([*args, "--json", new, "--baseline", base, "--max-regression", "30%"], capsys)
    assert rc == 0, err
    cmp = json.loads(new.read_text())["comparison"]
    assert cmp["passed"] and cmp["models"]["other"]["verdict"] in ("ok", "faster") and cmp["tolerance"] == 0.3
    assert "no regression beyond 30%" in text


def test_regression_exits_1_naming_model_and_figures(models, capsys, tmp_path):
    _, a, b = models
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    args = [f"fp32={a}", f"other={b}", "--target", "x86_avx2", *FAST]
    assert _bench([*args, "--json", base], capsys)[0] == 0
    data = json.loads(base.read_text())
    data["models"]["other"]["speedup"] *= 3                          # the baseline says 3x faster vs FP32
    base.write_text(json.dumps(data))
    rc, _, err = _bench([*args, "--json", new, "--baseline", base, "--max-regression", "5%"], capsys)
    assert rc == 1
    assert "regression" in err and "model 'other'" in err and str(base) in err and "tolerance 5%" in err
    assert f"vs {data['models']['other']['speedup']:.3f}x" in err
    written = json.loads(new.read_text())                              # the JSON is written even on a regression
    assert written["comparison"]["models"]["other"]["verdict"] == "regression"
    assert not written["comparison"]["passed"]


@pytest.mark.parametrize("extra, words", [
    (["--max-regression", "5%"], "add --baseline"),
    (["--baseline", "BASE", "--max-regression", "200"], "percentage below 100"),
    (["--baseline", "BASE", "--max-regression", "abc"], "--max-regression 'abc'"),
    (["--sessions", "0"], "--sessions 0"),
    (["--shape", "input=1xAx3"], "1x3x32x32"),
    (["--shape", "nope=1x3x8x8"], "nope"),
    (["--shape", "input=1x3x8"], "does not fit input 'input'"),
])
def test_bad_arguments_exit_2(models, capsys, tmp_path, extra, words):
    _, a, b = models
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"first_model": str(a), "models": {str(a): {"speedup": 1.0}}}))
    extra = [str(base) if x == "BASE" else x for x in extra]
    rc, _, err = _bench([a, b, "--target", "x86_avx2", "--repeats", "1", "--min-time", "0", *extra], capsys)
    assert rc == 2 and err.startswith("hago: error:") and words in err, err


def test_missing_target_is_a_usage_error(models, capsys):
    _, a, _ = models
    with pytest.raises(SystemExit) as e:
        main(["bench", str(a)])
    assert e.value.code == 2 and "--target" in capsys.readouterr().err


def test_missing_files_are_named(models, capsys, tmp_path):
    _, a, _ = models
    rc, _, err = _bench([a, tmp_path / "nope.onnx", "--target", "x86_avx2"], capsys)
    assert rc == 2 and "nope.onnx" in err and "does not exist" in err
    rc, _, err = _bench([a, "--target", "x86_avx2", "--baseline", tmp_path / "old.json"], capsys)
    assert rc == 2 and "old.json" in err and "--json" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{\"models\": 3}")
    rc, _, err = _bench([a, "--target", "x86_avx2", "--baseline", bad], capsys)
    assert rc == 2 and "bad.json" in err and "'models'" in err
    rc, _, err = _bench([a, "--target", "x86_avx2", "--json", tmp_path / "no" / "dir" / "x.json"], capsys)
    assert rc == 2 and "x.json" in err


def test_baseline_must_share_first_model_and_target(models, capsys, tmp_path):
    _, a, b = models
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"first_model": "fp32", "target": "x86_avx2",
                                "models": {"fp32": {"speedup": 1.0}, "b": {"speedup": 1.0}}}))
    rc, _, err = _bench([f"int8={a}", f"b={b}", "--target", "x86_avx2", "--baseline", base, "--repeats", "2",
                         "--min-time", "0", "--sessions", "1"], capsys)
    assert rc == 2 and "'fp32'" in err and "fp32=PATH" in err
    rc, _, err = _bench([f"fp32={a}", f"b={b}", "--target", "x86_amx", "--baseline", base, "--repeats", "2",
                         "--min-time", "0", "--sessions", "1"], capsys)
    assert rc == 2 and "x86_avx2" in err and "x86_amx" in err


def test_build_folder_target_is_checked_against_its_manifest(models, capsys, tmp_path):
    _, a, _ = models
    folder = tmp_path / "build" / "x86_avx2"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"target": "x86_avx2", "library": {"file": "model.so"}}))
    rc, _, err = _bench([a, folder, "--target", "host"], capsys)
    assert rc == 2 and "built for target 'x86_avx2'" in err and "manifest.json" in err
    rc, _, err = _bench([a, tmp_path / "build", "--target", "x86_avx2"], capsys)     # <out>/<target>/ found
    assert rc == 2 and "no library file" in err and "model.so" in err
    rc, _, err = _bench([a, tmp_path, "--target", "x86_avx2"], capsys)
    assert rc == 2 and "without manifest.json" in err


def test_parse_helpers():
    assert bench.parse_tolerance("5%") == pytest.approx(0.05)
    assert bench.parse_tolerance("0.1") == pytest.approx(0.1)
    for bad in ("5", "-1%", "100%", "x"):
        with pytest.raises(OptionError):
            bench.parse_tolerance(bad)
    assert bench.parse_shapes(["x=1x3x32x32", "y=4"]) == {"x": [1, 3, 32, 32], "y": [4]}
    with pytest.raises(OptionError):
        bench.parse_shapes(["x1x3"])


def test_tvm_build_folder_is_timed_with_the_onnx_models(models, capsys, tmp_path):
    pytest.importorskip("tvm")
    from models import calib

    from hago_py.build import build

    _, a, _ = models
    m = build(small_cnn(seed=0), "host", calibration=calib(n=8), out=tmp_path / "build", check=False)
    out = tmp_path / "tvm.json"
    rc, _, err = _bench([f"fp32={a}", f"tvm={tmp_path / 'build'}", "--target", "host", "--json", out,
                         "--sessions", "2", "--repeats", "10", "--min-time", "0", "--warmup", "1"], capsys)
    assert rc == 0, err
    r = json.loads(out.read_text())
    assert r["models"]["tvm"]["kind"] == "tvm" and r["models"]["tvm"]["path"] == m["dir"]
    assert r["models"]["tvm"]["speedup"] > 0 and r["versions"]["tvm"]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "--baseline" in text and "--max-regression" in text and "--sessions" in text
