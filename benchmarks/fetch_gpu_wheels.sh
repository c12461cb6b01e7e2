#!/usr/bin/env bash
# Download the small wheels benchmarks/gpu_check.py needs on a GPU machine that has no network into .gpu-wheels/
# (ignored by git; carry it with the tree). The GPU image has torch, triton, lightning and transformers; the check
# adds Liger-Kernel (the comparison) and installs this tree itself without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --dest .gpu-wheels "liger-kernel==0.8.5"  # the version bench_kernels.py was written against
ls -la .gpu-wheels
