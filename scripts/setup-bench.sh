#!/usr/bin/env bash
# Add the peer library the benchmarks compare against (curvlinops 3.0.1) to .venv.
# Its dependency backpack-for-pytorch asks for torchvision, whose PyPI wheel does not load
# beside the pinned CPU torch and then breaks transformers' model imports; curvlinops runs
# without it, so its dependencies are installed by name, without torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps \
    curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 einops==0.8.2 \
    einconv==0.1.0 linear_operator==0.6.1 opt_einsum==3.4.0
.venv/bin/python -c "import curvlinops, transformers.models.gpt2"  # both import side by side
