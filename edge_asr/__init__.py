"""edge-asr: offline speech recognition for edge devices (the torch-free runtime)."""

__version__ = "0.1.0"

from .errors import AudioError, BundleError, EdgeAsrError  # noqa: E402
from .results import Segment, Transcript  # noqa: E402
from .transcriber import Transcriber  # noqa: E402

__all__ = ["AudioError", "BundleError", "EdgeAsrError", "Segment", "Transcriber", "Transcript", "__version__"]
