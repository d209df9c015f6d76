"""Reports: the plain quantization report, the search report (Pareto plot, per-layer table, log, peers), CLI."""
import base64
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import hago_py
from hago_py.cli import main as cli_main
from hago_py.report import write_report
from hago_py.report.plot import load_peers, pareto_png
from hago_py.report.write import markdown_to_html, render_markdown

from models import calib, small_cnn

REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def search_result():
    return hago_py.quantize(small_cnn(), calib(), "x86_avx2", search=True, accuracy_budget=0.01,
                            measure_latency=False, max_calib_samples=32)


def test_plain_report_unchanged(tmp_path):
    res = hago_py.quantize(small_cnn(), calib(), "x86_avx2", measure_latency=False, max_calib_samples=32)
    md = render_markdown(res.report)
    assert "## Per-layer decisions" in md and "Hardware-aware search" not in md
    write_report(res, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"report.md", "report.html", "report.json", "plan.json"}
    assert "<table>" in (tmp_path / "report.html").read_text()


def test_search_report_files(search_result, tmp_path):
    peers = [{"name": "ort_minmax", "family": "ort", "speedup": 1.4, "delta": -0.002}]
    write_report(search_result, tmp_path, peers=peers)
    png = (tmp_path / "pareto.png").read_bytes()
    assert png.startswith(PNG)
    md = (tmp_path / "report.md").read_text()
    for needle in ("## Hardware-aware search", "![Pareto front", "### Pareto front", "### Per-layer decisions of the search",
                   "## Search log", "**proxy**", "predicted", "ort_minmax", "sensitivity (rank)", "latency share"):
        assert needle in md, needle
    html = (tmp_path / "report.html").read_text()
    b64 = html.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(b64) == png                     # the HTML is self-contained
    assert html.count("<table>") >= 3
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["search"]["chosen"]["id"] == search_result.chosen["id"]
    assert rep["search"]["peers"][0]["name"] == "ort_minmax"


def test_per_layer_rows_explain_every_searched_layer(search_result):
    s = search_result.report["search"]
    nodes = {r["node"] for r in s["layers"]}
    assert nodes == set(s["space"]["layers"])
    for r in s["layers"]:
        assert r["why"] and r["config"] and r["op"]
    assert s["log"] and all({"t", "stage", "msg"} <= set(e) for e in s["log"])


def test_peers_from_benchmark_results():
    path = REPO / "benchmarks" / "results" / "resnet20.json"
    if not path.exists():
        pytest.skip("no benchmark results in this checkout")
    peers = load_peers(path)
    assert peers and all({"name", "family", "speedup", "delta"} <= set(p) for p in peers)
    assert any(p["family"] == "ort" for p in peers)
    with pytest.raises(hago_py.OptionError):
        load_peers([{"name": "x"}])


def test_pareto_plot_handles_user_metric_and_budgets(search_result):
    s = dict(search_result.report["search"])
    s["metric"] = dict(s["metric"], kind="user", name="top1")
    s["budgets"] = dict(s["budgets"], latency=1.2)
    png = pareto_png(s, [{"name": "nncf", "family": "nncf", "speedup": 0.4, "delta": 0.001}])
    assert png.startswith(PNG)


def test_markdown_to_html_subset():
    html = markdown_to_html("# T\n- a **b** `c`\n\n| x | y |\n|---|---|\n| 1 | a\\|b |\n```\nlog <1>\n```\n")
    assert "<h1>T</h1>" in html and "<b>b</b>" in html and "<code>c</code>" in html
    assert "<td>a|b</td>" in html and "log &lt;1&gt;" in html


def test_cli_search_report_and_resume(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(small_cnn(), str(model))
    np.savez(tmp_path / "calib.npz", **calib())
    out = tmp_path / "q.onnx"
    base = ["quantize", str(model), "--calib", str(tmp_path / "calib.npz"), "--out", str(out), "--no-latency", "-q",
            "--max-calib-samples", "32", "--search", "--accuracy-budget", "0.01"]
    peers = REPO / "benchmarks" / "results" / "resnet20.json"
    extra = ["--peers", str(peers)] if peers.exists() else []
    rc = cli_main(base + ["--report", str(tmp_path / "rep")] + extra)
    msg = capsys.readouterr().out
    assert rc == 0 and out.exists() and "search:" in msg and "predicted" in msg
    assert (tmp_path / "rep" / "pareto.png").exists() and (tmp_path / "q.search.json").exists()
    plan1 = (tmp_path / "q.plan.json").read_text()
    # the default checkpoint exists: a plain re-run is refused, --resume replays it
    rc = cli_main(base)
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err
    rc = cli_main(base + ["--resume"])
    assert rc == 0 and "0 measured" in capsys.readouterr().out
    assert (tmp_path / "q.plan.json").read_text() == plan1
    # impossible budget: one line naming the closest point, exit 2
    rc = cli_main(base[:-2] + ["--latency-budget", "1000", "--checkpoint", str(tmp_path / "c2.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "closest point" in err[0]
    # search flags without --search
    rc = cli_main(["quantize", str(model), "--calib", str(tmp_path / "calib.npz"), "--out", str(out),
                   "--accuracy-budget", "0.1"])
    assert rc == 2 and "--search" in capsys.readouterr().err
