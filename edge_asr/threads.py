"""How many CPU threads inference and the build step use: what the caller asks (`--threads`), else
$EDGE_ASR_THREADS, else 2.

The variable sets every thread count at once, in this process and in the commands it starts: ONNX Runtime's
and LiteRT's sessions and torch's kernels. The test suite runs under it at 1 and 2 threads (README), since
a float result differs in its last bits from one thread count to another."""

from __future__ import annotations

import os

from .errors import EdgeAsrError

VARIABLE = "EDGE_ASR_THREADS"
DEFAULT = 2


def resolve_threads(requested: int | None = None) -> int:
    """`requested`, or the environment's default; at least 1."""
    if requested is None:
        text = os.environ.get(VARIABLE, "").strip()
        try:
            requested = int(text) if text else DEFAULT
        except ValueError:
            raise EdgeAsrError(f"${VARIABLE} must be a whole number of threads, not {text!r}") from None
    if requested < 1:
        raise EdgeAsrError(f"threads must be at least 1 (got {requested})")
    return requested
