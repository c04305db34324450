"""The numpy frontend against openai-whisper's own torch implementation."""

import numpy as np
import pytest
import torch

whisper_audio = pytest.importorskip("whisper.audio", reason="reference implementation: openai-whisper")

from edge_asr.frontend import N_FRAMES, log_mel_spectrogram, pad_or_trim  # noqa: E402
from edge_asr_build.whisper.mel import mel_filters  # noqa: E402


def test_mel_filters_match_whisper_assets():
    reference = whisper_audio.mel_filters("cpu", 80).numpy()
    assert np.abs(mel_filters(16000, 400, 80) - reference).max() < 1e-6


def test_log_mel_matches_openai_whisper_on_speech(speech):
    filters = mel_filters()
    for _, audio in speech:
        ours = log_mel_spectrogram(audio, filters)
        theirs = whisper_audio.log_mel_spectrogram(torch.from_numpy(audio)).numpy()
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= 1e-3


def test_log_mel_with_whisper_padding(speech):
    audio = speech[0][1]
    ours = log_mel_spectrogram(audio, mel_filters(), padding=whisper_audio.N_SAMPLES)
    theirs = whisper_audio.log_mel_spectrogram(torch.from_numpy(audio), padding=whisper_audio.N_SAMPLES).numpy()
    assert np.abs(ours - theirs).max() <= 1e-3


def test_pad_or_trim():
    mel = np.ones((80, 10), np.float32)
    padded = pad_or_trim(mel)
    assert padded.shape == (80, N_FRAMES) and padded[:, 10:].sum() == 0
    assert pad_or_trim(np.ones((80, N_FRAMES + 5))).shape == (80, N_FRAMES)
