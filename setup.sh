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
# pip compiles every installed module to bytecode one file at a time; compileall below does it on every
# core (a fresh setup on 2 cores: 2 min 15 s and 2 min 16 s -> 1 min 27 s and 1 min 56 s). The bytecode must
# be written here: where PYTHONDONTWRITEBYTECODE is set, every import would compile its source again.
install="$pip install --no-compile"
# torch first and pinned: the local CPU build. Left to the resolver, torch comes with GBs of CUDA.
$install "torch==2.13.0"
$install ".[dev]"
# openai-whisper is the reference the tests hold the frontend and model against. Its declared
# dependencies include triton (GPU kernels, unused here), so it is installed without them and its
# import-time needs are named explicitly.
$install numba tiktoken more-itertools
$install --no-deps "openai-whisper==20250625"
# Only what is missing or stale is compiled again. Some packages ship files that are not Python 3 (templates,
# old tests); pip skips those in silence too.
./.venv/bin/python -m compileall -q -j 0 .venv/lib/python*/site-packages >/dev/null || true
