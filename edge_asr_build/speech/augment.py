"""Augmentation: what separates a synthetic voice in a quiet file from a person at a microphone or a phone.

One chain, in this order, each step drawn at random: speed (tempo and pitch together, as a tape played
faster or slower), a room (simulated reverberation), the telephone band (8 kHz), leading and trailing
silence, noise at a random SNR (white, pink, brown, or babble from other clips) and a random level. A
preset says how often and how much; every build-step data set uses one of them:

  MATCHING  reference matching's training mix (`training_audio`) and calibration (`compression`)
  ISOLATED  isolated words as people record them: tightly cut, more of them in the telephone band
  CTC       LSTM-CTC training (`lstm.ctc_train`): every clip sped up or down, half of them telephone
            band, more noise, and a quick decaying-noise room instead of the simulated one

The presets' numbers are those each set was built and measured with; MATCHING's draws are the recipes'
(their deltas reproduce from a seed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from edge_asr.audio import SAMPLE_RATE, resample

NOISE_COLORS = ["white", "pink", "brown"]


@dataclass(frozen=True)
class Augmentation:
    speed_share: float = 0.5  # clips resampled in speed …
    speed: tuple[float, float] = (0.85, 1.15)  # … by a factor in this range
    room_share: float = 0.3
    room: str = "simulated"  # "simulated": a shoebox room (pyroomacoustics); "decay": a decaying noise tail
    band_share: float = 0.15  # clips passed through the 8 kHz telephone band
    pad_s: tuple[float, float] = (0.0, 0.8)  # leading and trailing silence, each
    noise_share: float = 0.6
    snr_db: tuple[float, float] = (5.0, 30.0)
    babble_share: float = 0.25  # of the noisy clips, those mixed with other speech (where some is given)
    level_db: tuple[float, float] = (-20.0, 3.0)  # around -26 dBFS RMS


MATCHING = Augmentation()
ISOLATED = replace(MATCHING, pad_s=(0.0, 0.2), band_share=0.35)
CTC = Augmentation(
    speed_share=1.0, room="decay", band_share=0.5, pad_s=(0.05, 0.5), noise_share=0.8, snr_db=(5.0, 40.0)
)


def augment(
    audio: np.ndarray,
    rng: np.random.Generator,
    preset: Augmentation = MATCHING,
    babble: list[np.ndarray] | None = None,
) -> np.ndarray:
    """One random chain of `preset`'s augmentations of 16 kHz `audio`; `babble` clips to draw speech noise from."""
    from scipy.signal import fftconvolve

    x = audio.astype(np.float32)
    if rng.random() < preset.speed_share:
        x = resample(x, SAMPLE_RATE, int(SAMPLE_RATE * rng.uniform(*preset.speed)))
    if rng.random() < preset.room_share:
        response = room_impulse_response(rng) if preset.room == "simulated" else decay_impulse_response(rng)
        wet = fftconvolve(x, response)[: len(x) + SAMPLE_RATE // 2]
        x = (wet * (rms(x) / rms(wet))).astype(np.float32)
    if rng.random() < preset.band_share:
        x = resample(resample(x, SAMPLE_RATE, 8000), 8000, SAMPLE_RATE)
    lead, trail = (int(rng.uniform(*preset.pad_s) * SAMPLE_RATE) for _ in range(2))
    x = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(trail, np.float32)])
    if rng.random() < preset.noise_share:
        snr = rng.uniform(*preset.snr_db)
        if babble and rng.random() < preset.babble_share:
            other = babble[rng.integers(len(babble))]
            noise = np.resize(other, len(x)).astype(np.float64)
            noise /= rms(noise)
        else:
            noise = colored_noise(len(x), rng.choice(NOISE_COLORS), rng)
        x = x + noise * rms(audio) * 10 ** (-snr / 20)
    x = x * 10 ** (rng.uniform(*preset.level_db) / 20) / max(rms(x) / 0.05, 1e-3)
    return np.clip(x, -1, 1).astype(np.float32)


def non_speech(rng: np.random.Generator) -> np.ndarray:
    """Digital silence, low hiss, hum or loud noise, 0.5 to 20 s."""
    n = int(rng.uniform(0.5, 20) * SAMPLE_RATE)
    kind = rng.choice(["silence", "hiss", "hum", "noise"])
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "hum":
        t = np.arange(n) / SAMPLE_RATE
        x = sum(np.sin(2 * np.pi * 50 * k * t) / k for k in range(1, 6)) + 0.1 * rng.standard_normal(n)
    else:
        x = colored_noise(n, rng.choice(NOISE_COLORS), rng)
    level = rng.uniform(-60, -30) if kind == "hiss" else rng.uniform(-40, -15)
    return np.clip(x / rms(x) * 10 ** (level / 20), -1, 1).astype(np.float32)


def colored_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance noise whose power falls as 1/f^0 (white), 1/f (pink) or 1/f^2 (brown)."""
    white = rng.standard_normal(n)
    if color == "white":
        return white
    spectrum = np.fft.rfft(white)
    f = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
    spectrum /= np.sqrt(f) if color == "pink" else f
    noise = np.fft.irfft(spectrum, n)
    return noise / (noise.std() + 1e-9)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-9)


def room_impulse_response(rng: np.random.Generator) -> np.ndarray:
    """A simulated shoebox room (pyroomacoustics' image method) with random size, reverberation time and
    source and microphone positions."""
    import pyroomacoustics as pra

    size = rng.uniform([3, 3, 2.4], [12, 10, 4])
    rt60 = rng.uniform(0.15, 0.8)
    while True:
        try:
            absorption, max_order = pra.inverse_sabine(rt60, size)
            break
        except ValueError:  # a large room cannot be that dry: the shortest time it allows is a little longer
            rt60 *= 1.25
    room = pra.ShoeBox(size, fs=SAMPLE_RATE, materials=pra.Material(absorption), max_order=min(max_order, 12))
    room.add_source(rng.uniform(0.5, size - 0.5))
    room.add_microphone(rng.uniform(0.5, size - 0.5))
    room.compute_rir()
    rir = np.asarray(room.rir[0][0], dtype=np.float32)
    return rir / (np.abs(rir).max() + 1e-9)


def decay_impulse_response(rng: np.random.Generator) -> np.ndarray:
    """A direct path and an exponentially decaying noise tail of 0.15-0.6 s: a room in microseconds, for sets
    of many thousand clips."""
    n = int(rng.uniform(0.15, 0.6) * SAMPLE_RATE)
    response = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)
    response[0] = 1.0 / rng.uniform(0.3, 1.0)  # the direct path over the tail
    return (response / np.abs(response).max()).astype(np.float32)
