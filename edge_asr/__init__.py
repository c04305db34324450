"""edge-asr: offline speech recognition for edge devices (the torch-free runtime)."""

__version__ = "0.1.0"

from .errors import AudioError, BundleError, EdgeAsrError
from .recognizer import Recognizer, load
from .results import Segment, Transcript
from .transcriber import Transcriber

__all__ = [
    "AudioError",
    "BundleError",
    "EdgeAsrError",
    "Recognizer",
    "Segment",
    "Transcriber",
    "Transcript",
    "__version__",
    "load",
]
