"""Audio source for files: read, mix to mono, resample to the model's rate."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import AudioError
from .frontend import SAMPLE_RATE


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


class AudioFile:
    """A file read in blocks, for streams: its memory stays one block, however long it is. The same
    formats and checks as `load_audio`; resampled by soxr's streaming resampler."""

    def __init__(self, path: str | Path, target: int = SAMPLE_RATE):
        import soundfile as sf

        path = Path(path)
        if not path.exists():
            raise AudioError(f"{path}: no such file")
        if path.is_dir():
            raise AudioError(f"{path}: is a directory, not an audio file")
        self.label, self.target = str(path), target
        try:
            self._file = sf.SoundFile(str(path))
        except sf.LibsndfileError as e:
            reason = str(e).split(":", 1)[-1].strip() or "unreadable"
            raise AudioError(f"{path}: not a readable audio file ({reason})") from None
        except (RuntimeError, TypeError, ValueError) as e:
            raise AudioError(f"{path}: not a readable audio file ({e})") from None
        if self._file.frames == 0:
            raise AudioError(f"{path}: contains no audio samples")
        self.rate = self._file.samplerate
        self.duration_s = self._file.frames / self.rate

    def blocks(self, seconds: float) -> Iterator[np.ndarray]:
        """Mono float32 blocks at the target rate, about `seconds` long each."""
        import soundfile as sf

        stream = None
        if self.rate != self.target:
            import soxr

            stream = soxr.ResampleStream(self.rate, self.target, 1, dtype="float32")
        frames = max(1, int(seconds * self.rate))
        try:
            with self._file as f:
                f.seek(0)
                for block in f.blocks(blocksize=frames, dtype="float32", always_2d=True):
                    mono = block.mean(axis=1)
                    if not np.isfinite(mono).all():
                        raise AudioError(f"{self.label}: contains non-finite samples (corrupt file?)")
                    yield mono if stream is None else stream.resample_chunk(mono)
                if stream is not None:
                    yield stream.resample_chunk(np.zeros(0, np.float32), last=True)
        except sf.LibsndfileError as e:
            raise AudioError(f"{self.label}: not a readable audio file ({e})") from None
