#!/usr/bin/env bash
# CI: quantize the embedded demo (ResNet-20 CIFAR-10) and build it with TVM for cuda_t4 into ${OUT:-build}/cuda_t4/.
exec "$(dirname "$0")/_build_demo.sh" cuda_t4 "$@"
