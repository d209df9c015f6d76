#!/usr/bin/env bash
# CI: quantize the embedded demo (ResNet-20 CIFAR-10) and build it with TVM for arm_cortex_a72 into ${OUT:-build}/arm_cortex_a72/.
exec "$(dirname "$0")/_build_demo.sh" arm_cortex_a72 "$@"
