"""The one augmentation chain and its presets: each step does what it says, and a seed fixes the draws."""

from dataclasses import replace

import numpy as np
import pytest

from edge_asr_build.speech.augment import CTC, ISOLATED, MATCHING, augment, non_speech

QUIET = replace(MATCHING, speed_share=0.0, room_share=0.0, band_share=0.0, noise_share=0.0, pad_s=(0.0, 0.0))


def tone_sweep(seconds=1.0) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.1 * np.sin(2 * np.pi * (200 + 3500 * t) * t)).astype(np.float32)  # 200 Hz up to 7.2 kHz


def test_the_telephone_band_removes_what_lies_above_4_khz():
    x = tone_sweep()
    y = augment(x, np.random.default_rng(0), replace(QUIET, band_share=1.0))
    power = np.abs(np.fft.rfft(y)) ** 2
    above = power[np.fft.rfftfreq(len(y), 1 / 16000) > 4100].sum() / power.sum()
    full = np.abs(np.fft.rfft(augment(x, np.random.default_rng(0), QUIET))) ** 2
    assert above < 1e-3 < full[np.fft.rfftfreq(len(x), 1 / 16000) > 4100].sum() / full.sum()


@pytest.mark.parametrize("snr_db", [5.0, 20.0])
def test_noise_is_added_at_the_drawn_snr_and_the_level_is_drawn_after(snr_db):
    x = tone_sweep()
    y = augment(x, np.random.default_rng(1), replace(QUIET, noise_share=1.0, snr_db=(snr_db, snr_db))).astype(float)
    gain = float(y @ x) / float(x @ x)  # the level step scales speech and noise together
    noise = y - gain * x
    measured = 10 * np.log10(np.mean((gain * x) ** 2) / np.mean(noise**2))
    assert measured == pytest.approx(snr_db, abs=0.5)


def test_presets_draw_from_their_seed_and_keep_audio_in_range():
    x = tone_sweep(0.5)
    for preset in (MATCHING, ISOLATED, CTC):
        a, b = (augment(x, np.random.default_rng(7), preset) for _ in range(2))
        assert np.array_equal(a, b) and np.abs(a).max() <= 1.0 and a.dtype == np.float32
    # CTC changes the speed of every clip; ISOLATED pads at most 0.2 s a side
    lengths = [len(augment(x, np.random.default_rng(s), replace(CTC, pad_s=(0.0, 0.0)))) for s in range(6)]
    assert all(n != len(x) for n in lengths)
    padded = [len(augment(x, np.random.default_rng(s), replace(ISOLATED, speed_share=0.0))) for s in range(6)]
    assert max(padded) <= len(x) + 2 * 0.2 * 16000 + 16000 // 2  # a room adds at most 0.5 s of tail


def test_non_speech_is_quiet_or_noise_and_never_clips():
    clips = [non_speech(np.random.default_rng(s)) for s in range(12)]
    assert all(0.5 * 16000 <= len(c) <= 20 * 16000 and np.abs(c).max() <= 1.0 for c in clips)
    levels = [float(np.sqrt(np.mean(c.astype(float) ** 2))) for c in clips]
    assert min(levels) < 1e-3 and max(levels) < 0.2
