"""The `hago` command: thin wrapper over hago_py.api. Exit codes: 0 ok, 2 bad input, 1 internal error."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .errors import HagoError, OutputError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hago", description="Hardware-aware post-training quantization of ONNX models")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize an ONNX model for a target")
    q.add_argument("model", help="FP32 .onnx model")
    q.add_argument("--target", "-t", default="x86_avx2", help="built-in target name or path to a spec JSON")
    q.add_argument("--calib", required=True, help="calibration data: .npz (keys = input names) or folder of .npy")
    q.add_argument("--out", "-o", required=True, help="output .onnx path")
    q.add_argument("--report", help="folder for report.md / report.html / report.json / plan.json")
    q.add_argument("--weight-bits", type=int, default=8)
    q.add_argument("--activation-bits", type=int, default=8)
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default per-channel)")
    q.add_argument("--clipping", default="auto", help="activation range method: minmax | percentile | mse | entropy | auto")
    q.add_argument("--activation-mode", default="auto", help="static | dynamic | auto")
    q.add_argument("--saturation-remedy", default="auto", help="auto | none | reduce_range | u8u8")
    q.add_argument("--exclude", action="append", default=[], help="node name to keep FP32 (repeatable)")
    q.add_argument("--simulate", action="store_true", help="allow schemes without an integer kernel")
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--max-calib-samples", type=int, default=512)
    q.add_argument("--no-latency", action="store_true", help="skip the FP32-vs-quantized timing")
    q.add_argument("--quiet", "-q", action="store_true")

    sub.add_parser("targets", help="list the built-in hardware targets")

    d = sub.add_parser("demo", help="quantize the embedded ResNet-20 CIFAR-10 demo and report accuracy and speed")
    d.add_argument("--out", default="hago_demo", help="output folder (model + report)")
    d.add_argument("--target", default="x86_avx2")
    return p


def _cmd_quantize(a) -> int:
    from . import api

    out = Path(a.out)
    if out.parent and not out.parent.exists():
        raise OutputError(f"cannot write '{out}': folder '{out.parent}' does not exist; create it first")
    res = api.quantize(a.model, a.calib, a.target, progress=not a.quiet, measure_latency=not a.no_latency,
                       weight_bits=a.weight_bits, activation_bits=a.activation_bits, per_channel=not a.per_tensor,
                       clipping=a.clipping, activation_mode=a.activation_mode,
                       saturation_remedy=a.saturation_remedy, exclude=a.exclude, simulate=a.simulate,
                       threads=a.threads, max_calib_samples=a.max_calib_samples)
    res.save(out, report_dir=a.report)
    n_q = len(res.plan.quantized_layers())
    msg = f"wrote {out} ({n_q} layers quantized, {len(res.plan.fp_layers())} kept FP32)"
    if "latency" in res.report:
        msg += f"; measured speedup {res.report['latency']['speedup']:.2f}x vs FP32"
    print(msg)
    return 0


def _cmd_targets(a) -> int:
    from .hw import list_specs

    for s in list_specs():
        backend = s.get("backend")
        if isinstance(backend, dict):
            backend = backend.get("name")
        print(f"{s['name']:<18} {backend or '':<10} {s['description']}")
    return 0


def _cmd_demo(a) -> int:
    from .demo_run import run_demo

    run_demo(a.out, a.target)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"quantize": _cmd_quantize, "targets": _cmd_targets, "demo": _cmd_demo}[args.cmd](args)
    except HagoError as e:
        print(f"hago: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("hago: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # internal error: one line plus a hint, traceback only with HAGO_DEBUG
        import os
        import traceback

        if os.environ.get("HAGO_DEBUG"):
            traceback.print_exc()
        print(f"hago: internal error: {type(e).__name__}: {e} (set HAGO_DEBUG=1 for the traceback; "
              "please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
