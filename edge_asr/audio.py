"""Audio source for files: read, mix to mono, resample to the model's rate."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import AudioError

SAMPLE_RATE = 16000


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with soxr (high quality, fast on small CPUs)."""
    if rate == target:
        return np.ascontiguousarray(audio, dtype=np.float32)
    import soxr

    return np.ascontiguousarray(soxr.resample(audio, rate, target), dtype=np.float32)


def load_audio(path: str | Path, target: int = SAMPLE_RATE) -> np.ndarray:
    """Decode any format libsndfile knows (WAV, FLAC, OGG, MP3 …) to mono float32 at `target` Hz."""
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    return decode_audio(str(path), str(path), target)


def decode_audio(file, label: str, target: int = SAMPLE_RATE) -> np.ndarray:
    """`file` (a path or a binary file object, e.g. stdin read into BytesIO) to mono float32 at `target` Hz;
    errors name `label`."""
    import soundfile as sf

    try:
        audio, rate = sf.read(file, dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        reason = str(e).split(":", 1)[-1].strip() or "unreadable"
        raise AudioError(f"{label}: not a readable audio file ({reason})") from None
    except (RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{label}: not a readable audio file ({e})") from None
    if audio.shape[0] == 0:
        raise AudioError(f"{label}: contains no audio samples")
    mono = audio.mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioError(f"{label}: contains non-finite samples (corrupt file?)")
    return resample(mono, rate, target)
