#!/usr/bin/env bash
# Create .venv (if missing) and install the package with its test dependencies.
# torch is pinned to the CPU wheel these machines carry; on your own machine any torch>=2.4 works.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==${DREAMBOOTH_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[test]"
