"""annotate(graph, spec, options) -> QuantPlan: which layers / tensors to quantize, as the target allows.

Rules:
* A weighted layer (Conv, MatMul, Gemm with a constant weight) is quantized when the spec has a scheme
  for it at the asked bits (or ``simulate=True``); otherwise it stays FP32 and the plan says why.
* Fusion patterns of the spec decide where the output is quantized: for Conv+Relu the Relu output.
* A weightless op with an integer kernel (Add, GlobalAveragePool, ...) is quantized when all its
  inputs already come out of the int8 region, so it never adds a Q/DQ round trip on its own.
* Passthrough ops (Reshape, Relu, MaxPool, Slice, ...) inside the int8 region reuse their input's
  qparams, which lets the backend run them on integers and drop the Q/DQ pair.
* Activations are static (calibrated) or dynamic (per batch at run time) per layer.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set

import onnx
from onnx import TensorProto

from ..errors import OptionError
from ..ir.fusion import find_fusion_groups
from .multipoint import layer_point_bits
from .nonuniform import layer_levels_bits
from .options import QuantOptions
from .plan import LayerPlan, QuantPlan, TensorQuant

WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")
_FLOAT = {TensorProto.FLOAT}
_IMPLICIT_ACTIVATIONS = (("Relu",), ("Clip",))


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _elem_types(model: onnx.ModelProto) -> Dict[str, int]:
    t = {}
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.type.HasField("tensor_type"):
            t[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        t[init.name] = init.data_type
    return t


def _ranks(model: onnx.ModelProto) -> Dict[str, int]:
    r = {}
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            r[vi.name] = len(vi.type.tensor_type.shape.dim)
    return r


def weight_axis(node: onnx.NodeProto, weight_shape) -> int:
    """Output-channel axis of the weight of a Conv / MatMul / Gemm."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return len(weight_shape) - 1  # MatMul [K, N]


def is_depthwise(node: onnx.NodeProto, weight_shape) -> bool:
    return node.op_type == "Conv" and int(_attr(node, "group", 1)) > 1 and weight_shape[1] == 1


def annotate(model: onnx.ModelProto, spec, options: QuantOptions, *, target_name: Optional[str] = None,
             model_digest: str = "") -> QuantPlan:
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    etypes = _elem_types(model)
    ranks = _ranks(model)
    graph_outputs = {o.name for o in graph.output}
    consumers: Dict[str, List[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)

    patterns = [tuple(p) for p in spec.fusion_patterns]
    quantizable_ops = set(spec.ops)
    for op in quantizable_ops:  # the backend folds a trailing Relu/Clip into the output requantization
        patterns += [(op,) + a for a in _IMPLICIT_ACTIVATIONS]
    groups = find_fusion_groups(model, patterns, anchors=sorted(quantizable_ops))
    fused_into: Dict[str, str] = {}
    for g in groups.values():
        for n in g.nodes[1:]:
            fused_into[n] = g.anchor

    plan = QuantPlan(target=target_name or spec.name, model_digest=model_digest, options=options.to_dict())
    acts: Dict[str, TensorQuant] = plan.activations
    dyn_reader: Dict[str, str] = {}      # dynamic activation -> the first layer that reads it (per-layer granularity)
    in_region: Set[str] = set()   # float tensors that carry int8 qparams (quantized or shared)
    a_bits = options.activation_bits
    allowed_ops = set(options.op_types) if options.op_types else None
    if allowed_ops is not None and not allowed_ops <= quantizable_ops:
        unknown = sorted(allowed_ops - quantizable_ops)
        raise OptionError(f"option op_types names {', '.join(unknown)}, which target {spec.name} has no "
                          f"quantized scheme for; quantizable op types: {', '.join(sorted(quantizable_ops))}")

    def is_float(name: str) -> bool:
        return etypes.get(name, TensorProto.FLOAT) in _FLOAT

    default_clip = options.clipping if options.clipping not in ("auto", "lapq") else "mse"

    def static_act(name: str, dtype: str, symmetric: bool, method: Optional[str] = None) -> TensorQuant:
        if name in acts and acts[name].mode == "static":  # already quantized (own or shared qparams)
            return acts[name]
        tq = TensorQuant(tensor=name, role="activation", dtype=dtype, bits=a_bits, symmetric=symmetric,
                         narrow=False, granularity="per_tensor", mode="static", method=method or default_clip)
        acts[name] = tq
        in_region.add(name)
        return tq

    def user_reason(node) -> Optional[str]:
        if node.name in options.exclude:
            return "excluded by the user (option exclude)"
        if options.layer(node.name, "quantize", True) is False:
            return "kept FP32 by a per-layer setting (option layers / search)"
        if allowed_ops is not None and node.op_type not in allowed_ops:
            return f"op type {node.op_type} not in option op_types"
        return None

    def keep_fp(node, reason, **kw):
        plan.layers[node.name] = LayerPlan(node=node.name, op_type=node.op_type, quantize=False, reason=reason, **kw)

    for node in graph.node:
        if node.name in fused_into:
            continue
        op = node.op_type
        group = groups.get(node.name)
        fused = group.nodes if group else [node.name]
        out_name = group.output if group else (node.output[0] if node.output else "")
        if op in WEIGHTED_OPS:
            w_name = node.input[1] if len(node.input) > 1 else ""
            if w_name not in inits:
                if op == "MatMul":
                    keep_fp(node, "activation x activation MatMul (no constant weight): kept FP32")
                else:
                    keep_fp(node, f"weight '{w_name}' is computed at run time, not a constant: kept FP32")
                continue
            if user_reason(node):
                keep_fp(node, user_reason(node))
                continue
            if not is_float(node.input[0]):
                keep_fp(node, "input is not float32")
                continue
            w_shape = list(inits[w_name].dims)
            if op == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                                 or _attr(node, "beta", 1.0) != 1.0):
                keep_fp(node, "Gemm with transA/alpha/beta != defaults: kept FP32")
                continue
            if op == "MatMul" and len(w_shape) != 2:
                keep_fp(node, f"MatMul weight of rank {len(w_shape)} (batched weights): kept FP32")
                continue
            w_bits = options.layer(node.name, "weight_bits", options.weight_bits)
            # weight_scheme="nonuniform": 3-4 bit levels on the 8-bit grid, so the 8-bit kernel (quant/nonuniform.py)
            nu_bits = layer_levels_bits(options, node.name)
            if nu_bits is not None:
                w_bits = 8
            # weight_scheme="multipoint": weight_bits points summed by rows of the 8-bit kernel (quant/multipoint.py)
            mp_bits = layer_point_bits(options, node.name)
            if mp_bits is not None:
                w_bits = 8
            want_dtype = options.layer(node.name, "weight_dtype")
            scheme = spec.find_scheme(op, w_bits, a_bits, weight_dtype=want_dtype)
            simulated = False
            if scheme is None:
                if not options.simulate:
                    keep_fp(node, f"target {spec.name} has no W{w_bits}A{a_bits}"
                                  f"{' ' + want_dtype if want_dtype else ''} scheme for {op}"
                                  " (pass simulate=True to fake-quantize it anyway)")
                    continue
                simulated = True
                w_dtype = want_dtype or ("int4" if w_bits <= 4 else "int8" if w_bits <= 8 else "int16")
                scheme_d = {"weight_bits": w_bits, "activation_bits": a_bits, "weight_dtype": w_dtype,
                            "activation_dtype": "uint8" if a_bits <= 8 else "uint16", "kernel": None,
                            "native": False}
            else:
                w_dtype = scheme.weight_dtype
                simulated = not scheme.native
                scheme_d = {"weight_bits": scheme.weight_bits, "activation_bits": scheme.activation_bits,
                            "weight_dtype": scheme.weight_dtype, "activation_dtype": scheme.activation_dtype,
                            "kernel": scheme.kernel, "native": scheme.native}
            gran_allowed = list(scheme.granularity) if scheme is not None else ["per_channel", "per_tensor"]
            # granularity: per_channel / per_tensor force the global default, auto and hybrid keep the per_channel
            # flag (hybrid's choices arrive as per-layer overrides, quant/hybrid.py); a per-layer setting wins
            g_default = {"per_channel": True, "per_tensor": False}.get(options.granularity, options.per_channel)
            per_channel = options.layer(node.name, "per_channel", g_default)
            if nu_bits is not None or mp_bits is not None:  # levels / point coefficients are per output channel
                per_channel = True
            gran = "per_channel" if per_channel and "per_channel" in gran_allowed else "per_tensor"
            if gran not in gran_allowed:
                gran = gran_allowed[0]
            axis = weight_axis(node, w_shape)
            w_sym = True if scheme is None else (True in scheme.weight_symmetric)
            weight = TensorQuant(tensor=w_name, role="weight", dtype=w_dtype, bits=w_bits,
                                 symmetric=w_sym, narrow=w_sym and w_dtype.startswith("int"), granularity=gran,
                                 axis=axis if gran == "per_channel" else None, mode="constant",
                                 method=options.layer(node.name, "rounding", options.rounding))
            if nu_bits is not None:
                weight.scheme, weight.levels_bits = "nonuniform", nu_bits
            if mp_bits is not None and w_dtype == "int8" and gran == "per_channel":
                weight.scheme, weight.bits = "multipoint", mp_bits
            elif mp_bits is not None:
                mp_bits = None  # the points need signed per-row coefficients: an int8 per-channel kernel
            # activation mode
            mode = options.layer(node.name, "activation_mode", options.activation_mode)
            dyn_ok = op in ("MatMul", "Gemm") and spec.supports_dynamic(op) and (
                scheme is None or "dynamic" in scheme.activation_mode)
            if mode == "auto":
                mode = "dynamic" if (dyn_ok and ranks.get(node.input[0], 2) >= 3) else "static"
            if mode == "dynamic" and (not dyn_ok or w_bits > 8):  # MatMulInteger takes 8-bit weights at most
                mode = "static"
            a_dtype = scheme_d["activation_dtype"]
            a_sym = False if scheme is None else (False not in scheme.activation_symmetric)
            lp = LayerPlan(node=node.name, op_type=op, quantize=True, reason="", fused=list(fused),
                           scheme=scheme_d, weight=weight, simulated=simulated)
            x = node.input[0]
            a_gran = options.layer(node.name, "activation_granularity", options.activation_granularity)
            if mode == "dynamic":
                if x not in acts or acts[x].mode != "dynamic":
                    acts[x] = _dynamic_act(x, a_dtype, a_bits, a_gran)
                    dyn_reader[x] = node.name
                elif acts[x].granularity != a_gran:
                    raise OptionError(f"layers '{dyn_reader[x]}' and '{node.name}' both read tensor '{x}', which is "
                                      f"quantized once, but ask for activation_granularity "
                                      f"'{acts[x].granularity}' and '{a_gran}': give every layer reading it the same "
                                      f"value (layers={{node: {{'activation_granularity': ...}}}})")
                lp.inputs = [x]
                lp.output = None
                lp.reason = (f"{op} with {scheme_d['kernel'] or 'simulated'} kernel, dynamic activations "
                             "(token activations have per-batch ranges; scales computed at run time)")
            else:
                static_act(x, a_dtype, a_sym)
                static_act(out_name, a_dtype, a_sym, options.layer(node.name, "clipping"))
                lp.inputs = [x]
                lp.output = out_name
                lp.reason = (f"{op} -> {scheme_d['kernel'] or 'fake-quant (simulated)'} W{weight.bits}A{a_bits} "
                             f"{gran} weights" + (f", fused {'+'.join(group.ops)}" if group and len(group.nodes) > 1 else ""))
                if a_gran == "per_token":
                    lp.notes.append("activation_granularity per_token: not applied, this layer's activations are "
                                    "static (calibrated, per tensor); per-token scales need dynamic activations")
            if nu_bits is not None:
                lp.reason += (f"; non-uniform W{nu_bits}: at most {2 ** nu_bits} levels of the int8 grid per output "
                              "channel (weight_scheme nonuniform)")
            if mp_bits is not None:
                lp.reason += (f"; multipoint W{mp_bits}: each channel a sum of {mp_bits}-bit points, extra points as "
                              "extra rows of the int8 kernel (weight_scheme multipoint)")
                low = spec.find_scheme(op, mp_bits, a_bits) if mp_bits < 8 else None
                if mp_bits < 8 and (low is None or not low.native):
                    lp.notes.append(f"multipoint: the {mp_bits}-bit points run on the 8-bit kernel (the target has no "
                                    f"native W{mp_bits} kernel): low-bit arithmetic simulated in an int8 container")
            if simulated:
                lp.reason += "; no integer kernel on the target: simulated"
            plan.layers[node.name] = lp
            continue

        if op in quantizable_ops and op not in WEIGHTED_OPS:
            float_inputs = [i for i in node.input if i and i not in inits and is_float(i)]
            has_const = any(i in inits for i in node.input if i)
            if user_reason(node):
                keep_fp(node, user_reason(node))
                continue
            if has_const or not float_inputs:
                keep_fp(node, f"{op} with a constant operand: kept FP32 (no benefit from an integer kernel)")
                continue
            if not all(i in in_region for i in float_inputs):
                keep_fp(node, f"{op} inputs are not all produced in the int8 region: quantizing would only "
                              "add Q/DQ round trips")
                continue
            sch = next((sc for sc in spec.schemes(op) if sc.activation_bits == a_bits), None)
            if sch is None:
                keep_fp(node, f"target {spec.name} has no A{a_bits} scheme for {op}: kept FP32")
                continue
            lp = LayerPlan(node=node.name, op_type=op, quantize=True,
                           reason=f"{op} -> {sch.kernel} on int8 inputs", fused=list(fused),
                           scheme={"activation_bits": sch.activation_bits, "activation_dtype": sch.activation_dtype,
                                   "kernel": sch.kernel, "native": sch.native},
                           inputs=float_inputs, output=out_name)
            if op in ("MaxPool",):  # order-preserving: reuse input qparams
                acts[out_name] = TensorQuant(tensor=out_name, dtype=acts[float_inputs[0]].dtype, bits=a_bits,
                                             mode="static", method="shared", shared_with=float_inputs[0])
                in_region.add(out_name)
            else:
                static_act(out_name, sch.activation_dtype, False, options.layer(node.name, "clipping"))
            plan.layers[node.name] = lp
            continue

        if op in spec.passthrough_ops and node.input and node.input[0] in in_region and node.output \
                and is_float(node.output[0]):
            out = node.output[0]
            acts[out] = TensorQuant(tensor=out, dtype=acts[node.input[0]].dtype, bits=a_bits, mode="static",
                                    method="shared", shared_with=node.input[0])
            in_region.add(out)
            continue

    _prune(plan, model, consumers, graph_outputs, options)
    plan.history.append("annotate")
    return plan


def _dynamic_act(x: str, a_dtype: str, a_bits: int, granularity: str) -> TensorQuant:
    """A dynamic activation: per_tensor as DynamicQuantizeLinear computes it (uint8 with a zero point, one scale per
    run), or per_token: one scale per row of the last axis, on the symmetric int8 grid carried as uint8 with the
    zero point 128 (quant/per_token.py)."""
    if granularity == "per_token":
        return TensorQuant(tensor=x, role="activation", dtype="uint8", bits=min(a_bits, 8), symmetric=True,
                           narrow=True, granularity="per_token", axis=-1, mode="dynamic", method="dynamic")
    return TensorQuant(tensor=x, role="activation", dtype=a_dtype, bits=a_bits, symmetric=False,
                       granularity="per_tensor", mode="dynamic", method="dynamic")


def _prune(plan: QuantPlan, model, consumers, graph_outputs, options: QuantOptions) -> None:
    """Drop quantization points that feed nothing quantized (they would only add Q/DQ round trips)."""
    q_inputs: Set[str] = set()
    for lp in plan.layers.values():
        if lp.quantize:
            q_inputs.update(lp.inputs)
    changed = True
    while changed:
        changed = False
        for name in list(plan.activations):
            tq = plan.activations[name]
            if tq.mode == "dynamic" or name in q_inputs:
                continue
            users = consumers.get(name, [])
            feeds_region = any(
                (u.output and u.output[0] in plan.activations and plan.activations[u.output[0]].shared_with == name)
                for u in users)
            if name in graph_outputs and options.quantize_outputs:
                continue
            # Outputs of quantized Conv/Add/... are needed by their QLinear kernels: keep those.
            producer_layer = next((lp for lp in plan.layers.values() if lp.quantize and lp.output == name), None)
            if producer_layer is not None and producer_layer.op_type not in ("MatMul", "Gemm"):
                continue
            if not feeds_region:
                del plan.activations[name]
                if producer_layer is not None:
                    producer_layer.output = None
                changed = True
