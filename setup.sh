#!/usr/bin/env bash
# One-command setup from a fresh clone: ./setup.sh  (then: . .venv/bin/activate)
# Creates the virtual environment .venv (or the folder given as $1), installs
# pip/setuptools new enough to build the extension, the pinned CPU torch, and
# fastcount itself (editable, with its compiled ops and the test tools).
set -euo pipefail
cd "$(dirname "$0")"
venv="${1:-.venv}"

python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install --upgrade pip "setuptools>=70.1" wheel   # a fresh venv's setuptools is too old to build the extension
pip install torch==2.13.0                                       # torch first: the CPU wheel, no multi-GB CUDA download
pip install --no-build-isolation -e ".[dev]"                    # fastcount + its compiled ops + test tools
python -c "import fastcount, fastcount.ops as o; print('fastcount', fastcount.__version__, 'installed; compiled ops:', o.has_compiled_ops())"
