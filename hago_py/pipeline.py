"""Pipeline: the stages of quantize() as reusable pieces, so a search can build many plans from one
loaded model, one prepared graph and one calibration pass.

    pipe = Pipeline(model, calibration, "x86_avx2", QuantOptions.from_kwargs(...))
    built = pipe.build()                          # plan + QDQ model for the global options
    built = pipe.build({"conv3": {"quantize": False}, "fc": {"per_channel": False}})  # per-layer overrides

Observers are cached per (tensor, method): a plan that keeps a layer FP32 or changes a clipping method only
calibrates what it has not seen before.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import onnx

from .data import load_calibration, model_input_specs
from .errors import OptionError
from .hw import load_spec
from .ir import load_model, model_digest, prepare
from .ir.io import without_value_info
from .quant.annotate import annotate
from .quant.calibrate import collect_tensors
from .quant.options import QuantOptions
from .quant.plan import QuantPlan
from .quant.realize import realize
from .quant.remedy import choose_remedy


@dataclass
class Built:
    plan: QuantPlan
    model: onnx.ModelProto
    info: Dict[str, Any] = field(default_factory=dict)


def _progress(enabled: bool, msg: str) -> None:
    if enabled:
        print(f"[hago] {msg}", flush=True)


class Pipeline:
    #: where latency is measured: None (this machine / the cost model, as the spec allows) or api.quantize's rpc=
    #: (TVM RPC to the device; hago_py.backends.select.backend_for(self.spec, self.rpc, self.opts.threads))
    rpc = None

    def __init__(self, model, calibration, target="x86_avx2", opts: Optional[QuantOptions] = None, *,
                 progress: bool = False, base_dir=None):
        t0 = time.perf_counter()
        self.opts = opts or QuantOptions()
        self.opts.validate()
        self.progress = progress
        self.spec = load_spec(target)
        if self.spec.host_match:
            _progress(progress, f"target host: {self.spec.host_match}")
        self.load_notes: List[str] = []  # what canonicalization changed in the user's graph (for the report)
        self.proto = load_model(model, base_dir=base_dir, notes=self.load_notes)
        # the FP32 model as it is deployed and timed (no inferred value_info, like every artifact we write)
        self.reference = without_value_info(self.proto)
        self.digest = model_digest(self.proto)
        self.inputs = model_input_specs(self.proto)
        self.synthetic: Optional[Dict[str, Any]] = None  # report["synthetic"] when calibration="synthetic"
        self.hybrid_per_channel: Dict[str, bool] = {}  # granularity="hybrid": per-layer defaults (quant/hybrid.py)
        self.nonuniform_bits: Dict[str, int] = {}  # nonuniform_size: per-layer weight_bits defaults (quant/nu_mix.py)
        # weight_scheme="nonuniform" (_nonuniform_weights): input energy / mean per layer, and the levels per
        # (node, grid), kept across the remedy trials and sanity rebuilds of one run
        self._nu_importance: Dict[str, np.ndarray] = {}
        self._nu_means: Dict[str, np.ndarray] = {}
        self._nu_cache: Dict[tuple, tuple] = {}
        self._mp_cache: Dict[tuple, tuple] = {}  # weight_scheme="multipoint": greedy points per layer (multipoint.py)
        # input covariance E[x x^T] per layer and the mean of its rows (multipoint.input_covariance), shared by
        # weight_scheme="multipoint" (allocation, fitting) and "nonuniform" (level refinement)
        self._mp_cov: Dict[str, np.ndarray] = {}
        self._mp_cov_mean: Dict[str, np.ndarray] = {}
        self._emb_cache: Dict[tuple, tuple] = {}  # embedding_scheme: each table's quantization (quant/embedding.py)
        self._emb_reads: Optional[Dict[str, np.ndarray]] = None  # embedding_hot_rows: reads per row, counted once
        if isinstance(calibration, str) and calibration == "synthetic":
            calibration = self._synthesize()
        self.calib = load_calibration(calibration, self.inputs, batch_size=self.opts.calib_batch_size,
                                      max_samples=self.opts.max_calib_samples)
        if self.calib.num_samples < FEW_SAMPLES:
            note = (f"calibration used only {self.calib.num_samples} sample(s): activation ranges may not cover other "
                    f"inputs; give {FEW_SAMPLES} or more (a few hundred is typical)")
            self.calib.notes.append(note)
            _progress(progress, note)
        from .ir.io import describe_source
        from .quant.gate import check_user_model

        check_user_model(self.reference, self.calib.first_batch(), describe_source(model), self.opts.threads)
        self.prepared, self.changed = prepare(self.proto)
        if self.opts.equalize:
            self._equalize()
        self.smoothed: List[Dict[str, Any]] = []
        self._pad_widening: Dict = {}  # (mask input, tensor) -> padding widening (quant/padding.py)
        self._token_wise: Dict = {}    # (mask input, tensor) -> shaped [batch, seq, K] like the mask (padding.py)
        self._padding_free: Dict = {}  # (mask input, tensor) -> its padding rows never reach a real output row
        if self.opts.smooth:
            self._smooth()
        _progress(progress, f"prepared graph ({', '.join(self.changed) or 'no changes'})")
        self.check_batches = _first_batches(self.calib, 64)
        self._observers: Dict[tuple, object] = {}
        self._node_names = {n.name for n in self.prepared.graph.node}
        self.timings: Dict[str, float] = {"prepare": time.perf_counter() - t0}
        if self.synthetic is not None:  # its own line, not counted in prepare
            self.timings["synthesize"] = self.synthetic["seconds"]
            self.timings["prepare"] -= self.synthetic["seconds"]

    def _synthesize(self) -> Dict[str, np.ndarray]:
        """calibration="synthetic": a data-free set made from the graph as loaded (self.proto, before prepare()
        folds BatchNormalization, whose statistics retro / zeroq match). Torch threads: opts.threads when set
        above 1, else all cores."""
        import os

        from .data.synthetic import synthesize_set

        o = self.opts
        threads = o.threads if o.threads > 1 else (os.cpu_count() or 1)
        _progress(self.progress, f"synthesizing {o.synthetic_samples} calibration samples "
                                 f"(synthetic_method={o.synthetic_method!r}, {threads} torch thread(s))")
        arrays, info = synthesize_set(self.proto, samples=o.synthetic_samples, method=o.synthetic_method,
                                      seed=o.seed, threads=threads,
                                      progress=(lambda m: _progress(True, m)) if self.progress else None)
        self.synthetic = {k: info[k] for k in ("method", "samples", "seconds", "final_loss", "torch_threads")}
        self.synthetic["details"] = {k: v for k, v in info.items() if k not in self.synthetic}
        _progress(self.progress, f"synthesized {o.synthetic_samples} samples in {info['seconds']:.1f} s")
        return arrays

    def timing_feed(self) -> Dict[str, np.ndarray]:
        """One input for latency timing: batch 1, or the model's fixed batch when its inputs declare one."""
        return {k: np.ascontiguousarray(v) for k, v in self.first_batches(1, exact=True)[0].items()}

    def _equalize(self) -> None:
        from .ir.io import to_ir, to_proto
        from .ir.passes.equalize import CrossLayerEqualizationPass

        m = to_ir(self.prepared)
        res = CrossLayerEqualizationPass()(m)
        if res.modified:
            self.prepared = to_proto(m)
            self.changed = list(self.changed) + ["cross_layer_equalization"]

    def _smooth(self) -> None:
        from .ir.io import infer_model_shapes, to_ir, to_proto
        from .ir.passes.smooth import SmoothActivationsPass, smoothable
        from .quant.calibrate import channel_absmax
        from .quant.padding import token_mask_input

        m = to_ir(self.prepared)
        groups = smoothable(m)
        if not groups:
            return
        absmax = channel_absmax(self.prepared, groups, self.calib, threads=self.opts.threads,
                                mask_input=token_mask_input(self.prepared, self.opts))
        sp = SmoothActivationsPass(absmax, self.opts.smooth_alpha)
        if sp(m).modified:
            self.prepared = infer_model_shapes(to_proto(m), "the smoothed model")
            self.smoothed = sp.smoothed
            self.changed = list(self.changed) + [f"smooth_activations({len(sp.smoothed)} tensors)"]

    # -- stages ----------------------------------------------------------------------------
    def options(self, layers: Optional[Mapping[str, Mapping[str, Any]]] = None, **changes) -> QuantOptions:
        """The pipeline's options with per-layer overrides (merged over the user's) and global changes."""
        merged = {k: dict(v) for k, v in self.opts.layers.items()}
        for node, ov in (layers or {}).items():
            merged.setdefault(node, {}).update(ov)
        for node, pc in self.hybrid_per_channel.items():  # granularity="hybrid" (quant/hybrid.py)
            merged.setdefault(node, {}).setdefault("per_channel", pc)
        for node, bits in self.nonuniform_bits.items():  # nonuniform_size (quant/nu_mix.py)
            merged.setdefault(node, {}).setdefault("weight_bits", bits)
        edge = changes.get("edge_weight_bits", self.opts.edge_weight_bits)
        if edge is not None:  # the first and last weighted layers, unless a per-layer setting names them
            for node in self.edge_layers():
                merged.setdefault(node, {}).setdefault("weight_bits", edge)
        unknown = sorted(set(merged) - self._node_names)
        if unknown:
            import difflib

            hint = difflib.get_close_matches(unknown[0], self._node_names, 1)
            raise OptionError(f"option layers names node(s) {', '.join(unknown[:5])} not in the model"
                              + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + "; use node names from the report's per-layer table")
        opts = dataclasses.replace(self.opts, layers=merged, **changes)
        opts.validate()
        return opts

    def edge_layers(self) -> List[str]:
        """Names of the first and the last weighted layer (Conv / Gemm / MatMul with a constant weight)."""
        inits = {t.name for t in self.prepared.graph.initializer}
        w = [n.name for n in self.prepared.graph.node
             if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits]
        return list(dict.fromkeys(w[:1] + w[-1:]))

    def annotate(self, opts: QuantOptions, allow_empty: bool = False) -> QuantPlan:
        """The plan for ``opts``; OptionError when it quantizes nothing, unless ``allow_empty`` (a search's
        or the sanity check's per-layer overrides may keep every layer FP32; the user's options may not)."""
        self._check_bits(opts)
        plan = annotate(self.prepared, self.spec, opts, target_name=self.spec.name, model_digest=self.digest)
        if not plan.quantized_layers() and not allow_empty:
            raise OptionError(nothing_to_quantize(plan, self.spec.name, opts))
        return plan

    def _check_bits(self, opts: QuantOptions) -> None:
        """The asked bit pair must exist in the spec for at least one weighted op of the model (or simulate)."""
        if opts.simulate:
            return
        ops = sorted({n.op_type for n in self.prepared.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")})
        wb, ab = opts.weight_bits, opts.activation_bits
        if opts.weight_scheme in ("nonuniform", "multipoint"):  # on the int8 grid / kernel: the W8 scheme
            wb = 8
        if not ops or any(self.spec.find_scheme(op, wb, ab) is not None for op in ops):
            return
        pairs = sorted({f"W{s.weight_bits}A{s.activation_bits}" for op in ops for s in self.spec.schemes(op)
                        if s.weight_bits})
        raise OptionError(f"target {self.spec.name} has no W{wb}A{ab} scheme for {', '.join(ops)} "
                          f"(it offers {', '.join(pairs) or 'none'}); choose one of those or pass simulate=True "
                          "to fake-quantize (accuracy measured on ORT, labelled simulated)")

    def calibrate(self, plan: QuantPlan, opts: QuantOptions) -> QuantPlan:
        from .quant.padding import padding_free, token_mask_input, token_wise

        wanted = {n: tq.method for n, tq in plan.activations.items()
                  if tq.mode == "static" and tq.shared_with is None}
        # mask_padding: static ranges of token-wise tensors from their real rows (quant/padding.py)
        mask = token_mask_input(self.prepared, opts) if opts.mask_padding else None
        real = set(padding_free(self, token_wise(self, list(wanted), mask), mask, opts.threads)) if mask else set()

        def key(n, m):
            return n, m, n in real

        missing = {n: m for n, m in wanted.items() if key(n, m) not in self._observers}
        if missing:
            t = time.perf_counter()
            obs = collect_tensors(self.prepared, missing, self.calib, percentile=opts.percentile,
                                  threads=opts.threads, progress=self.progress, mask_input=mask, token_wise=real)
            for n, o in obs.items():
                self._observers[key(n, missing[n])] = o
            self.timings["calibrate"] = self.timings.get("calibrate", 0.0) + time.perf_counter() - t
            _progress(self.progress, f"calibrated {len(missing)} tensors on {self.calib.num_samples} samples")
        from .quant.calibrate import apply_observers

        apply_observers(plan, {n: self._observers[key(n, m)] for n, m in wanted.items()})
        return plan

    def build(self, layers: Optional[Mapping[str, Mapping[str, Any]]] = None, *, sanity: bool = True,
              **changes) -> Built:
        """annotate -> calibrate (-> LAPQ) -> saturation remedy -> rounding -> realize, for these options.

        sanity: layers whose quantized output is catastrophically worse than their input (quant/sanity.py)
        are kept FP32 and the plan rebuilt (at most SANITY_ROUNDS times); the report lists them."""
        built = self._build(layers, **changes)
        if not sanity:
            return built
        from .quant.padding import token_mask_input
        from .quant.sanity import catastrophic, layer_sqnr

        fallen: Dict[str, Dict[str, float]] = {}
        for _ in range(SANITY_ROUNDS):
            bad = catastrophic(layer_sqnr(self.prepared, built.model, built.plan,
                                          self.first_batches(SANITY_SAMPLES, exact=True), self.opts.threads,
                                          mask_input=token_mask_input(self.prepared, self.opts)))
            bad = {k: v for k, v in bad.items() if k not in (layers or {}) and k not in self.opts.layers}
            if not bad:
                break
            fallen.update(bad)
            layers = dict(layers or {}, **{k: {"quantize": False} for k in bad})
            built = self._build(layers, **changes)
        if fallen:
            for k, v in fallen.items():
                lp = built.plan.layers.get(k)
                if lp is not None:
                    lp.reason = ("kept FP32 by the numeric sanity check: quantized, its worst output channel had an "
                                 f"SQNR of {v['output_db']:.1f} dB against {v['input_db']:.1f} dB at its input")
            built.info["sanity_fallback"] = fallen
            _progress(self.progress, f"sanity check: {len(fallen)} layer(s) kept FP32 ({', '.join(fallen)})")
        return built

    def _build(self, layers: Optional[Mapping[str, Mapping[str, Any]]] = None, **changes) -> Built:
        opts = self.options(layers, **changes)
        info: Dict[str, Any] = {}
        plan = self.annotate(opts, allow_empty=bool(layers))
        self.calibrate(plan, opts)
        from .quant.padding import mark as mark_padding

        padded = mark_padding(self, plan, opts)  # dynamic ranges from real tokens only (quant/padding.py)
        if padded:
            info["padding_mask"] = padded
        info["remedy"] = choose_remedy(self.prepared, plan, self.spec, opts, self.check_batches)
        multipoint = any(lp.weight is not None and lp.weight.scheme == "multipoint" for lp in plan.quantized_layers())
        if opts.clipping == "lapq" and not multipoint:  # after the remedy: it may change weight bits / dtypes
            self._lapq(plan, opts, info)
        weights, biases, model = None, {}, self.prepared
        nu_layers = [lp for lp in plan.quantized_layers() if lp.weight is not None and lp.weight.scheme == "nonuniform"]
        from .quant.reconstruct import apply_biases, needs_reconstruction, reconstruct

        if any(lp.weight is not None and lp.weight.method == "brecq" for lp in plan.quantized_layers()):
            from .quant.brecq import BRECQ_SETTINGS, brecq

            prm = opts.solver_params("brecq")
            unknown = sorted(set(prm) - set(BRECQ_SETTINGS))
            if unknown:
                raise OptionError(f"unknown brecq setting(s) {', '.join(unknown)} in rounding_params; "
                                  f"valid: {', '.join(BRECQ_SETTINGS)}")
            t = time.perf_counter()
            weights, info["brecq"] = brecq(self.prepared, plan, self.recon_batches(opts), seed=opts.seed,
                                           threads=opts.threads, progress=self.progress,
                                           **prm)
            self.timings["brecq"] = time.perf_counter() - t
        elif needs_reconstruction(plan, dataclasses.replace(opts, bias_correction=None) if nu_layers or any(
                lp.weight is not None and lp.weight.scheme == "multipoint" for lp in plan.quantized_layers()) else opts):
            # non-uniform layers: bias_correction=True is their mean-shift correction (below), not reconstruction
            t = time.perf_counter()
            weights, biases, info["rounding"] = reconstruct(self.prepared, plan, self.recon_batches(opts), opts,
                                                            progress=self.progress)
            self.timings["rounding"] = time.perf_counter() - t
            _progress(self.progress, f"rounded {len(weights)} layers in {self.timings['rounding']:.1f} s")
            model = apply_biases(self.prepared, biases)
        if nu_layers:
            weights, nu_biases = self._nonuniform_weights(plan, weights, bias_correction=bool(opts.bias_correction))
            if nu_biases:
                model = apply_biases(model, nu_biases)
                info["nonuniform_bias_correction"] = sorted(nu_biases)
        if any(lp.weight is not None and lp.weight.scheme == "multipoint" for lp in plan.quantized_layers()):
            from .quant.multipoint import choose_points

            weights, info["multipoint"], mp_biases = choose_points(self, plan, opts, weights)
            if mp_biases:  # bias_correction=True: the mean-shift correction of the multipoint layers
                model = apply_biases(model, mp_biases)
            if opts.clipping == "lapq":  # the ranges fitted to the multipoint weights the model will have
                from .quant.multipoint import refresh_activation_points

                self._lapq(plan, opts, info, weights=weights, model=model)
                refresh_activation_points(plan)
        rinfo: Dict[str, Any] = {}
        qmodel = realize(model, plan, weights=weights, info=rinfo)
        if opts.embedding_scheme != "none":  # embedding tables: row-wise / codebook (quant/embedding.py)
            from .quant.embedding import quantize_embeddings

            t = time.perf_counter()
            qmodel, plan.embeddings = quantize_embeddings(qmodel, opts.embedding_scheme, opts.embedding_bits,
                                                          opts.embedding_codebook,
                                                          small_rows=opts.embedding_small_rows,
                                                          cache=self._emb_cache, center=opts.embedding_center,
                                                          block=opts.embedding_block,
                                                          hot_rows=opts.embedding_hot_rows,
                                                          read_counts=self._embedding_reads(qmodel, opts))
            self.timings["embeddings"] = self.timings.get("embeddings", 0.0) + time.perf_counter() - t
        if opts.activation_scheme == "sparq":  # SPARQ windows on the weighted layers' 8-bit inputs (quant/sparq.py)
            from .quant.sparq import insert_sparq

            keep8 = set() if opts.sparq_edges else set(self.edge_layers())  # the paper's first / last layer stay 8-bit
            trim = [lp.node for lp in plan.quantized_layers() if lp.weight is not None and lp.node not in keep8]
            qmodel, tensors = insert_sparq(qmodel, opts.sparq_window_bits, opts.sparq_options, opts.sparq_pairs,
                                           opts.sparq_rounding, layers=trim)
            info["sparq"] = {"window_bits": opts.sparq_window_bits, "options": opts.sparq_options,
                             "pairs": opts.sparq_pairs, "rounding": opts.sparq_rounding, "simulated": True,
                             "kept_8bit_layers": sorted(keep8),
                             "tensors": tensors}
            for t in tensors.values():
                for c in t.get("consumers", []):
                    if c in plan.layers:
                        plan.layers[c].notes.append(
                            f"SPARQ input: {opts.sparq_window_bits}-bit windows ({opts.sparq_options}opt, pairs "
                            f"{'on' if opts.sparq_pairs else 'off'}), exact integer ONNX subgraph (simulated: no "
                            "SPARQ MAC array here)")
        if rinfo.get("bias_adjusted"):
            info["bias_adjusted"] = rinfo["bias_adjusted"]
        plan.history.append("realize")
        return Built(plan=plan, model=qmodel, info=info)

    def _lapq(self, plan: QuantPlan, opts, info, weights=None, model=None) -> None:
        """clipping='lapq': the static activation ranges jointly fitted to the network loss (quant/lapq.py), with the
        integer weights the model will have where they are already chosen (multipoint)."""
        from .quant.lapq import lapq

        t = time.perf_counter()
        info["lapq"] = lapq(model if model is not None else self.prepared, plan, self.check_batches,
                            threads=opts.threads, seed=opts.seed, weights=weights)
        self.timings["lapq"] = time.perf_counter() - t

    def _nonuniform_weights(self, plan: QuantPlan, weights, bias_correction: bool = False):
        """weight_scheme="nonuniform": the integer weights of those layers, their levels weighted by the energy of
        the inputs they multiply (quant/nonuniform.py; one E[x^2], E[x] pass on the FP32 model, cached); and with
        ``bias_correction`` the mean-shift corrected biases {node: bias} of the layers that have a Conv / Gemm
        bias (labelled in the layer's notes)."""
        from .ir.fusion import _consumers
        from .quant.reconstruct import _bias_source
        from onnx import numpy_helper

        from .quant import nonuniform as nu
        from .quant.weights import quantize_weight

        inits = {i.name: i for i in self.prepared.graph.initializer}
        nodes = {n.name: n for n in self.prepared.graph.node}
        layers = {lp.node: lp for lp in plan.quantized_layers()
                  if lp.weight is not None and lp.weight.scheme == "nonuniform" and lp.node in nodes}
        todo = {n: (lp.op_type, list(inits[lp.weight.tensor].dims),
                    next((a.i for a in nodes[n].attribute if a.name == "group"), 1))
                for n, lp in layers.items() if n not in self._nu_importance}
        if todo:
            t = time.perf_counter()
            self._nu_importance.update(nu.input_importance(self.prepared, todo, self.first_batches(
                nu.IMPORTANCE_SAMPLES, exact=True), threads=self.opts.threads, means=self._nu_means))
            self.timings["nonuniform_importance"] = time.perf_counter() - t
        if nu.COV_ITERS > 0:  # the full input covariance E[x x^T] (shared with weight_scheme="multipoint")
            from .quant.multipoint import COV_SAMPLES, input_covariance

            missing = [n for n in layers if n not in self._mp_cov]
            if missing:
                t = time.perf_counter()
                self._mp_cov.update(input_covariance(self.prepared, missing, self.first_batches(
                    COV_SAMPLES, exact=True), threads=self.opts.threads, means=self._mp_cov_mean))
                self.timings["nonuniform_covariance"] = time.perf_counter() - t
        out, biases = dict(weights or {}), {}
        consumers = _consumers(self.prepared)
        for n, lp in layers.items():
            tq = lp.weight
            w = numpy_helper.to_array(inits[tq.tensor]).astype(np.float32)
            kind, b_init = _bias_source(self.prepared, nodes[n], consumers)
            correct = bias_correction and kind == "input" and n in self._nu_means and tq.axis is not None
            cov = self._mp_cov.get(n) if nu.COV_ITERS > 0 else None
            m = self._mp_cov_mean.get(n)
            if cov is not None and correct and m is not None and np.size(m) == cov.shape[0]:
                # the mean-shift correction moves the mean output error into the bias: the levels are fitted to
                # the error of the centred input, d^T (H - m m^T) d, with the mean of the covariance's own rows
                # (zero padding included) so that it stays positive semi-definite
                m = np.asarray(m, np.float64).reshape(-1)
                cov = cov - np.outer(m, m)
            key = (n, tq.dtype, tq.bits, tq.narrow, tq.symmetric, tq.granularity, tq.axis, tq.levels_bits,
                   cov is not None, bool(correct))
            if key not in self._nu_cache:
                t = time.perf_counter()
                q = quantize_weight(w, tq, importance=self._nu_importance.get(n), covariance=cov)
                self._nu_cache[key] = (q, list(tq.scale), list(tq.zero_point), dict(tq.levels))
                self.timings["nonuniform_levels"] = self.timings.get("nonuniform_levels", 0.0) + time.perf_counter() - t
            q, sc, zp, lv = self._nu_cache[key]
            out[n] = np.array(q)  # realize may adjust it (bias fit): never the cached array
            tq.scale, tq.zero_point, tq.levels = list(sc), list(zp), dict(lv)
            if correct:
                b = numpy_helper.to_array(inits[b_init]).astype(np.float64).reshape(-1)
                corr = nu.mean_shift(w, out[n], tq.scale, tq.zero_point, tq.axis, self._nu_means[n])
                if b.size in (1, corr.size):
                    biases[n] = (b + corr).astype(np.float32)
                    lp.notes.append("bias_correction: mean-shift of the non-uniform weights (sum_j (w_j - w_q,j) "
                                    f"E[x_j]) added to the bias, max |shift| {np.abs(corr).max():.3g}")
        return out, biases

    def recon_batches(self, opts: QuantOptions) -> List[Dict[str, np.ndarray]]:
        return self.first_batches(opts.recon_samples, exact=True)

    def first_batches(self, n_samples: int, exact: bool = False) -> List[Dict[str, np.ndarray]]:
        """The first calibration batches holding ``n_samples`` samples (``exact``: the last one cut to fit). A
        model with a fixed batch only runs whole batches: then whole batches, at least one."""
        from .data import static_batch_size

        return _first_batches(self.calib, n_samples, exact=exact and static_batch_size(self.inputs) is None)

    def _embedding_reads(self, qmodel, opts) -> Dict[str, np.ndarray]:
        """{Gather node: reads per table row over the calibration data} for embedding tables indexed by a model
        input (embedding_hot_rows); computed tables' indices (e.g. sliced position ids) are not counted. Counted on
        the first call only: every plan of a search rebuilds the same tables from the same calibration data."""
        if opts.embedding_hot_rows <= 0:
            return {}
        if self._emb_reads is not None:
            return self._emb_reads
        from .quant.embedding import count_reads, embedding_tables

        names = {spec.name for spec in self.inputs}
        tables = [e for e in embedding_tables(qmodel) if not e["skip"] and e["indices"] in names]
        self._emb_reads = count_reads(tables, self.calib)
        return self._emb_reads


SANITY_ROUNDS = 3
SANITY_SAMPLES = 8  # samples the numeric sanity check judges: per-channel energies, bounded memory
FEW_SAMPLES = 16  # fewer calibration samples than this are reported as a risk to accuracy


def nothing_to_quantize(plan: QuantPlan, target: str, opts: QuantOptions) -> str:
    """The message when no layer can be quantized: each candidate layer's own reason (grouped)."""
    reasons: Dict[str, List[str]] = {}
    for lp in plan.fp_layers():
        reasons.setdefault(lp.reason, []).append(lp.node)
    if not reasons:
        return (f"nothing to quantize: the model has no layer that target {target} quantizes (no Conv, Gemm or "
                "MatMul with a constant weight, nor an op the spec lists); the model is left as it is")
    parts = [f"{', '.join(nodes[:3])}{f' and {len(nodes) - 3} more' if len(nodes) > 3 else ''}: {r}"
             for r, nodes in sorted(reasons.items(), key=lambda kv: -len(kv[1]))]
    return (f"nothing to quantize for target {target} at W{opts.weight_bits}A{opts.activation_bits}: "
            + "; ".join(parts[:4]) + ("; ..." if len(parts) > 4 else "")
            + ". Change the options named there (exclude / op_types / layers / bits, or simulate=True), or the "
              "target (hago targets)")


def _first_batches(calib, n_samples: int, exact: bool = False) -> List[Dict[str, np.ndarray]]:
    out, seen = [], 0
    for b in calib:
        k = len(next(iter(b.values())))
        if exact and seen + k > n_samples:
            b = {n: v[: n_samples - seen] for n, v in b.items()}
            k = n_samples - seen
        out.append(b)
        seen += k
        if seen >= n_samples:
            break
    return out
