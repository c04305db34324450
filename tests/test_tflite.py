"""The bundle's other formats compute what its ONNX graphs compute: LiteRT (.tflite) and ONNX Runtime's
mobile format (.ort), for Whisper and LSTM-CTC models, and the runtime picks a backend that is installed."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli_without_torch

import edge_asr
from edge_asr.bundle import Bundle
from edge_asr.decoding import forced_decoding
from edge_asr.frontend import window_features

BACKENDS = ["onnx", "ort", "tflite"]


def _whisper_steps(transcriber, audio, tokens=None):
    """Cross-attention inputs and every step's logits, teacher-forced through `tokens` (greedy when None)."""
    decoder = transcriber.decoder
    mel = window_features(audio, transcriber.bundle.mel_filters)
    tokens = decoder.decode(decoder.prefill(mel)).tokens if tokens is None else tokens
    cross, logits, _ = forced_decoding(transcriber.model, mel, decoder.prompt, tokens)
    return cross, logits, tokens


@pytest.fixture(scope="module")
def fp32_backends(bundle_fp32):
    bundle = Bundle.load(bundle_fp32)
    assert bundle.formats == BACKENDS
    return {b: edge_asr.load(bundle, backend=b) for b in BACKENDS}


def test_fp32_backends_agree_on_every_decoding_step(fp32_backends, speech):
    for text, audio in speech:
        ref_cross, ref_logits, tokens = _whisper_steps(fp32_backends["onnx"], audio)
        for backend in ("ort", "tflite"):
            cross, logits, _ = _whisper_steps(fp32_backends[backend], audio, tokens)
            assert max(np.abs(a - b).max() for a, b in zip(cross, ref_cross)) < 1e-3, backend
            assert np.abs(logits - ref_logits).max() < 1e-3, backend
            assert fp32_backends[backend].transcribe(audio).text == fp32_backends["onnx"].transcribe(audio).text


def test_int8_tflite_transcribes_like_int8_onnx(bundle_int8, speech):
    from edge_asr.metrics import word_error_rate

    bundle = Bundle.load(bundle_int8)
    texts = {b: [edge_asr.load(bundle, backend=b).transcribe(a).text for _, a in speech] for b in BACKENDS}
    assert texts["ort"] == texts["onnx"]
    assert word_error_rate([t for t, _ in speech], texts["tflite"]) < 10
    manifest = bundle.manifest
    sizes = {f: sum(manifest.files[n].bytes for n in manifest.model.graphs[f].values()) for f in ("tflite",)}
    assert sizes["tflite"] < 0.35 * 4 * bundle.parameters  # int8 weights: well under a float32 copy


def test_tflite_decoder_refuses_more_tokens_than_its_slots(bundle_fp32):
    transcriber = edge_asr.load(bundle_fp32, backend="tflite")
    model = transcriber.model
    assert model.max_tokens == Bundle.load(bundle_fp32).manifest.model.tflite_max_tokens
    cross = model.encode(np.zeros((80, 3000), np.float32))
    with pytest.raises(Exception, match="tokens per window"):
        model.decode([50257] * (model.max_tokens + 1), model.empty_cache(), cross)


def test_a_prompt_in_chunks_computes_what_it_computes_token_by_token(bundle_fp32, speech):
    from edge_asr.tflite_backend import CompiledWhisper, _slots

    bundle = Bundle.load(bundle_fp32)
    model = CompiledWhisper(bundle)
    assert model._chunk_io.tokens == 8
    _, audio = speech[0]
    cross = model.encode(window_features(audio, bundle.mel_filters))
    tokens = [50361, *bundle.tokenizer.encode(" Zero. Oh. One. Two. Three. Four. Five. Six. Seven."), 50257, 50362]
    assert len(tokens) % 8 != 0  # whole chunks, then steps

    def decoded(chunks: bool):
        model._feed(cross)
        if not chunks:
            model._chunk_io.run = None
        logits, filled = model.decode(tokens, model.empty_cache(), cross)
        after, _ = model.decode([bundle.tokenizer.encode(" Hello")[0]], filled, cross)
        return logits, after, [_slots(n, model._cache[n], 0, filled + 1).copy() for n in model.cache_names]

    by_token, in_chunks = decoded(False), decoded(True)
    for a, b in zip(by_token[:2], in_chunks[:2]):
        assert np.abs(a - b).max() < 1e-3 and a.argmax() == b.argmax()
    assert max(np.abs(a - b).max() for a, b in zip(by_token[2], in_chunks[2])) < 1e-3


def test_a_window_shorter_than_its_audio_class_is_padded_and_masked(bundle_auto, speech, monkeypatch):
    """The default bundle's decoder has signatures per audio class, not per window length: a 3 s window's
    cross-attention inputs are padded to the 5 s class, and what the padding holds changes nothing. Both
    LiteRT APIs read the class signatures alike."""
    from edge_asr import tflite_backend

    bundle = Bundle.load(bundle_auto)
    model = tflite_backend.CompiledWhisper(bundle)
    assert model._padded and sorted(model._decoders) == sorted(model._chunks) == [250, 600, 1500]
    _, audio = speech[0]
    cross = model.encode(window_features(audio[: 2 * 16000], bundle.mel_filters, 300))
    assert cross[1].shape[-2] == 150
    prompt = [50257, 50362]
    zeros, _ = model.decode(prompt, model.empty_cache(), list(cross))

    pad = tflite_backend._padded_cross
    rng = np.random.default_rng(0)

    def noise_padded(name, value, positions):
        padded = pad(name, value, positions)
        own = value.shape[-1 if "_k_" in name else -2]
        tail = padded[..., own:] if "_k_" in name else padded[..., own:, :]
        tail[...] = rng.normal(0, 10, tail.shape)
        return padded

    monkeypatch.setattr(tflite_backend, "_padded_cross", noise_padded)
    noise, _ = model.decode(prompt, model.empty_cache(), list(cross))
    assert np.abs(noise - zeros).max() < 1e-4
    interpreted, _ = tflite_backend.InterpreterWhisper(bundle).decode(prompt, 0, list(cross))
    assert np.abs(interpreted - zeros).max() < 1e-3 and interpreted.argmax() == zeros.argmax()


def test_command_mode_reads_the_same_window_on_every_backend(fp32_backends, speech):
    """Command mode reads the no-speech probability without its prompt: on LiteRT, whose model keeps one
    cache, that read must not leave its token in the slot the prompt starts from."""
    from pathlib import Path

    from edge_asr.commands import CommandMode
    from edge_asr.grammar import Grammar

    grammar = Grammar.from_file(Path(__file__).parent.parent / "examples" / "grammars" / "machine.gbnf")
    _, audio = speech[0]
    windows = {}
    for backend in ("onnx", "tflite"):
        transcriber = fp32_backends[backend]
        command = CommandMode(grammar, transcriber.tokenizer)
        decoder = transcriber.decoder.with_options(**command.decoding)
        window = decoder.prefill(window_features(audio, transcriber.bundle.mel_filters))
        windows[backend] = (window.logits, window.no_speech_prob, decoder.decode(window).tokens)
    (logits, no_speech, tokens), (other_logits, other_no_speech, other_tokens) = windows["onnx"], windows["tflite"]
    assert np.abs(logits - other_logits).max() < 1e-3
    assert abs(no_speech - other_no_speech) < 1e-4 and tokens == other_tokens


def test_lstm_tflite_streams_in_chunks_and_steps_like_torch(tmp_path):
    from edge_asr.tflite_backend import interpreter_class
    from edge_asr_build.lstm.model import LstmConfig, LstmCtc, compress_lstm
    from edge_asr_build.lstm.tflite_export import CHUNK_STEPS, export_lstm_tflite

    torch.manual_seed(0)
    plain = LstmCtc(LstmConfig(hidden=[48, 40], proj=[0, 0])).eval()
    factored = compress_lstm(plain, ratio=0.5)[0].eval()
    features = torch.randn(3 * (CHUNK_STEPS + 5) + 2, 80)  # a chunk, 5 single steps, 2 frames left over
    for model in (plain, factored):
        path = export_lstm_tflite(model, tmp_path / "m.tflite")
        interpreter = interpreter_class()(model_path=str(path))
        runners = {n: interpreter.get_signature_runner(n) for n in ("chunk", "step")}
        with torch.no_grad():
            ref, ref_state = model(features[None])
        state = {
            k: np.zeros(v["shape"], np.float32)
            for k, v in runners["step"].get_input_details().items()
            if k != "features"
        }
        out, start = [], 0
        for name, frames in [("chunk", 3 * CHUNK_STEPS)] + [("step", 3)] * 5:
            result = runners[name](features=features[start : start + frames].numpy(), **state)
            out.append(result["log_probs"])
            state = {k: result[k] for k in state}
            start += frames
        assert np.abs(np.concatenate(out) - ref[0].numpy()).max() < 1e-4
        assert np.abs(state["c1"] - ref_state[1][1][0].numpy()).max() < 1e-4


def test_auto_backend_falls_back_to_litert_without_onnxruntime(bundle_int8, speech, tmp_path):
    from edge_asr_build.speech.synth import write_wav

    wav = tmp_path / "s.wav"
    write_wav(wav, speech[0][1])
    run = run_cli_without_torch(
        ["transcribe", "--json", "--bundle", str(bundle_int8), str(wav)], also_block=("onnxruntime",)
    )
    assert run.returncode == 0, run.stderr
    expected = edge_asr.load(bundle_int8, backend="tflite").transcribe(speech[0][1]).text
    assert json.loads(run.stdout)["text"] == expected
    bench = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_asr",
            "bench",
            "--json",
            "--runs",
            "1",
            "--backend",
            "ort",
            "--bundle",
            str(bundle_int8),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert bench.returncode != 0  # no refs.tsv: a one-line error, not a traceback
    assert bench.stderr.count("\n") == 1


def test_a_bundle_without_tflite_models_says_how_to_get_them(tmp_path, bundle_int8, speech):
    from edge_asr_build.speech.synth import write_wav
    from edge_asr_deploy.package import slim_bundle

    onnx_only = tmp_path / "onnx-only"
    slim_bundle(bundle_int8, onnx_only, ["onnx"])
    assert Bundle.load(onnx_only).formats == ["onnx"]
    wav = tmp_path / "s.wav"
    write_wav(wav, speech[0][1])
    run = subprocess.run(
        [sys.executable, "-m", "edge_asr", "transcribe", "--backend", "tflite", "--bundle", str(onnx_only), str(wav)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--formats tflite" in run.stderr
