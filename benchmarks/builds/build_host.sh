#!/usr/bin/env bash
# CI: quantize the embedded demo (ResNet-20 CIFAR-10) and build it with TVM for host into ${OUT:-build}/host/.
exec "$(dirname "$0")/_build_demo.sh" host "$@"
