"""Hostile input, end to end through the CLI on the default bundle: a manifest that points outside its folder
or has the wrong types, an endless hotword, absurd float samples. Each gives one line on stderr and a
non-zero exit, or no text; and no file outside the bundle is opened."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fuzz_targets import OpenedFiles

from edge_asr.bundle import Bundle
from edge_asr.cli import main
from edge_asr.errors import BundleError
from edge_asr.manifest import file_records


def linked_copy(bundle: Path, folder: Path) -> Path:
    """The bundle's files hard-linked into `folder` (copied where links fail): a bundle to damage cheaply."""
    folder.mkdir()
    for f in bundle.iterdir():
        try:
            os.link(f, folder / f.name)
        except OSError:
            shutil.copy(f, folder / f.name)
    (folder / "manifest.json").unlink()
    shutil.copy(bundle / "manifest.json", folder / "manifest.json")  # its own: the one file rewritten
    return folder


def edit_manifest(folder: Path, change) -> None:
    raw = json.loads((folder / "manifest.json").read_text())
    change(raw)
    (folder / "manifest.json").write_text(json.dumps(raw))


def transcribe(capfd, bundle: Path, audio: Path, *flags: str) -> tuple[int, str, str]:
    code = main(["transcribe", "--bundle", str(bundle), *flags, str(audio)])
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def speech_wav(speech, tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "speech.wav"
    sf.write(path, speech[0][1], 16000)
    return path


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_a_manifest_naming_a_graph_outside_the_bundle_is_refused_before_it_is_opened(
    bundle_auto, tmp_path, capfd, speech_wav, where
):
    bundle = linked_copy(bundle_auto, tmp_path / "bundle")
    outside = tmp_path / "outside.onnx"  # a valid graph, with its true checksum: only its place is wrong
    shutil.copy(bundle / "encoder.int8.onnx", outside)
    name = "../outside.onnx" if where == "dotdot" else str(outside)

    def point_outside(raw):
        raw["model"]["graphs"]["encoder"] = name
        raw["files"][name] = file_records(tmp_path, ["outside.onnx"])["outside.onnx"]

    edit_manifest(bundle, point_outside)
    with OpenedFiles() as opened:
        code, out, err = transcribe(capfd, bundle, speech_wav)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "model.onnx.graphs.encoder must name a file inside the bundle's folder" in err
    assert str(outside) not in opened.paths


def test_a_symlink_out_of_the_bundle_is_refused(bundle_auto, tmp_path, capfd, speech_wav):
    bundle = linked_copy(bundle_auto, tmp_path / "bundle")
    outside = tmp_path / "encoder.int8.onnx"  # the same bytes: its checksum matches
    (bundle / "encoder.int8.onnx").rename(outside)
    (bundle / "encoder.int8.onnx").symlink_to(outside)
    with OpenedFiles() as opened:
        code, out, err = transcribe(capfd, bundle, speech_wav)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "encoder.int8.onnx links outside the bundle's folder" in err
    assert str(outside) not in opened.paths


def test_a_graph_whose_tensors_live_outside_the_bundle_is_refused(tmp_path):
    import onnx
    from fuzz_targets import make_bundle

    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "decoder.rows.bin").rename(tmp_path / "rows.bin")
    graph = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    (entry,) = [e for e in graph.graph.initializer[0].external_data if e.key == "location"]
    entry.value = "../rows.bin"
    onnx.save(graph, str(bundle / "decoder.onnx"))
    edit_manifest(bundle, lambda raw: raw["files"].update(file_records(bundle, ["decoder.onnx"])))
    with (
        OpenedFiles() as opened,
        pytest.raises(BundleError, match=r"decoder.onnx's external data must name a file inside"),
    ):
        Bundle.load(bundle)
    assert str(tmp_path / "rows.bin") not in opened.paths


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda raw: raw.update(decoding=None), "decoding is missing or null (expected dict)"),
        (lambda raw: raw["model"]["dims"].update(n_text_ctx="448"), "model.dims.n_text_ctx must be int, not str"),
        (lambda raw: raw["decoder"]["suppress_tokens"].append(60000), "decoder.suppress_tokens holds token 60000"),
        (lambda raw: raw["decoding"]["guards"].update(temperatures="hot"), "decoding.guards.temperatures must be"),
    ],
)
def test_a_manifest_of_the_wrong_types_is_one_line_naming_the_key(
    bundle_auto, tmp_path, capfd, speech_wav, change, key
):
    bundle = linked_copy(bundle_auto, tmp_path / "bundle")
    edit_manifest(bundle, change)
    code, out, err = transcribe(capfd, bundle, speech_wav)
    assert code == 2 and out == "" and err.count("\n") == 1 and key in err, err


def test_a_100000_character_hotword_is_refused_at_once(bundle_auto, tmp_path, capfd, speech_wav):
    words = tmp_path / "words.txt"
    words.write_text("Kestrolix\n" + "a" * 100_000 + "\n")
    for flags in (["--hotwords", "a" * 100_000], ["--hotwords-file", str(words)]):
        start = time.perf_counter()
        code, out, err = transcribe(capfd, bundle_auto, speech_wav, *flags)
        assert time.perf_counter() - start < 1.0
        assert code == 2 and out == "" and err.count("\n") == 1 and "100,000 characters; at most" in err, err


def test_the_tokenizer_merges_a_long_word_in_n_log_n(bundle_auto):
    """Rescanning every pair after each merge took 31 s for 20,000 characters and minutes for 100,000."""
    tokenizer = Bundle.load(bundle_auto).tokenizer
    assert tokenizer.encode(" hydraulic Kestrolix") == [34797, 509, 395, 3225, 844]  # unchanged merges
    start = time.perf_counter()
    ids = tokenizer.encode("ab" * 50_000)
    assert tokenizer.decode(ids) == "ab" * 50_000 and time.perf_counter() - start < 10


def test_absurd_float_samples_are_clipped_with_one_warning_and_give_no_text(bundle_auto, tmp_path):
    path = tmp_path / "loud.wav"
    sf.write(path, np.full(32000, 1e30, np.float32), 16000, subtype="FLOAT")
    # in a process of its own: the console is its real file descriptors, which a whole-file read discards
    run = subprocess.run(
        [sys.executable, "-m", "edge_asr", "transcribe", "--bundle", str(bundle_auto), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    code, out, err = run.returncode, run.stdout, run.stderr
    lines = err.splitlines()
    assert code == 0 and out.strip() == "", out  # once "I"
    assert lines[0] == f"edge-asr: warning: {path}: samples reach 1e+30, far outside [-1, 1]; clipped"
    assert len(lines) == 2 and "RTF" in lines[1] and "Warning" not in err


def test_a_float_file_of_random_bytes_is_one_error_and_no_numeric_warning(bundle_auto, tmp_path, capfd):
    path = tmp_path / "random.wav"
    noise = np.frombuffer(np.random.default_rng(0).bytes(32000 * 4), np.float32)
    sf.write(path, noise, 16000, subtype="FLOAT")
    code, out, err = transcribe(capfd, bundle_auto, path)
    assert code == 2 and out == "" and err == f"edge-asr: error: {path}: contains non-finite samples (corrupt file?)\n"


def test_constant_and_clipped_signals_give_no_text(bundle_auto):
    import edge_asr

    recognizer = edge_asr.load(bundle_auto)
    t = np.arange(32000) / 16000
    signals = {
        "constant": np.full(32000, 0.9, np.float32),
        "full-scale constant": np.ones(32000, np.float32),
        "clipped tone": np.clip(40 * np.sin(2 * np.pi * 440 * t), -1, 1).astype(np.float32),
        "NaN and 1e30 through the API": np.where(t < 1, np.nan, 1e30).astype(np.float32),
    }
    for name, audio in signals.items():
        assert recognizer.transcribe(audio).text.strip() == "", name


def test_steady_tones_the_model_reads_as_words_give_no_text(bundle_auto):
    """Found by fuzzing (the `nospeech` target, `noise_signals.from_bytes`): a mix of steady tones that
    tiny.en reads as "Okay." with a no-speech probability of 0.69, under the 0.7 gate. The energy detector
    finds no speech in it at all."""
    from noise_signals import from_bytes

    import edge_asr
    from edge_asr.guards import Guards
    from edge_asr.transcriber import Transcriber
    from edge_asr.vad import speech_seconds

    tones = from_bytes(bytes([3]) + np.random.default_rng(98).bytes(39))
    assert speech_seconds(tones) == 0
    assert edge_asr.load(bundle_auto).transcribe(tones).text == ""
    without = Transcriber(bundle_auto, guards=Guards(unvoiced_no_speech_threshold=1.0, steady_spectrum_db=0.0))
    assert without.transcribe(tones).text.strip()  # what the guard is for


def test_a_periodic_buzz_the_model_reads_as_words_gives_no_text(bundle_auto):
    """Found by fuzzing (`nospeech`, kind 7): 14 bytes repeated as 16-bit samples, a clipped buzz of 7 samples'
    period, read as "I'm going to be the same thing." with a no-speech probability of 0.48, under the unvoiced
    gate's 0.5. Its spectrum never changes, which no speech does."""
    from noise_signals import from_bytes

    import edge_asr
    from edge_asr.guards import Guards
    from edge_asr.transcriber import Transcriber
    from edge_asr.vad import spectral_variation_db, speech_seconds

    buzz = from_bytes(bytes.fromhex("0707070707070101790101010101"))
    assert speech_seconds(buzz) == 0 and spectral_variation_db(buzz) < 0.1
    assert edge_asr.load(bundle_auto).transcribe(buzz).text == ""
    without = Transcriber(bundle_auto, guards=Guards(steady_spectrum_db=0.0))
    assert without.transcribe(buzz).text.strip()  # what the guard is for


def test_speech_in_loud_noise_is_not_steady(speech):
    """The steady-spectrum gate keeps speech its energy detector cannot see: a piper sentence in pink noise at
    -5 dB SNR varies by several dB, a tone or a buzz by almost none."""
    from noise_signals import from_bytes, pink

    from edge_asr.vad import spectral_variation_db, speech_seconds

    for _, audio in speech:
        noise = pink(len(audio) / 16000 + 0.1, -20)[: len(audio)]
        noisy = audio + noise * np.sqrt(np.mean(audio**2) / np.mean(noise**2) * 10**0.5)
        assert speech_seconds(audio) > 0.5 and spectral_variation_db(audio) > 8.0
        assert spectral_variation_db(noisy) > 3.0, speech_seconds(noisy)
    tone = np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)
    assert spectral_variation_db(tone) < 0.1
    assert spectral_variation_db(from_bytes(bytes([7]) + np.random.default_rng(3).bytes(99))) < 1.0
