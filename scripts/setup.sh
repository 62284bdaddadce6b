#!/usr/bin/env bash
# Create .venv and install lowcomm into it.
#
#   bash scripts/setup.sh        # the package
#   bash scripts/setup.sh dev    # the package plus the test tools (pytest, hypothesis)
#
# A torch already in .venv is kept. Otherwise torch 2.13.0 is installed first,
# so that pip does not resolve lowcomm's `torch>=2.3` to a multi-GB CUDA build
# (on machines whose pip carries the CPU wheel, as CI's does). To use another
# build, install it into .venv before running this script.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch 2.13.0 (CPU build)"
    "${pip[@]}" "torch==2.13.0"
fi
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
echo "setup: installing lowcomm${extra} into .venv"
"${pip[@]}" -e ".${extra}"
