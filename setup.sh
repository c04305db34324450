#!/usr/bin/env bash
# Sets up .venv with the runtime, the build step and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip="./.venv/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: the local CPU build. Left to the resolver, torch comes with GBs of CUDA.
$pip install "torch==2.13.0"
$pip install ".[dev]"
# openai-whisper is the reference the tests hold the frontend and model against. Its declared
# dependencies include triton (GPU kernels, unused here), so it is installed without them and its
# import-time needs are named explicitly.
$pip install numba tiktoken more-itertools
$pip install --no-deps "openai-whisper==20250625"
