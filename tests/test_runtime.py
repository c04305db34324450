"""The runtime end to end: transcripts, WER on synthesized speech, RTF reporting, isolation from torch."""

import json

import numpy as np
import soundfile as sf
from conftest import run_cli_without_torch

from edge_asr.audio import load_audio
from edge_asr.metrics import word_error_rate


def test_transcribes_synthesized_speech(transcriber_int8, speech):
    refs, hyps = [], []
    for text, audio in speech:
        t = transcriber_int8.transcribe(audio)
        refs.append(text)
        hyps.append(t.text)
        assert t.audio_seconds == len(audio) / 16000 and 0 < t.rtf < 1
    assert word_error_rate(refs, hyps) <= 10.0, hyps


def test_long_audio_is_transcribed_window_by_window(transcriber_int8, speech):
    pause = np.zeros(16000 * 4, np.float32)
    audio = np.concatenate([x for _, a in speech for x in (a, pause)] * 3)  # about 45 s: two windows
    assert len(audio) > 16000 * 31
    t = transcriber_int8.transcribe(audio)
    refs = " ".join(text for text, _ in speech * 3)
    assert word_error_rate([refs], [t.text]) <= 15.0, t.text


def test_odd_sample_rates_and_stereo_are_resampled(tmp_path, transcriber_int8, speech):
    import soxr

    text, audio = speech[0]
    for rate in (8000, 22050, 44100):
        stereo = np.stack([soxr.resample(audio, 16000, rate)] * 2, axis=1)
        path = tmp_path / f"clip_{rate}.flac"
        sf.write(path, stereo, rate)
        loaded = load_audio(path)
        assert abs(len(loaded) - len(audio)) < 16000 * 0.01
        assert word_error_rate([text], [transcriber_int8.transcribe(loaded).text]) <= 15.0


def test_runtime_needs_neither_torch_nor_librosa(bundle_int8, tmp_path, speech):
    """Every runtime command a device runs (transcribe, listen --file, bench, info, daemon start-up to its
    end of input) in a process where importing torch, librosa or the build step fails."""
    wav = tmp_path / "utt.wav"
    sf.write(wav, speech[0][1], 16000)
    out = run_cli_without_torch(["transcribe", "--json", "--bundle", str(bundle_int8), str(wav)])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "hydraulic filter" in result["text"].lower()
    assert set(result) >= {"duration_s", "processing_s", "rtf"} and result["rtf"] > 0

    listen = run_cli_without_torch(["listen", "--json", "--bundle", str(bundle_int8), "--file", str(wav)])
    assert listen.returncode == 0, listen.stderr
    assert "hydraulic filter" in json.loads(listen.stdout.splitlines()[0])["text"].lower()

    (tmp_path / "set").mkdir()
    sf.write(tmp_path / "set" / "u1.wav", speech[0][1], 16000)
    (tmp_path / "set" / "refs.tsv").write_text(f"u1\t{speech[0][0]}\n")
    bench = run_cli_without_torch(
        ["bench", "--json", "--runs", "1", "--bundle", str(bundle_int8), str(tmp_path / "set")]
    )
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["wer"] <= 15.0

    info = run_cli_without_torch(["info", "--bundle", str(bundle_int8)])
    assert info.returncode == 0 and "whisper int8" in info.stdout, info.stderr

    config = tmp_path / "edge-asr.toml"
    config.write_text(
        f'[input]\nsource = "{wav}"\nrealtime = false\n[model]\nbundle = "{bundle_int8}"\n'
        f'[output]\njsonl = "{tmp_path / "out.jsonl"}"\n[status]\nlisten = "127.0.0.1:0"\n'
    )
    daemon = run_cli_without_torch(["daemon", "--config", str(config)])
    assert daemon.returncode == 0, daemon.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "hydraulic filter" in json.loads(lines[0])["text"].lower()


def test_long_audio_is_cut_in_pauses():
    from edge_asr.segmenter import split_at_pauses

    rng = np.random.default_rng(0)
    tone = lambda s: 0.3 * rng.standard_normal(int(16000 * s)).astype(np.float32)  # noqa: E731
    quiet = lambda s: np.zeros(int(16000 * s), np.float32)  # noqa: E731
    audio = np.concatenate([tone(12), quiet(1), tone(10), quiet(1), tone(14), quiet(1), tone(20)])
    bounds = split_at_pauses(audio, 30 * 16000)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(audio)
    assert all(b - a <= 30 * 16000 for a, b in bounds)
    for _, cut in bounds[:-1]:
        assert np.abs(audio[cut - 800 : cut + 800]).max() == 0  # every cut inside a pause
