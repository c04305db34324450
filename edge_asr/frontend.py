"""Log-mel features exactly as Whisper computes them, in numpy.

The mel filterbank comes from the bundle (`mel_filters.npy`), so neither librosa nor torch is needed.
"""

from __future__ import annotations

import numpy as np

N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
SAMPLE_RATE = 16000  # every model's input rate: audio sources resample to it
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in one 30 s window

# torch.hann_window(N_FFT) is periodic: the symmetric window of N_FFT + 1 points without its last point.
_HANN = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


# Frames are transformed this many at a time: a 30 s window's spectrum at once held about 25 MB of
# temporaries (windowed frames, complex spectrum, power), more than the rest of a window's working memory.
BLOCK_FRAMES = 256


def in_range(audio: np.ndarray) -> np.ndarray:
    """`audio` with every sample a number in [-1, 1]: what the model was trained on, and what keeps its
    features finite. Sources clip already (`audio.mono_in_range`, with a warning); this guards arrays given
    through the Python API, and costs two passes only when a sample is out of range."""
    if audio.size and (not audio.max() <= 1.0 or not audio.min() >= -1.0):  # NaN fails both comparisons
        audio = np.clip(np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    return audio


def power_spectrogram(frames: np.ndarray) -> np.ndarray:
    """|FFT|² of (T, N_FFT) frames after the Hann window: (201, T) float32."""
    spectrum = np.fft.rfft(frames * _HANN, axis=-1)
    return (spectrum.real**2 + spectrum.imag**2).T.astype(np.float32)


def log_mel_spectrogram(audio: np.ndarray, mel_filters: np.ndarray, padding: int = 0) -> np.ndarray:
    """Whisper's normalized log-mel spectrogram (n_mels, T) of 16 kHz mono float32 audio: torch.stft's
    defaults (center=True, reflect padding, last frame dropped), mel power, log10, clamped to 8 below the
    maximum.

    `padding` zero samples are appended first, as Whisper does with 30 s so that the last window is full.
    """
    audio = np.pad(audio.astype(np.float32, copy=False), (0, padding)) if padding else audio
    padded = np.pad(audio.astype(np.float32, copy=False), N_FFT // 2, mode="reflect")
    n_frames = (len(padded) - N_FFT) // HOP_LENGTH
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, N_FFT), strides=(padded.strides[0] * HOP_LENGTH, padded.strides[0])
    )
    mel = np.empty((mel_filters.shape[0], n_frames), dtype=np.float32)
    for start in range(0, n_frames, BLOCK_FRAMES):
        mel[:, start : start + BLOCK_FRAMES] = mel_filters @ power_spectrogram(frames[start : start + BLOCK_FRAMES])
    log_spec = np.log10(np.maximum(mel, 1e-10, out=mel), out=mel)
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0, out=log_spec)
    return (log_spec + 4.0) / 4.0


def window_features(audio: np.ndarray, mel_filters: np.ndarray, frames: int = N_FRAMES) -> np.ndarray:
    """Encoder input for one window of audio: log-mel of its frames, zero-padded to `frames` (3000 for
    Whisper's 30 s; fewer for a model adapted to shorter context, see `context.ContextPolicy`).

    A few zeros past the end make the last frames see silence, as Whisper's 30 s zero padding does; the
    frames beyond the audio are then zeros in the log-mel domain, as in openai-whisper's transcribe.
    """
    n_frames = len(audio) // HOP_LENGTH
    return pad_or_trim(log_mel_spectrogram(in_range(audio), mel_filters, padding=N_FFT)[:, :n_frames], frames)


def pad_or_trim(mel: np.ndarray, length: int = N_FRAMES) -> np.ndarray:
    """Cut or zero-pad the time axis to `length` frames (the encoder's fixed window)."""
    if mel.shape[-1] >= length:
        return mel[..., :length]
    return np.pad(mel, [(0, 0)] * (mel.ndim - 1) + [(0, length - mel.shape[-1])])


# --- streaming features, for frame-synchronous models (LSTM-CTC) ------------------------------------------------
# Whisper's features need the whole window (centered frames, a clamp relative to the window's maximum). A
# streaming model needs each frame to depend only on the samples it covers: frame t is samples
# [160 t, 160 t + 400), uncentered, and the log has a fixed floor. Chunked and whole audio then give the
# same frames exactly.


def frame_log_mel(audio: np.ndarray, mel_filters: np.ndarray) -> np.ndarray:
    """log10 mel power (T, n_mels) of every full 25 ms frame of 16 kHz audio, 10 ms apart."""
    if len(audio) < N_FFT:
        return np.zeros((0, mel_filters.shape[0]), dtype=np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(audio.astype(np.float32, copy=False), N_FFT)[::HOP_LENGTH]
    spectrum = np.fft.rfft(frames * _HANN, axis=-1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return np.log10(np.maximum(power @ mel_filters.T, 1e-10)).astype(np.float32)


class LogMelStream:
    """Feed audio in blocks of any size; get the frames that became complete."""

    def __init__(self, mel_filters: np.ndarray):
        self.mel_filters = mel_filters
        self.pending = np.zeros(0, dtype=np.float32)

    def accept(self, samples: np.ndarray) -> np.ndarray:
        audio = np.concatenate([self.pending, in_range(samples.astype(np.float32, copy=False))])
        n = 0 if len(audio) < N_FFT else 1 + (len(audio) - N_FFT) // HOP_LENGTH
        self.pending = audio[n * HOP_LENGTH :]
        return frame_log_mel(audio[: (n - 1) * HOP_LENGTH + N_FFT] if n else audio[:0], self.mel_filters)
