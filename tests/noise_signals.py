"""Audio without speech, made to measure: digital silence, white and pink noise at a level, mains hum with
harmonics, and synthesized music (chords on a beat). All 16 kHz mono float32, seeded."""

import numpy as np

SR = 16000


def silence(seconds):
    return np.zeros(int(seconds * SR), np.float32)


def at_dbfs(x, dbfs):
    """`x` scaled to an RMS level of `dbfs` dB relative to full scale."""
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2))
    return (x * (10 ** (dbfs / 20) / rms)).astype(np.float32)


def white(seconds, dbfs, seed=0):
    return at_dbfs(np.random.default_rng(seed).standard_normal(int(seconds * SR)), dbfs)


def pink(seconds, dbfs, seed=0):
    """1/f power: white noise shaped in the frequency domain."""
    n = int(seconds * SR)
    spec = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0
    return at_dbfs(np.fft.irfft(spec, n), dbfs)


def hum(seconds, dbfs=-30, base=50.0):
    """Mains hum: the base frequency and six harmonics falling as 1/k."""
    t = np.arange(int(seconds * SR)) / SR
    return at_dbfs(sum(np.sin(2 * np.pi * base * k * t) / k for k in range(1, 8)), dbfs)


def music(seconds=10.0, dbfs=-20, bpm=120):
    """Four chords (with their octaves) struck on every beat and decaying, over a kick drum."""
    t = np.arange(int(seconds * SR)) / SR
    beat = 60 / bpm
    chords = [[261.6, 329.6, 392.0], [220.0, 261.6, 329.6], [174.6, 220.0, 261.6], [196.0, 246.9, 293.7]]
    x = np.zeros_like(t)
    for i, start in enumerate(np.arange(0, seconds, beat)):
        idx = (t >= start) & (t < start + beat)
        tt = t[idx] - start
        env = np.exp(-3 * tt)
        x[idx] += env * sum(np.sin(2 * np.pi * f * tt) + 0.3 * np.sin(4 * np.pi * f * tt) for f in chords[(i // 4) % 4])
        kick = np.exp(-30 * tt) * np.sin(2 * np.pi * 60 * tt * np.exp(-5 * tt)) * 3
        x[idx] += kick
    return at_dbfs(x, dbfs)


def from_bytes(data: bytes) -> np.ndarray:
    """Audio without speech, chosen by the bytes: noise (white, pink), hum, tones, a square wave, clicks, a
    constant, or the bytes themselves as 16-bit samples; 0.3 to 8 s, from -70 dBFS to far past full scale,
    sometimes clipped."""
    rng = np.random.default_rng(list(data[:32]) or [0])
    seconds = 0.3 + 7.7 * rng.random()
    n = int(seconds * SR)
    t = np.arange(n) / SR
    kind = data[0] % 9 if data else 0
    if kind == 0:
        x = white(seconds, -30, int(rng.integers(1 << 30)))
    elif kind == 1:
        x = pink(seconds, -30, int(rng.integers(1 << 30)))
    elif kind == 2:
        x = hum(seconds, -30, base=float(rng.choice([50.0, 60.0])))
    elif kind == 3:
        x = sum(np.sin(2 * np.pi * f * t + rng.random() * 6) for f in rng.uniform(40, 7000, int(rng.integers(1, 4))))
    elif kind == 4:
        x = np.sign(np.sin(2 * np.pi * rng.uniform(20, 4000) * t))
    elif kind == 5:
        x = np.zeros(n)
        x[rng.integers(0, n, int(rng.integers(1, 20)))] = rng.choice([-1.0, 1.0], 1)
    elif kind == 6:
        x = np.full(n, rng.uniform(-1, 1))
    elif kind == 7:
        x = np.frombuffer((data * (2 * n // max(len(data), 1) + 1))[: 2 * n], np.int16) / 32768.0
    else:
        x = np.zeros(n)
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if n else 0.0
    if kind not in (5, 6, 8) and rms > 0:
        x = x * (10 ** (rng.uniform(-70, 20) / 20) / rms)
    if rng.random() < 0.3:
        x = np.clip(x, -1, 1)
    return x.astype(np.float32)


# What issue 14 names: no text may come from any of these.
CASES = {
    "silence-1s": lambda: silence(1),
    "silence-5s": lambda: silence(5),
    "silence-65s": lambda: silence(65),
    **{
        f"{noise.__name__}{dbfs}dBFS": (lambda noise=noise, dbfs=dbfs: noise(5, dbfs))
        for noise in (white, pink)
        for dbfs in (-50, -35, -20)
    },
    "hum-50Hz": lambda: hum(5),
    "music-10s": lambda: music(10),
}
