#!/usr/bin/env bash
# Sets up .venv with the runtime, the build step and the test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
# Mosquitto (Debian's), the real broker the MQTT tests start on a loopback port. openssl makes their certificates.
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    sudo="env DEBIAN_FRONTEND=noninteractive"; [ "$(id -u)" -eq 0 ] || sudo="sudo -n $sudo"
    echo "setup.sh: installing mosquitto with apt-get" >&2
    if ! { $sudo apt-get install -y -q mosquitto openssl >/dev/null \
           || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q mosquitto openssl >/dev/null; }; }; then
        echo "setup.sh: could not install mosquitto (needs apt-get as root); the MQTT tests will fail without it" >&2
    fi
fi
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
