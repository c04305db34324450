"""Streaming: endpointing, the file source, the daemon's sinks and its signal handling."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edge_asr.endpointer import Endpointer
from edge_asr.errors import EdgeAsrError
from edge_asr.metrics import word_error_rate
from edge_asr.service.sinks import JsonlSink
from edge_asr.vad import EnergyVad


def test_endpointer_finds_each_sentence(stream):
    audio, texts, spans = stream
    endpointer = Endpointer(EnergyVad(), min_silence=0.5)
    utterances = []
    for i in range(0, len(audio), 1600):
        utterances += endpointer.feed(audio[i : i + 1600])
    utterances += endpointer.flush()
    assert len(utterances) == len(texts)
    for u, (start, end) in zip(utterances, spans):
        assert u.start_s <= start and abs(u.last_speech_s - end) < 0.15
        assert u.end_s - u.last_speech_s <= 0.25  # the tail kept after speech


def test_long_speech_is_split_below_the_maximum(speech):
    audio = np.concatenate([a for _, a in speech] * 3)  # ~25 s with only short gaps
    endpointer = Endpointer(EnergyVad(), min_silence=2.0, max_utterance=8.0)
    utterances = endpointer.feed(audio) + endpointer.flush()
    assert len(utterances) >= 3
    assert all(len(u.audio) / 16000 <= 8.0 + 1e-6 for u in utterances)
    assert any(u.forced for u in utterances)
    assert abs(sum(len(u.audio) for u in utterances) / 16000 - len(audio) / 16000) < 1.0


def test_stream_transcript_matches_sentences(transcriber_int8, stream, tmp_path):
    from edge_asr.sources import FileSource
    from edge_asr.stream import StreamRecognizer
    from edge_asr_build.speech.synth import write_wav

    audio, texts, _ = stream
    write_wav(tmp_path / "stream.wav", audio)
    source = FileSource(str(tmp_path / "stream.wav"))
    partials = []
    recognizer = StreamRecognizer(transcriber_int8, Endpointer(EnergyVad()), 1.0, on_partial=partials.append)
    finals = [f for block in source for f in recognizer.feed(block)] + recognizer.finish()
    assert len(finals) == len(texts) and source.dropped_frames == 0
    assert word_error_rate(texts, [f.text for f in finals]) < 10
    assert partials and all(p.text.startswith(p.stable) for p in partials)
    assert recognizer.counters.utterances == len(texts) and 0 < recognizer.counters.rtf < 1


@pytest.mark.parametrize("rate", [16000, 44100])
def test_a_long_file_streams_without_being_loaded_whole(tmp_path, rate):
    """Ten minutes of a file stream through one block at a time (38 MB as float32 at 16 kHz if read
    whole, against a few blocks), and give the samples that reading the whole file gives."""
    import tracemalloc

    import soundfile as sf

    from edge_asr.audio import load_audio
    from edge_asr.sources import FileSource

    rng = np.random.default_rng(0)
    minute = (rng.standard_normal(rate * 60) * 3000).astype(np.int16)
    with sf.SoundFile(str(tmp_path / "long.wav"), "w", rate, 1, "PCM_16") as f:
        for _ in range(10):
            f.write(minute)
    tracemalloc.start()
    source = FileSource(str(tmp_path / "long.wav"))
    count, checksum, first = 0, 0.0, None
    for block in source:
        first = block.copy() if first is None else first
        count += len(block)
        checksum += float(block.sum(dtype=np.float64))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000, f"{peak / 1e6:.1f} MB held while streaming"
    whole = load_audio(tmp_path / "long.wav")
    assert count == len(whole) and abs(source.duration_s - 600) < 1e-6
    assert np.allclose(first, whole[: len(first)], atol=1e-6)
    assert abs(checksum - whole.sum(dtype=np.float64)) <= 1e-6 * np.abs(whole).sum(dtype=np.float64)


def test_a_file_that_turns_corrupt_midway_stops_the_stream_with_an_audio_error(tmp_path):
    import soundfile as sf

    from edge_asr.errors import AudioError
    from edge_asr.sources import FileSource

    audio = np.zeros(16000 * 3, np.float32)
    audio[30000] = np.nan
    sf.write(str(tmp_path / "nan.wav"), audio, 16000, subtype="FLOAT")
    source = FileSource(str(tmp_path / "nan.wav"))
    with pytest.raises(AudioError, match="non-finite"):
        list(source)


def test_jsonl_sink_rotates_and_keeps_whole_lines(tmp_path):
    sink = JsonlSink(tmp_path / "t.jsonl", max_bytes=200, backups=2, device_id="pi")
    for i in range(20):
        sink.write({"i": i, "text": "x" * 30})
    sink.close()
    files = sorted(f for f in tmp_path.glob("t.jsonl*") if f.name != "t.jsonl.seq")
    assert [f.name for f in files] == ["t.jsonl", "t.jsonl.1", "t.jsonl.2"]
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert max(r["i"] for r in lines) == 19 and all(f.stat().st_size <= 200 for f in files)
    # The sequence outlives the deleted files: the last line rotated out is remembered.
    assert max(r["seq"] for r in lines) == 20 and int((tmp_path / "t.jsonl.seq").read_text()) >= 17


def _daemon(tmp_path, wav, bundle):
    config = tmp_path / "edge-asr.toml"
    config.write_text(
        f'[input]\nsource = "{wav}"\nrealtime = true\n[model]\nbundle = "{bundle}"\n'
        f'[output]\njsonl = "{tmp_path / "out.jsonl"}"\n[status]\nlisten = "127.0.0.1:0"\n'
    )
    return subprocess.Popen(
        [sys.executable, "-m", "edge_asr", "daemon", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_lines(path, n, process, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return time.monotonic()
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.02)
    raise AssertionError(f"no {n} lines in {path}")


def test_sigterm_finishes_the_utterance_in_flight(tmp_path, stream_wav, stream, bundle_int8):
    _, texts, spans = stream
    process = _daemon(tmp_path, stream_wav, bundle_int8)
    first = _wait_for_lines(tmp_path / "out.jsonl", 1, process)
    # The first final arrives ~0.5 s after its speech ended; the second sentence starts a pause later.
    time.sleep(max(0.0, (spans[1][0] - spans[0][1]) - 0.5) + 1.0)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, process.stderr.read()
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(records) == 2  # the utterance in flight was finished; nothing new was started
    assert word_error_rate(texts[:2], [r["text"] for r in records]) < 15
    assert time.monotonic() - first < spans[1][1] - spans[0][1] + 5


def test_sigkill_leaves_only_whole_lines(tmp_path, stream_wav, bundle_int8):
    process = _daemon(tmp_path, stream_wav, bundle_int8)
    _wait_for_lines(tmp_path / "out.jsonl", 1, process)
    time.sleep(1.5)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["text"] for line in lines)


def test_config_errors_are_one_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[vad]\nmin_silence_ms = 500\n")
    out = subprocess.run(
        [sys.executable, "-m", "edge_asr", "daemon", "--config", str(config)], capture_output=True, text=True
    )
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "min_silence_ms" in out.stderr


def test_missing_microphone_is_one_line(bundle_int8):
    out = subprocess.run(
        [sys.executable, "-m", "edge_asr", "listen", "--bundle", str(bundle_int8), "--device", "no-such-device-xyz"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0
    assert "edge-asr devices" in out.stderr and "Traceback" not in out.stderr


def test_status_endpoint_serves_counters(tmp_path, stream_wav, bundle_int8):
    import urllib.request

    from edge_asr.service.daemon import Daemon, load_config

    config = tmp_path / "c.toml"
    config.write_text(
        f'[input]\nsource = "{stream_wav}"\nrealtime = false\n[model]\nbundle = "{bundle_int8}"\n'
        f'[output]\njsonl = "{tmp_path / "o.jsonl"}"\n[status]\nlisten = "127.0.0.1:0"\n'
    )
    daemon = Daemon(load_config(config))
    daemon.source = daemon._make_source()
    server = daemon._serve_status()
    try:
        for block in daemon.source:
            daemon.recognizer.feed(block)
        daemon.recognizer.finish()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/status", timeout=10) as r:
            status = json.loads(r.read())
    finally:
        server.shutdown()
    assert status["utterances"] == 3 and status["dropped_frames"] == 0
    assert status["audio_s"] > 10 and 0 < status["rtf"] < 1 and len(status["latest"]) == 3
    assert status["guards"]["windows"] >= 3 and status["guards"]["loops_cut"] == 0


def test_daemon_decoding_section(tmp_path, bundle_int8):
    from edge_asr.service.daemon import decoding_settings, load_config

    config = tmp_path / "c.toml"
    config.write_text(
        f'[model]\nbundle = "{bundle_int8}"\nbias_words = ["older"]\n'
        '[decoding]\nbeam = 5\nvocabulary = ["Kestrolix", "KX-40"]\nno_speech_threshold = 0.5\n'
        'vad_gate = true\nprompt = "Press shop log."\n'
    )
    settings = decoding_settings(load_config(config))
    assert settings.beam == 5 and settings.hotwords == ["Kestrolix", "KX-40"] and settings.prompt == "Press shop log."
    assert settings.guards["no_speech_threshold"] == 0.5 and settings.guards["vad_gate"] is True
    import edge_asr

    transcriber = edge_asr.load(bundle_int8, settings=settings)
    assert transcriber.guards.no_speech_threshold == 0.5 and transcriber.guards.vad_gate
    assert transcriber.decoder.options.beam_size == 5
    assert transcriber.tokenizer.decode(transcriber.decoder.head) == " Press shop log. Kestrolix, KX-40."
    config.write_text('[decoding]\nvocabulary = "Kestrolix"\n')
    with pytest.raises(EdgeAsrError, match="list of words"):
        decoding_settings(load_config(config))
