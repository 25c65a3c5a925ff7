#!/usr/bin/env bash
# Create (or refresh) the project-local virtual environment .venv with curvops installed
# in editable mode, its test extras, and torch pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch first and pinned, so nothing below can pull a CUDA build of another version.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
