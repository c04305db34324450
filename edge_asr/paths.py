"""Where edge-asr keeps what it builds: $EDGE_ASR_HOME, by default ~/.cache/edge-asr."""
from __future__ import annotations

import os
from pathlib import Path

# The default: tiny.en adapted to the audio's own length (`build --context auto`), int8. The name carries the
# hash of the shipped delta (build/deltas/) and the policy, so a bundle of another recipe, or the 30 s
# `tiny.en-int8`, is never taken for it. The compact recipe (`build --compact`) does not yet hold its WER on
# recorded speech.
DEFAULT_BUNDLE = "tiny.en-auto-22bb97e4-int8"


def home() -> Path:
    return Path(os.environ.get("EDGE_ASR_HOME") or Path.home() / ".cache" / "edge-asr")


def bundle_dir(name: str = DEFAULT_BUNDLE) -> Path:
    return home() / "bundles" / name
