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
"$venv/bin/python" -m pip install -q -e ".[server,distributed,onnx,openvino,watch,dev,browser]"
# The inspection page's browser tests drive Debian's chromium through Playwright (`playwright install`
# downloads its own browser builds, which an offline or locked-down machine cannot fetch).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "warning: chromium is not installed; tests/test_station_browser.py needs it (apt-get install chromium)" >&2
    fi
fi
echo "patchknn installed in $venv"
