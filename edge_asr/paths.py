"""Where edge-asr keeps what it builds: $EDGE_ASR_HOME, by default ~/.cache/edge-asr."""

from __future__ import annotations

import os
from pathlib import Path

# The default: tiny.en adapted to each window's own length (what `edge-asr build` makes with no flags: the
# shipped dynamic-context delta, the auto context policy, beam search on short windows), int8. As fast on
# sentences as 0.4x the 30 s model and as accurate, and ahead of it on isolated digits (README, "Dynamic
# audio context"). Its name carries a hash of the delta and the policy
# (`edge_asr_build.commands.whisper.default_bundle_name`, which a test keeps equal to this), so a cached 30 s bundle is
# never taken for it.
DEFAULT_BUNDLE = "tiny.en-auto-22bb97e4-int8"
# Whisper's fixed 30 s window (`edge-asr build --context full`), the default before the adapted model.
FULL_CONTEXT_BUNDLE = "tiny.en-int8"


def home() -> Path:
    return Path(os.environ.get("EDGE_ASR_HOME") or Path.home() / ".cache" / "edge-asr")


def bundle_dir(name: str = DEFAULT_BUNDLE) -> Path:
    return home() / "bundles" / name
