#!/usr/bin/env bash
# CI: quantize the embedded demo (ResNet-20 CIFAR-10) and build it with TVM for x86_avx2 into ${OUT:-build}/x86_avx2/.
exec "$(dirname "$0")/_build_demo.sh" x86_avx2 "$@"
