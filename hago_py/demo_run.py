"""`hago demo`: quantize the embedded ResNet-20 for a target, then report accuracy and measured speed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .backends.ort import OrtBackend


def _accuracy(model, x, y, threads=1, batch=100) -> float:
    from .demo import top1

    be = OrtBackend(threads=threads)
    sess = be.compile(model, optimization="all")
    logits = np.concatenate([be.run(sess, {"input": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return 100.0 * top1(logits, y)


def run_demo(out_dir: str | Path = "hago_demo", target: str = "x86_avx2") -> dict:
    from . import api
    from .demo import load_demo
    from .errors import OutputError

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create demo output folder '{out}': {e.strerror}") from e
    d = load_demo()
    print(f"[demo] ResNet-20 CIFAR-10 (embedded), {len(d['calib']['input'])} calibration images, "
          f"{len(d['test_y'])} labelled test images, target {target}")
    res = api.quantize(str(d["model"]), d["calib"], target, progress=True)
    path = res.save(out / "resnet20_int8.onnx", report_dir=out / "report")
    acc_fp = _accuracy(str(d["model"]), d["test_x"], d["test_y"])
    acc_q = _accuracy(res.model, d["test_x"], d["test_y"])
    lat = res.report.get("latency", {})
    print(f"[demo] FP32 top-1 {acc_fp:.2f} %   INT8 top-1 {acc_q:.2f} %   drop {acc_fp - acc_q:+.2f} pp "
          f"(on the {len(d['test_y'])} embedded test images)")
    if lat:
        sp = lat["speedup_spread"]
        print(f"[demo] measured speedup {lat['speedup']:.2f}x vs FP32 (batch 1, {lat['threads']} thread, "
              f"interleaved; per-round p10-p90 {sp['p10']:.2f}-{sp['p90']:.2f})")
    print(f"[demo] wrote {path}, {path.with_suffix('.plan.json')} and {out / 'report'}/report.md")
    return {"fp32_top1": acc_fp, "int8_top1": acc_q, "speedup": lat.get("speedup"), "model": str(path)}
