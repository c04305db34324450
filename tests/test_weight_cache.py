"""XNNPACK's packed weights are kept on disk between runs (`edge_asr.weight_cache`): a later load maps them
instead of packing again, computes the same numbers, and a damaged cache is packed again, never used."""

import os

import numpy as np
import pytest

from edge_asr.bundle import Bundle
from edge_asr.frontend import window_features

pytest.importorskip("ai_edge_litert.compiled_model")


def _outputs(bundle: Bundle, audio: np.ndarray):
    from edge_asr.tflite_backend import CompiledWhisper

    model = CompiledWhisper(bundle, threads=1)
    cross = model.encode(window_features(audio, bundle.mel_filters))
    logits, _ = model.decode([50257, 50362], 0, cross)
    return cross, logits


def _caches(home):
    return sorted((home / "xnnpack").glob("*.xnnpack"))


def test_packed_weights_are_kept_reused_and_packed_again_when_damaged(bundle_int8, speech, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_ASR_HOME", str(tmp_path))
    bundle = Bundle.load(bundle_int8)
    _, audio = speech[0]
    cross, logits = _outputs(bundle, audio)
    caches = _caches(tmp_path)
    assert len(caches) == 2  # the encoder's and the decoder's, named after their model files
    tflite_sha = {bundle.manifest.files[bundle.file(r, "tflite").name].sha256[:32] for r in ("encoder", "decoder")}
    assert {c.name.split("-")[0] for c in caches} == tflite_sha
    assert not list((tmp_path / "xnnpack").glob(".*"))  # nothing half-built is left behind
    stamps = {c: c.stat().st_mtime_ns for c in caches}

    again_cross, again_logits = _outputs(bundle, audio)  # maps the packed weights
    assert {c: c.stat().st_mtime_ns for c in caches} == stamps
    assert all(np.array_equal(a, b) for a, b in zip(cross, again_cross))
    assert np.array_equal(logits, again_logits)

    decoder_cache = max(caches, key=lambda c: c.stat().st_size)
    with open(decoder_cache, "r+b") as f:  # weights zeroed in the middle: XNNPACK's header check passes
        f.seek(decoder_cache.stat().st_size // 2)
        f.write(bytes(1 << 16))
    repacked_cross, repacked_logits = _outputs(bundle, audio)
    assert decoder_cache.stat().st_mtime_ns != stamps[decoder_cache]
    assert np.array_equal(logits, repacked_logits)


def test_a_home_that_cannot_be_written_packs_in_memory(bundle_int8, speech, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("a file where the folder would be")
    monkeypatch.setenv("EDGE_ASR_HOME", str(home))
    bundle = Bundle.load(bundle_int8)
    _, audio = speech[0]
    _, logits = _outputs(bundle, audio)
    assert os.path.isfile(home)
    monkeypatch.setenv("EDGE_ASR_HOME", str(tmp_path / "writable"))
    _, cached_logits = _outputs(bundle, audio)
    assert np.array_equal(logits, cached_logits)
