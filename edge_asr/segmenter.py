"""Cut long audio into windows of at most 30 s at its quietest moments.

Whisper sees 30 s at a time. Cutting blindly every 30 s splits words, and the decoder, starting a window
mid-word, often gives up on the whole window; cutting where the signal is quietest keeps words whole.
"""

from __future__ import annotations

import numpy as np

FRAME = 160  # 10 ms at 16 kHz


def frame_energy_db(audio: np.ndarray, smooth_frames: int = 20) -> np.ndarray:
    """Energy per 10 ms frame in dB, smoothed over `smooth_frames` so a cut lands in a pause, not a gap
    between two phonemes."""
    n = len(audio) // FRAME
    power = (audio[: n * FRAME].reshape(n, FRAME).astype(np.float64) ** 2).mean(axis=1)
    if smooth_frames > 1 and n >= smooth_frames:
        power = np.convolve(power, np.ones(smooth_frames) / smooth_frames, mode="same")
    return 10 * np.log10(power + 1e-10)


def split_at_pauses(audio: np.ndarray, max_samples: int, min_samples: int | None = None) -> list[tuple[int, int]]:
    """(start, end) sample ranges covering `audio`, each at most `max_samples` long.

    Every cut is at the quietest frame between `min_samples` (default: half the maximum) and
    `max_samples` after the previous cut; among equally quiet frames the latest wins.
    """
    if len(audio) <= max_samples:
        return [(0, len(audio))]
    min_samples = min_samples or max_samples // 2
    energy = frame_energy_db(audio)
    bounds, start = [], 0
    while len(audio) - start > max_samples:
        lo, hi = (start + min_samples) // FRAME, (start + max_samples) // FRAME
        window = energy[lo:hi]
        quietest = np.flatnonzero(window <= window.min() + 1.0)[-1]  # within 1 dB of the minimum
        cut = (lo + quietest) * FRAME
        bounds.append((start, cut))
        start = cut
    bounds.append((start, len(audio)))
    return bounds
