"""The `hago` command: thin wrapper over hago_py.api. Exit codes: 0 ok, 2 bad input, 1 internal error."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .errors import HagoError, InternalError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``hago: error: ...``, exit 2) like every other hago error."""

    def error(self, message):
        message = " ".join(str(message).split())
        self.exit(2, f"hago: error: {message}; see '{self.prog} --help'\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hago", description="Hardware-aware post-training quantization of ONNX models")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize an ONNX model for a target")
    q.add_argument("model", help="FP32 .onnx model")
    q.add_argument("--target", "-t", default="x86_avx2",
                   help="built-in target name, `host` (the built-in spec matching this CPU's flags) or a spec .json")
    q.add_argument("--calib", required=True, help="calibration data: .npz (keys = input names) or folder of .npy; "
                   "'synthetic' for data-free calibration (a set synthesized from the model itself)")
    q.add_argument("--out", "-o", required=True, help="output .onnx path")
    q.add_argument("--report", help="folder for report.md / report.html / report.json / plan.json")
    q.add_argument("--weight-bits", type=int, default=8)
    q.add_argument("--activation-bits", type=int, default=8)
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default per-channel)")
    q.add_argument("--granularity", default="auto", choices=("auto", "per_channel", "per_tensor", "hybrid"),
                   help="weight granularity (auto: per-channel unless --per-tensor)")
    q.add_argument("--hybrid", action="store_true", help="per layer per-tensor or per-channel weights, by the "
                   "layer's sensitivity and the measured latency gain (same as --granularity hybrid)")
    q.add_argument("--hybrid-budget", type=float, default=None,
                   help="with --hybrid: summed sensitivity the per-tensor layers may use (default 2e-3 nats of KL)")
    q.add_argument("--weight-scheme", default="uniform", choices=("uniform", "nonuniform", "multipoint"),
                   help="nonuniform: clustered 3-4 bit levels on the INT8 grid, packed 3/4-bit + codebook; multipoint: "
                        "each channel a sum of --weight-bits points, extra points as extra kernel rows")
    q.add_argument("--nonuniform-size", type=float, default=None,
                   help="with --weight-scheme nonuniform --weight-bits 4: stored bytes of the non-uniform weights as a "
                        "fraction of their INT8 bytes; the least sensitive layers go to 3 bits until it holds")
    q.add_argument("--sparq", action="store_true", help="SPARQ activations: 8-bit inputs of weighted layers trimmed "
                   "to 4-bit windows at their leading one, pairs with a zero keep 8 bits (simulated)")
    q.add_argument("--sparq-options", type=int, default=5, choices=(2, 3, 5), help="SPARQ window placements")
    q.add_argument("--sparq-no-pairs", action="store_true", help="SPARQ without the pair rule (bSPARQ only)")
    q.add_argument("--multipoint-points", type=float, default=1.25,
                   help="with --weight-scheme multipoint: average points per channel (default 1.25)")
    q.add_argument("--complexity-budget", type=float, default=None,
                   help="with --weight-scheme multipoint: extra MACs as a fraction of the model's (replaces "
                        "--multipoint-points), e.g. 0.1")
    q.add_argument("--embedding-scheme", default="none", choices=("none", "rowwise", "codebook"),
                   help="embedding tables (Gather from a constant table): 4-bit row-wise (greedy ranges) or codebook")
    q.add_argument("--embedding-bits", type=int, default=4, choices=(4, 8), help="bits of --embedding-scheme rowwise")
    q.add_argument("--embedding-small-rows", type=int, default=1024,
                   help="tables with at most this many rows stay 8-bit row-wise (0: every table at --embedding-bits)")
    q.add_argument("--embedding-plain", action="store_true",
                   help="rowwise as in the paper only: no column-mean centring")
    q.add_argument("--embedding-hot-rows", type=int, default=None,
                   help="the N rows the calibration data reads most are restored exactly (tables indexed by an input)")
    q.add_argument("--embedding-block", type=int, default=None,
                   help="rowwise: one grid per this many values of a row (0: one per row, as in the paper; "
                        "default: the embedding_block option's default)")
    q.add_argument("--synthetic-samples", type=int, default=256, help="samples synthesized with --calib synthetic")
    q.add_argument("--synthetic-method", default="retro", choices=("retro", "zeroq", "gaussian"),
                   help="data-free generator with --calib synthetic (default retro: retro-synthesis)")
    q.add_argument("--clipping", default="auto", help="activation range method: minmax | percentile | mse | entropy | auto")
    q.add_argument("--activation-mode", default="auto", help="static | dynamic | auto")
    q.add_argument("--activation-granularity", default="per_tensor", choices=("per_tensor", "per_token"),
                   help="dynamic activations: one scale per run (per_tensor) or per token, symmetric int8 "
                        "(per_token: a token's result does not depend on its batch)")
    q.add_argument("--rounding", default="nearest",
                   help="weight rounding: nearest | adaround | adaquant | flexround | gptq | brecq (torch extra)")
    q.add_argument("--bias-correction", choices=("auto", "on", "off"), default="auto",
                   help="empirical bias correction (auto: on for adaround / flexround / gptq)")
    q.add_argument("--equalize", action="store_true", help="cross-layer equalization before calibration")
    q.add_argument("--no-smooth", action="store_true",
                   help="no SmoothQuant activation smoothing of LayerNorm-fed MatMul inputs (default on)")
    q.add_argument("--smooth-alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
    q.add_argument("--no-mask-padding", action="store_true",
                   help="dynamic activation ranges over every row, padding included (default: where padding widens "
                        "a range, its rows are zeroed before the quantizer; outputs at padding positions then differ "
                        "from FP32)")
    q.add_argument("--recon-samples", type=int, default=256,
                   help="calibration samples used by data-driven rounding (default 256)")
    q.add_argument("--saturation-remedy", default="auto", help="auto | none | reduce_range | u8u8")
    q.add_argument("--exclude", action="append", default=[], help="node name to keep FP32 (repeatable)")
    q.add_argument("--simulate", action="store_true", help="allow schemes without an integer kernel")
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--max-calib-samples", type=int, default=512)
    q.add_argument("--no-latency", action="store_true", help="skip the FP32-vs-quantized timing (with --search: "
                   "latency predicted by the spec's cost model instead of measured)")
    q.add_argument("--rpc", metavar="HOST:PORT:KEY", help="time FP32 vs quantized ON THE DEVICE over TVM RPC: a "
                   "tracker HOST:PORT and the device's KEY (HOST:PORT alone: an rpc_server without tracker); both "
                   "models are compiled here with TVM for the target's tvm_target (with --search: every trial is "
                   "timed there, accuracy is measured here)")
    q.add_argument("--rpc-cc", metavar="CC", help="with --rpc: cross compiler that links the library for a foreign "
                   "target (e.g. aarch64-linux-gnu-g++)")
    q.add_argument("--quiet", "-q", action="store_true")
    s = q.add_argument_group("hardware-aware search (per-layer configurations by measured accuracy and latency)")
    s.add_argument("--search", action="store_true", help="search per-layer bits / granularity / FP32 fallback; "
                   "the accuracy metric is a calibration-set proxy (output fidelity vs FP32)")
    s.add_argument("--accuracy-budget", type=float, help="max drop of the proxy metric vs FP32 (e.g. 0.003)")
    s.add_argument("--latency-budget", type=float, help="min speed-up vs FP32 (e.g. 1.5)")
    s.add_argument("--time-budget", type=float, help="wall-clock seconds; the best plan so far is returned")
    s.add_argument("--checkpoint", help="search state file, written after every trial "
                   "(default with --search: <out>.search.json)")
    s.add_argument("--resume", action="store_true", help="continue the search recorded in the checkpoint")
    s.add_argument("--peers", help="benchmark result JSON (benchmarks/results/<model>.json) whose recipes are "
                   "drawn on the report's Pareto plot")

    sy = sub.add_parser("synthesize", help="synthesize a data-free calibration set (.npz) from the model itself")
    sy.add_argument("model", help="FP32 .onnx model (with its BatchNormalization nodes, if it has any)")
    sy.add_argument("--out", "-o", required=True, help="output .npz (keys = input names); reuse it as --calib")
    sy.add_argument("--samples", type=int, default=256)
    sy.add_argument("--method", default="retro", choices=("retro", "zeroq", "gaussian"))
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    sy.add_argument("--quiet", "-q", action="store_true")

    b = sub.add_parser("build", help="quantize and compile with TVM for a target: library, assembly, manifest")
    b.add_argument("model", help="FP32 .onnx model (or an already quantized QDQ model with --plan)")
    b.add_argument("--target", "-t", required=True, help="built-in target name, `host` (this CPU) or a spec .json")
    b.add_argument("--calib", help="calibration data: .npz (keys = input names) or folder of .npy; 'synthetic' for "
                   "data-free calibration (not needed for a QDQ model)")
    b.add_argument("--plan", help="plan.json of an already quantized QDQ model")
    b.add_argument("--out", "-o", default="build", help="build folder; the target's files go to <out>/<target>/")
    b.add_argument("--tune-db", help="MetaSchedule database folder written by `hago tune` (default: untuned)")
    b.add_argument("--batch", type=int, help="compile for this static batch (a tuned build is static, batch 1 "
                   "unless given)")
    b.add_argument("--shape", action="append", default=[], metavar="NAME=DxDx..",
                   help="static shape of one input, e.g. input_ids=1x64 (repeatable)")
    b.add_argument("--tensorize", choices=("auto", "on", "off"), default="auto",
                   help="hand-scheduled int8 conv / matmul kernels on the target's dot-product instruction (needs "
                   "--batch): auto = where the spec declares avx512_vnni / avx_vnni / dotprod, on = also avx2 "
                   "(only kernels it computes exactly), off = TVM's default schedules")
    b.add_argument("--weight-bits", type=int, default=8)
    b.add_argument("--activation-bits", type=int, default=8)
    b.add_argument("--quiet", "-q", action="store_true")

    tu = sub.add_parser("tune", help="MetaSchedule-tune the TVM kernels of a model for a target (resumable)")
    tu.add_argument("model", help="FP32 .onnx model (with --calib) or the model_qdq.onnx of a build")
    tu.add_argument("--target", "-t", required=True, help="built-in target name, `host` or a spec .json")
    tu.add_argument("--trials", type=int, required=True, help="measured trials in this run (e.g. 64 per kernel)")
    tu.add_argument("--db", required=True, help="database folder; reused (and extended) by every run")
    tu.add_argument("--calib", help="calibration data, for an FP32 model (quantized as `hago build` would)")
    tu.add_argument("--plan", help="plan.json of a QDQ model")
    tu.add_argument("--batch", type=int, default=1, help="static batch the kernels are tuned for (default 1)")
    tu.add_argument("--shape", action="append", default=[], metavar="NAME=DxDx..",
                    help="static shape of one input, e.g. input_ids=1x64 (repeatable)")
    tu.add_argument("--quiet", "-q", action="store_true")

    be = sub.add_parser("bench", help="time models interleaved on this host (CI latency benchmarks); exit 1 on a "
                        "regression vs --baseline")
    from .bench import add_arguments as _bench_arguments

    _bench_arguments(be)

    sub.add_parser("targets", help="list the built-in hardware targets")

    d = sub.add_parser("demo", help="quantize the embedded ResNet-20 CIFAR-10 demo and report accuracy and speed")
    d.add_argument("--out", default="hago_demo", help="output folder (model + report)")
    d.add_argument("--target", default="x86_avx2")
    return p


def _cmd_quantize(a) -> int:
    from . import api

    from .errors import OptionError

    out = Path(a.out)
    # every output location and input file is checked before the work starts
    api.check_outputs(out, a.report)
    peers = None
    if a.peers:
        from .report.plot import load_peers

        peers = load_peers(a.peers)
    if a.search:
        from .ir.io import check_writable

        check_writable(a.checkpoint or out.with_suffix(".search.json"))
    search_flags = {"--accuracy-budget": a.accuracy_budget, "--latency-budget": a.latency_budget,
                    "--time-budget": a.time_budget, "--checkpoint": a.checkpoint, "--peers": a.peers,
                    "--resume": a.resume or None}
    if not a.search and any(v is not None for v in search_flags.values()):
        used = ", ".join(k for k, v in search_flags.items() if v is not None)
        raise OptionError(f"{used} only apply to a search: add --search")
    search = {}
    if a.search:
        search = dict(search=True, accuracy_budget=a.accuracy_budget, latency_budget=a.latency_budget,
                      time_budget=a.time_budget, resume=a.resume,
                      checkpoint=a.checkpoint or str(out.with_suffix(".search.json")))
    rpc = None
    if a.rpc_cc and not a.rpc:
        raise OptionError("--rpc-cc only applies with --rpc HOST:PORT:KEY")
    if a.rpc:
        import dataclasses

        from .backends.tvm.rpc import parse_rpc

        rpc = dataclasses.replace(parse_rpc(a.rpc), cc=a.rpc_cc) if a.rpc_cc else parse_rpc(a.rpc)
    res = api.quantize(a.model, a.calib, a.target, progress=not a.quiet, measure_latency=not a.no_latency, rpc=rpc,
                       weight_bits=a.weight_bits, activation_bits=a.activation_bits, per_channel=not a.per_tensor,
                       granularity="hybrid" if a.hybrid else a.granularity, weight_scheme=a.weight_scheme,
                       hybrid_budget=a.hybrid_budget, multipoint_points=a.multipoint_points,
                       complexity_budget=a.complexity_budget, nonuniform_size=a.nonuniform_size,
                       activation_scheme="sparq" if a.sparq else "uniform", sparq_options=a.sparq_options,
                       sparq_pairs=not a.sparq_no_pairs,
                       synthetic_samples=a.synthetic_samples, synthetic_method=a.synthetic_method,
                       embedding_scheme=a.embedding_scheme, embedding_bits=a.embedding_bits,
                       embedding_small_rows=a.embedding_small_rows, embedding_center=not a.embedding_plain,
                       clipping=a.clipping, activation_mode=a.activation_mode, rounding=a.rounding,
                       activation_granularity=a.activation_granularity,
                       bias_correction={"auto": None, "on": True, "off": False}[a.bias_correction],
                       equalize=a.equalize, smooth=not a.no_smooth, smooth_alpha=a.smooth_alpha,
                       mask_padding=not a.no_mask_padding,
                       recon_samples=a.recon_samples,
                       saturation_remedy=a.saturation_remedy, exclude=a.exclude, simulate=a.simulate,
                       threads=a.threads, max_calib_samples=a.max_calib_samples, **search,
                       **({} if a.embedding_block is None else {"embedding_block": a.embedding_block}),
                       **({} if a.embedding_hot_rows is None else {"embedding_hot_rows": a.embedding_hot_rows}))
    if a.search and peers is not None:
        res.report["search"]["peers"] = peers
    res.save(out, report_dir=a.report)
    n_q = len(res.plan.quantized_layers())
    msg = f"wrote {out} ({n_q} layers quantized, {len(res.plan.fp_layers())} kept FP32)"
    lat = res.report.get("latency")
    if lat:
        msg += f"; {'measured' if lat['measured'] else 'predicted'} speedup {lat['speedup']:.2f}x vs FP32"
        if lat.get("where"):
            msg += f" on {lat['where']}"
    if a.search:
        s, c = res.report["search"], res.report["search"]["counts"]
        msg += (f"; search: {s['metric']['name']} drop {res.chosen['drop']:+.4g} ({s['metric']['kind']}), "
                f"{c['trials']} trials ({c['measured_this_run']} measured, {c['replayed']} replayed) in "
                f"{s['search_s']:.0f} s, {len(res.pareto)} points on the Pareto front; state in {s['checkpoint']}")
    print(msg)
    return 0


def _cmd_synthesize(a) -> int:
    import io

    import numpy as np

    from .data.synthetic import synthesize_set
    from .ir import load_model
    from .ir.io import atomic_write_bytes, check_writable

    out = Path(a.out)
    check_writable(out)
    say = None if a.quiet else (lambda m: print(f"[hago] {m}", flush=True))
    arrays, info = synthesize_set(load_model(a.model), samples=a.samples, method=a.method, seed=a.seed,
                                  threads=a.threads, progress=say)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out, buf.getvalue())
    print(f"wrote {out} ({a.samples} samples, method {a.method}, {info['seconds']:.1f} s, "
          f"{info['torch_threads']} torch thread(s)); use it with --calib {out}")
    return 0


def _quant_kwargs(a) -> dict:
    model_is_qdq = a.calib is None and a.plan is not None
    return {} if model_is_qdq else {k: v for k, v in (("weight_bits", getattr(a, "weight_bits", 8)),
                                                      ("activation_bits", getattr(a, "activation_bits", 8)))
                                    if v != 8}


def _shapes(items) -> dict:
    """--shape NAME=1x64 (repeatable) -> {NAME: [1, 64]}."""
    from .errors import OptionError

    out = {}
    for it in items or []:
        name, _, dims = it.partition("=")
        try:
            out[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise OptionError(f"--shape '{it}' is not NAME=DxDx.. with integer dimensions (e.g. input_ids=1x64)")
        if not name or any(d <= 0 for d in out[name]):
            raise OptionError(f"--shape '{it}': give an input name and positive dimensions (e.g. input_ids=1x64)")
    return out


def _cmd_build(a) -> int:
    from .build import build

    m = build(a.model, a.target, calibration=a.calib, out=a.out, plan=a.plan, tune_db=a.tune_db,
              progress=not a.quiet, batch=a.batch, shapes=_shapes(a.shape),
              tensorize={"auto": "auto", "on": True, "off": False}[a.tensorize], **_quant_kwargs(a))
    ins = ", ".join(f"{k} {v}" for k, v in m["instructions"].items() if v) or "no int8 dot-product instructions"
    tuned = sum(1 for s in m["tuning"]["kernels"].values() if s != "untuned" and not s.startswith("hand-scheduled"))
    tz = m.get("tensorize") or {}
    n_tz = sum(r.get("status") == "tensorized" for r in tz.get("kernels", []))
    print(f"wrote {m['dir']}: {m['library']['file']} ({m['toolchain'].get('name') or 'no toolchain'}), "
          f"{tuned}/{len(m['tuning']['kernels'])} kernels tuned, {n_tz} tensorized, {ins}")
    if a.tensorize != "off" and not n_tz:
        whys = sorted({r.get("why") for r in tz.get("kernels", []) if r.get("why")})
        print(f"  tensorize: {tz.get('why') or 'no int8 kernel tensorized'}" + (f" ({'; '.join(whys)})" if whys else ""))
    for f in m["findings"]:
        print(f"  finding: {f}")
    return 0


def _cmd_tune(a) -> int:
    from .build import tune

    r = tune(a.model, a.target, trials=a.trials, db=a.db, calibration=a.calib, plan=a.plan, progress=not a.quiet,
             batch=a.batch, shapes=_shapes(a.shape))
    print(f"tuned {r['kernels']} kernels with {r['trials']} trials in {r['seconds']:.0f} s: {r['records_after']} "
          f"records in {r['database']} ({r['records_before']} before); build with --tune-db {r['database']}")
    return 0


def _cmd_targets(a) -> int:
    from .hw import list_specs

    for s in list_specs():
        backend = s.get("backend")
        if isinstance(backend, dict):
            backend = backend.get("name")
        print(f"{s['name']:<18} {backend or '':<10} {s['description']}")
    from .errors import SpecError
    from .hw.host import match_host

    try:
        print(f"host               -> {match_host()[1]}")
    except SpecError as e:
        print(f"host               -> none: {e}")
    return 0


def _cmd_bench(a) -> int:
    from .bench import cli

    return cli(a)


def _cmd_demo(a) -> int:
    from .demo_run import run_demo

    run_demo(a.out, a.target)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"quantize": _cmd_quantize, "synthesize": _cmd_synthesize, "targets": _cmd_targets,
                "demo": _cmd_demo, "build": _cmd_build, "tune": _cmd_tune,
                "bench": _cmd_bench}[args.cmd](args)
    except HagoError as e:
        import os

        if os.environ.get("HAGO_DEBUG") and e.details:
            print(e.details, file=sys.stderr)
        kind = "internal error" if isinstance(e, InternalError) else "error"
        print(f"hago: {kind}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("hago: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # internal error: one line plus a hint, traceback only with HAGO_DEBUG
        import os
        import traceback

        if os.environ.get("HAGO_DEBUG"):
            traceback.print_exc()
        text = " ".join(str(e).split())[:300]
        print(f"hago: internal error: {type(e).__name__}: {text} (set HAGO_DEBUG=1 for the traceback; "
              "please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
