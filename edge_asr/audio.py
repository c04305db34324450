"""Audio source for files: read, mix to mono, resample to the model's rate.

Float files may hold any number; a model trained on [-1, 1] turns samples far outside it into text
(all samples at 1e30 read as "I"). So samples that are not finite refuse the file, and samples outside
[-1, 1] are clipped, with one warning (an `AudioWarning`) when they go far outside: a float file scaled
as 16-bit, or a gain gone wrong. A constant or clipped signal then carries no speech, and the guards give
no text for it.

Corrupt files also make the C decoders talk: libsndfile's SDS reader printf()s "Error A : 00" to stdout,
mpg123 writes its resync notes to stderr, and a file object that libsndfile seeks before its start raised
inside a C callback, which Python prints as a traceback. A whole-file read keeps all of that off the
console, which is for transcripts and one-line errors.
"""

from __future__ import annotations

import ctypes
import io
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import AudioError
from .frontend import SAMPLE_RATE

FAR_OUTSIDE = 2.0  # a peak past this is reported when clipped (6 dB over full scale)
READ_FRAMES = 1 << 16  # frames per read of a whole file


class AudioWarning(UserWarning):
    """Audio that was read, but changed to be read: samples clipped into [-1, 1]."""


def mono_in_range(audio: np.ndarray, label: str, warn: bool = True) -> tuple[np.ndarray, bool]:
    """(frames, channels) float samples -> (mono float32 in [-1, 1], whether they went far outside); an
    AudioError if any is not finite. `warn`: warn if they went far (a stream warns once, not every block)."""
    if not np.isfinite(audio).all():
        raise AudioError(f"{label}: contains non-finite samples (corrupt file?)")
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak > 1.0:
        if peak > FAR_OUTSIDE and warn:
            warnings.warn(
                AudioWarning(f"{label}: samples reach {peak:.3g}, far outside [-1, 1]; clipped"), stacklevel=2
            )
        audio = np.clip(audio, -1.0, 1.0)
    return audio.mean(axis=1, dtype=np.float32), peak > FAR_OUTSIDE


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
    if not isinstance(file, str):
        file = _ClampedSeeks(file.read())
    # Warnings are held while the console is discarded and given out after it is back.
    with warnings.catch_warnings(record=True) as held, native_output_discarded(), open_sound(file, label) as f:
        warnings.simplefilter("always", AudioWarning)
        rate = f.samplerate
        try:
            blocks = list(mono_blocks(f, label, READ_FRAMES))
            audio = np.concatenate(blocks) if blocks else None
        except MemoryError:
            raise AudioError(f"{label}: too long to read at once (stream it: `edge-asr listen --file`)") from None
    for warning in held:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if audio is None:
        raise AudioError(f"{label}: contains no audio samples")
    # in [-1, 1] after resampling too: a band-limited copy of a clipped signal overshoots (1.57 on a fuzzed file);
    # in place, as a long file's samples are the largest array a transcription holds
    audio = resample(audio, rate, target)
    return np.clip(audio, -1.0, 1.0, out=audio)


class _ClampedSeeks(io.BytesIO):
    """Bytes for libsndfile to read, where a seek before the start goes to the start instead of raising in a
    C callback (the position libsndfile is told then, 0, is the one it was told before)."""

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return super().seek(offset, whence)
        except ValueError:
            return super().seek(0)


@contextmanager
def native_output_discarded():
    """What C libraries write to file descriptors 1 and 2 meanwhile goes nowhere. Process-wide, so only for
    whole-file reads, while nothing else prints (not for streams: the daemon prints transcripts meanwhile)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        _flush_c_stdio()  # C's stdout is buffered: flushed now, what it holds goes to /dev/null too
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to ask (not seen on Linux, macOS or Android)
        pass


def open_sound(file, label: str):
    """A libsndfile reader of `file`, or an AudioError naming `label`."""
    import soundfile as sf

    try:
        return sf.SoundFile(file)
    except sf.LibsndfileError as e:
        reason = str(e).split(":", 1)[-1].strip() or "unreadable"
        raise AudioError(f"{label}: not a readable audio file ({reason})") from None
    except (RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"{label}: not a readable audio file ({e})") from None


def mono_blocks(f, label: str, frames: int) -> Iterator[np.ndarray]:
    """Mono float32 blocks of `frames` samples from an open reader, until its data ends. The header's frame
    count sizes nothing: a fuzzed WAV that claimed 68 billion frames once asked for 256 GiB at once."""
    import soundfile as sf

    clipped = False
    while True:
        try:
            block = f.read(frames, dtype="float32", always_2d=True)
        except sf.LibsndfileError as e:
            raise AudioError(f"{label}: not a readable audio file ({e})") from None
        if not len(block):
            return
        mono, far = mono_in_range(block, label, warn=not clipped)
        clipped = clipped or far
        yield mono


class AudioFile:
    """A file read in blocks, for streams: its memory stays one block, however long it is. The same
    formats and checks as `load_audio`; resampled by soxr's streaming resampler."""

    def __init__(self, path: str | Path, target: int = SAMPLE_RATE):
        path = Path(path)
        if not path.exists():
            raise AudioError(f"{path}: no such file")
        if path.is_dir():
            raise AudioError(f"{path}: is a directory, not an audio file")
        self.label, self.target = str(path), target
        self._file = open_sound(str(path), self.label)
        if self._file.frames == 0:
            raise AudioError(f"{path}: contains no audio samples")
        self.rate = self._file.samplerate
        self.duration_s = self._file.frames / self.rate

    def blocks(self, seconds: float) -> Iterator[np.ndarray]:
        """Mono float32 blocks at the target rate, about `seconds` long each."""
        stream = None
        if self.rate != self.target:
            import soxr

            stream = soxr.ResampleStream(self.rate, self.target, 1, dtype="float32")
        with self._file as f:
            f.seek(0)
            for mono in mono_blocks(f, self.label, max(1, int(seconds * self.rate))):
                yield mono if stream is None else np.clip(stream.resample_chunk(mono), -1.0, 1.0)
            if stream is not None:
                yield stream.resample_chunk(np.zeros(0, np.float32), last=True)
