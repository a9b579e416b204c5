#!/usr/bin/env bash
# Installs ktcli and its test tools. A torch that is already installed (CPU or CUDA build) is kept;
# without one, torch 2.13.0 is installed (on the project's machines that is a CPU build on disk).
set -euo pipefail
cd "$(dirname "$0")"
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[serve,test]"
