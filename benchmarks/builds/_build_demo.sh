#!/usr/bin/env bash
# Shared by build_<target>.sh: quantize the embedded ResNet-20 CIFAR-10 demo and build it with TVM for $1
# into ${OUT:-build}/<target>/ (library, assembly, plan, report, manifest). PYTHON overrides the interpreter.
set -euo pipefail
target="$1"; shift
PY="${PYTHON:-python}"
OUT="${OUT:-build}"
mkdir -p "$OUT"
calib="$OUT/demo_calib.npz"
# the demo .npz holds raw uint8 images; --calib wants {input name: preprocessed float32}
"$PY" -c "import numpy as np, sys; from hago_py.demo import load_demo; np.savez(sys.argv[1], **load_demo()['calib'])" "$calib"
model="$("$PY" -c "from hago_py.demo import DEMO_MODEL; print(DEMO_MODEL)")"
exec "$PY" -m hago_py.cli build "$model" --target "$target" --calib "$calib" --out "$OUT" "$@"
