#!/usr/bin/env bash
# Create a virtual environment with patchknn and everything its tests need.
# Usage: bash scripts/setup.sh [VENV_DIR]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# PyTorch first, pinned to the builds this project is tested with.
"$venv/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$venv/bin/python" -m pip install -q -e ".[server,distributed,onnx,openvino,watch,dev]"
echo "patchknn installed in $venv"
