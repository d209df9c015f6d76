"""Smoke tests of the benchmark harness that need neither the corpus nor a real model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import corpus  # noqa: E402
from benchmarks.run import atomic_write, format_report, format_table  # noqa: E402


def _fake_result():
    return {
        "model": "resnet20", "title": "ResNet-20 / CIFAR-10", "metric_name": "top-1 %",
        "fp32_reference": 81.03, "eval_samples": 10000, "calib_samples": 1000, "run_s": 42.0,
        "date": "2026-01-01T00:00:00+00:00",
        "machine": {"cpu": "Test CPU", "logical_cpus": 2, "timing_threads": 1}, "versions": {"onnxruntime": "x"},
        "fp32": {"metric": 81.03, "ms": {"median": 1.5, "p10": 1.4, "p90": 1.7}},
        "timing": {"models": {"fp32": {"repeats": 100}}},
        "rows": [
            {"recipe": "ort_minmax_pc", "metric": 80.77, "drop": -0.26, "quantize_s": 4.68, "peak_rss_mb": 165.4,
             "speedup": {"median": 1.612, "p10": 1.5, "p90": 1.7}, "ms": {"median": 0.93}, "notes": ["pre-processed"]},
            {"recipe": "ort_entropy", "error": "ValueError: Too many bins | for data range", "notes": []},
        ],
    }


def _fake_minilm():
    return {"model": "minilm", "metric_name": "Spearman rho", "fp32": {"metric": 0.8203},
            "rows": [{"recipe": "ort_dynamic", "metric": 0.8173, "drop": -0.003, "quantize_s": 2.0,
                      "peak_rss_mb": 600, "speedup": {"median": 1.66, "p10": 1.4, "p90": 1.75}, "notes": []}]}


def test_table_formats_rows():
    table = format_table([_fake_result(), _fake_minilm()])
    lines = table.strip().splitlines()
    assert lines[0] == "| model | recipe | metric | drop | speedup (p10-p90) | quantize s | peak MB | notes |"
    assert lines[1] == "|---|---|---|---|---|---|---|---|"
    assert lines[2] == "| resnet20 | fp32 | 81.03 % | - | 1.00x | - | - | 1.500 ms |"
    assert lines[3] == ("| resnet20 | ort_minmax_pc | 80.77 % | -0.26 pp | 1.61x (1.50-1.70) | 4.7 | 165 | "
                        "0.930 ms; pre-processed |")
    # errors become rows; a '|' inside a cell is escaped so the table keeps its columns
    assert lines[4].startswith("| resnet20 | ort_entropy | - | - | - | - | - | ERROR: ValueError: Too many bins \\| ")
    assert lines[5] == "| minilm | fp32 | 0.8203 | - | 1.00x | - | - |  |"
    assert lines[6] == "| minilm | ort_dynamic | 0.8173 | -0.0030 | 1.66x (1.40-1.75) | 2.0 | 600 |  |"
    for line in lines:
        assert line.count("|") - line.count("\\|") == 9
    # the clean-round ratio (p10 time vs p10 time) joins the spread when the timing has it
    res = _fake_minilm()
    res["rows"][0]["speedup"]["clean"] = 1.72
    assert "| 1.66x (1.40-1.75; clean 1.72x) |" in format_table([res])


def test_report_has_header_and_run_time():
    rep = format_report([_fake_result()])
    assert rep.startswith("# hago_py PTQ benchmark results")
    assert "Test CPU" in rep and "run 42 s" in rep and "100 timing rounds" in rep


def test_atomic_write(tmp_path):
    p = tmp_path / "sub" / "r.json"
    atomic_write(p, json.dumps({"a": 1}))
    atomic_write(p, json.dumps({"a": 2}))
    assert json.loads(p.read_text()) == {"a": 2}
    assert [x.name for x in p.parent.iterdir()] == ["r.json"]


def test_locate_empty_dir_gives_skip_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(corpus.ENV_VAR, str(tmp_path))
    root, why = corpus.locate()
    assert root is None
    assert corpus.ENV_VAR in why and "models" in why
    models, why2 = corpus.get_models()
    assert models == {} and why2


def test_locate_missing_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(corpus.ENV_VAR, str(tmp_path / "nope"))
    root, why = corpus.locate()
    assert root is None and "not a folder" in why


def test_model_with_missing_files_is_unavailable(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.setenv(corpus.ENV_VAR, str(tmp_path))
    root, why = corpus.locate()
    assert root == tmp_path and why == ""
    models, why = corpus.get_models(["resnet20"])
    assert models == {} and "resnet20" in why and "missing" in why


def test_cli_skips_cleanly_without_corpus(tmp_path):
    env = dict(os.environ, **{corpus.ENV_VAR: str(tmp_path)})
    p = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(tmp_path / "out")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "SKIP" in p.stdout
    assert not (tmp_path / "out").exists()


def test_tvm_suite_through_run(tmp_path, monkeypatch):
    """`python -m benchmarks.run --suite tvm ...` hands its options to benchmarks.tvm_suite (--no-timing becomes
    --repeats 0); other suites keep run.py's own parser. Without the corpus it skips cleanly."""
    from benchmarks import run as run_mod
    from benchmarks import tvm_suite

    assert run_mod._tvm_suite_args(["--suite", "tvm", "--models", "resnet20", "--no-timing"]) == \
        ["--models", "resnet20", "--repeats", "0"]
    assert run_mod._tvm_suite_args(["--suite=tvm", "--limit", "5"]) == ["--limit", "5"]
    assert run_mod._tvm_suite_args(["--suite", "sparq"]) is None
    seen = []
    monkeypatch.setattr(tvm_suite, "main", lambda argv: seen.append(argv) or 0)
    assert run_mod.main(["--suite", "tvm", "--models", "lite0"]) == 0 and seen == [["--models", "lite0"]]
    env = dict(os.environ, **{corpus.ENV_VAR: str(tmp_path)})
    p = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "tvm", "--out", str(tmp_path / "out")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "SKIP" in p.stdout, (p.stdout, p.stderr)


def test_recipe_registry():
    from benchmarks import peers

    assert {"ort_minmax_pc", "ort_minmax_pt", "ort_entropy", "ort_percentile", "ort_dynamic",
            "nncf_default", "hago_default"} <= set(peers.RECIPES)
    r = peers.register(peers.hago_recipe("hago_test_only", models=("resnet20",), some_option=1))
    try:
        assert peers.recipe_names("resnet20", ["hago_test_only"]) == ["hago_test_only"]
        assert peers.recipe_names("lite0", ["hago_test_only"]) == []
        assert r.options == {"target": "x86_avx2", "some_option": 1}
        with pytest.raises(KeyError):
            peers.recipe_names("resnet20", ["no_such_recipe"])
    finally:
        peers.RECIPES.pop("hago_test_only")


def test_search_suite_carries_the_peers_and_plots_them(tmp_path):
    from benchmarks import peers
    from benchmarks.run import _search_plot

    names = peers.recipe_names("lite0", suite="search")
    assert "hago_search" in names and {"ort_minmax_pt", "nncf_default", "hago_default"} <= set(names)
    assert "hago_search" not in peers.recipe_names("lite0", suite="default")
    res = _fake_result()
    row = {"recipe": "hago_search", "family": "hago", "metric": 81.0, "drop": -0.03, "quantize_s": 60.0,
           "peak_rss_mb": 300, "notes": [], "speedup": {"median": 1.7, "p10": 1.6, "p90": 1.8},
           "search": {"metric": {"kind": "user", "name": "top-1 %", "fp32": 81.03}, "budgets": {"accuracy": 0.1},
                      "pareto": [{"id": "a", "speedup": 1.7, "metric": 81.0, "latency": "measured"}],
                      "points": [{"id": "a", "speedup": 1.7, "metric": 81.0, "latency": "measured",
                                  "quantized": True}]}}
    res["rows"].append(row)
    png = _search_plot(type("M", (), {"name": "resnet20"})(), res, row, tmp_path)
    assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res["plots"] = {"hago_search": png}
    assert f"]({png})" in format_report([res])


def test_rounding_pivot_table():
    from benchmarks.run import format_rounding_pivot

    res = _fake_result()
    res["rows"] = [{"recipe": "hago_w4a8_nearest", "drop": -3.5, "quantize_s": 6.0},
                   {"recipe": "hago_w4a8_gptq", "drop": -0.17, "quantize_s": 18.4},
                   {"recipe": "hago_w4a8e8_gptq", "drop": -0.1, "quantize_s": 18.0},
                   {"recipe": "hago_w4a4_gptq", "error": "boom"}, {"recipe": "ort_minmax_pc", "drop": -0.2}]
    lines = format_rounding_pivot([res]).splitlines()
    assert lines[0] == ("| method | resnet20 W4A8 | resnet20 W4A8 (first/last W8) | resnet20 W4A4 |")
    assert lines[2] == "| nearest | -3.50 pp, 6 s |  |  |"
    assert lines[3] == "| gptq | -0.17 pp, 18 s | -0.10 pp, 18 s | error |"
    assert format_rounding_pivot([_fake_result()]) == ""
