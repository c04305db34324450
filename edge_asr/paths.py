"""Where edge-asr keeps what it builds: $EDGE_ASR_HOME, by default ~/.cache/edge-asr."""
from __future__ import annotations

import os
from pathlib import Path

# The default: tiny.en, int8, Whisper's 30 s window. The dynamic-context bundle (`build --context auto`) is
# faster and as accurate on sentences, but is not yet the default: on isolated 8 kHz digits it is 5-6 words
# of 300 behind (README, "Dynamic audio context"). The compact recipe (`build --compact`) does not yet hold
# its WER on recorded speech.
DEFAULT_BUNDLE = "tiny.en-int8"


def home() -> Path:
    return Path(os.environ.get("EDGE_ASR_HOME") or Path.home() / ".cache" / "edge-asr")


def bundle_dir(name: str = DEFAULT_BUNDLE) -> Path:
    return home() / "bundles" / name
