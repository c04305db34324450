"""Dynamic audio context: the reference-matching pass, the dynamic-length encoder, LiteRT's length buckets,
the context policy, and that the 30 s model is what it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_asr.context import ContextPolicy

GOLDEN = Path(__file__).parent / "golden" / "full_context_transcripts.json"
DEFAULT_GOLDEN = Path(__file__).parent / "golden" / "default_transcripts.json"


def test_policy_pads_to_audio_plus_margin_rounded_to_a_bucket():
    policy = ContextPolicy.auto(margin_s=0.5, floor_s=1.0, buckets_s=(1, 2, 3, 5, 8, 12, 20, 30))
    assert policy.frames(int(0.3 * 16000)) == 100  # the floor
    assert policy.frames(int(1.6 * 16000)) == 300  # 2.1 s -> 3 s
    assert policy.frames(int(7.4 * 16000)) == 800  # 7.9 s -> 8 s
    assert policy.frames(30 * 16000) == 3000  # never past the last bucket
    assert ContextPolicy.full().frames(16000) == 3000
    assert ContextPolicy.parse("10").frames(16000) == 1000
    assert ContextPolicy.from_dict(policy.to_dict()) == policy
    assert ContextPolicy.from_dict(None) == ContextPolicy.full()  # bundles from before policies
    with pytest.raises(ValueError):
        ContextPolicy.parse("45")


def _student(tiny):
    import copy

    return copy.deepcopy(tiny.model)


def _one_second(frames, rng):
    return 100  # every clip here is under a second: the student sees a 1 s window, the reference 30 s


def test_reference_matching_lowers_the_held_out_loss(tiny, short_items):
    from edge_asr_build.matching.engine import MatchConfig, match_reference

    train, held = short_items
    config = MatchConfig(
        steps=30, batch_size=4, learning_rate=3e-4, warmup_steps=5, lora_rank=8, lora_alpha=8, eval_every=10
    )
    result = match_reference(_student(tiny), train, config, _one_second, held, log=lambda m: None)
    assert result.held_out_best < 0.9 * result.held_out_before
    assert result.trainable_parameters < 0.05 * tiny.model.parameter_count()  # only the adapters train


def test_two_seeded_runs_give_identical_weights(tiny, short_items, tmp_path):
    from edge_asr_build.matching.engine import MatchConfig, match_reference
    from edge_asr_build.matching.lora import read_delta, save_delta

    train, _ = short_items
    deltas = []
    for run in range(2):
        torch.manual_seed(1000 + run)  # what came before must not matter: the run seeds itself
        student = _student(tiny)
        config = MatchConfig(
            steps=100, batch_size=2, learning_rate=1e-4, warmup_steps=5, lora_rank=4, lora_alpha=4, seed=3
        )
        match_reference(student, train, config, _one_second, log=lambda m: None)
        deltas.append(read_delta(save_delta(student, tmp_path / f"run{run}.safetensors", {"rank": 4, "alpha": 4}))[0])
    assert deltas[0].keys() == deltas[1].keys()
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])
    assert any(deltas[0][k].abs().max() > 0 for k in deltas[0] if k.endswith("lora_b"))  # it did train


def test_a_delta_merges_into_the_same_function(tiny, tmp_path):
    from edge_asr_build.matching.lora import add_lora, apply_delta, save_delta

    adapted = _student(tiny)
    add_lora(adapted, 4, 4.0, ("encoder",))
    torch.manual_seed(0)
    for name, p in adapted.named_parameters():
        if name.endswith("lora_b"):
            p.data.normal_(0, 0.01)
    mel = torch.randn(1, 80, 200)
    with torch.no_grad():
        expected = adapted.encoder(mel)
    path = save_delta(adapted, tmp_path / "d.safetensors", {"rank": 4, "alpha": 4.0, "parts": ["encoder"]})
    merged = _student(tiny)
    apply_delta(merged, path)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged.encoder(mel), expected, atol=2e-3)  # the delta is stored as float16
    with pytest.raises(ValueError):
        apply_delta(tiny.model.decoder, path)  # layers the delta has no place for


def test_dynamic_length_encoder_matches_torch_at_three_lengths(tiny, tmp_path):
    import onnx
    import onnxruntime as ort

    from edge_asr_build.bundle.onnx_export import export_encoder

    path = export_encoder(tiny.model, tmp_path / "encoder.onnx", dynamic_length=True)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    # Self-attention is fused: no node holds a (T x T) score matrix of its own.
    assert ops.count("MultiHeadAttention") == tiny.model.dims.n_audio_layer and "Softmax" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for frames in (100, 800, 3000):
        mel = rng.normal(0, 0.5, (1, 80, frames)).astype(np.float32)
        ours = session.run(None, {"mel": mel})
        with torch.no_grad():
            cross = tiny.model.decoder.cross_kv(tiny.model.encoder(torch.from_numpy(mel)))
        reference = [t.numpy() for pair in cross for t in pair]
        assert ours[1].shape[-2] == frames // 2
        assert max(float(np.abs(a - b).max()) for a, b in zip(ours, reference)) <= 1e-3


def test_litert_picks_the_bucket_and_the_buckets_share_the_weights(tiny, tmp_path):
    from edge_asr.tflite_backend import _interpreter
    from edge_asr_build.bundle.tflite_export import EncoderGraph, Keywords, convert_signatures, encoder_signature

    graph = Keywords(EncoderGraph(tiny.model.eval()), ["mel"])
    one = convert_signatures(
        [(encoder_signature(100), graph, {"mel": torch.zeros(1, 80, 100)})], tmp_path / "one.tflite"
    )
    buckets = [100, 300, 800]
    three = convert_signatures(
        [(encoder_signature(f), graph, {"mel": torch.zeros(1, 80, f)}) for f in buckets], tmp_path / "three.tflite"
    )
    # Three signatures over one copy of the weights: the file grows by graph structure, not by 2 x 30 MB.
    assert three.stat().st_size < 1.1 * one.stat().st_size

    from edge_asr.tflite_backend import InterpreterWhisper

    backend = InterpreterWhisper.__new__(InterpreterWhisper)
    interpreter = _interpreter(three, 2)
    backend.encoders = {
        int(n.rsplit("_", 1)[1]): interpreter.get_signature_runner(n) for n in interpreter.get_signature_list()
    }
    backend.cross_names = [f"cross_{k}_{i}" for i in range(4) for k in ("k", "v")]
    assert sorted(backend.encoders) == buckets
    rng = np.random.default_rng(1)
    for frames in buckets:
        mel = rng.normal(0, 0.5, (80, frames)).astype(np.float32)
        cross = backend.encode(mel)
        with torch.no_grad():
            reference = tiny.model.decoder.cross_kv(tiny.model.encoder(torch.from_numpy(mel)[None]))
        assert cross[1].shape[-2] == frames // 2
        assert np.abs(cross[0] - reference[0][0].numpy()).max() < 1e-3
    from edge_asr.errors import EdgeAsrError

    with pytest.raises(EdgeAsrError):
        backend.encode(np.zeros((80, 500), np.float32))


def test_full_context_reproduces_the_transcripts_from_before_context_policies(bundle_int8):
    """Golden texts made by the runtime and build step as they were before context policies existed
    (commit 3db648e), on the same synthesized speech.

    Compared word by word after the WER normalizer, not character by character: the goldens come from
    another CPU, and its last float bits (in the synthesized audio, the mel, the dynamic activation
    scales) flip choices Whisper makes at near-ties, such as a full stop after a lone "7".  A broken
    window or mask changes words, which this still catches."""
    from edge_asr import Transcriber
    from edge_asr.metrics import normalize
    from edge_asr_build.speech.synth import synthesize

    golden = json.loads(GOLDEN.read_text())
    for backend in ("onnx", "tflite"):
        transcriber = Transcriber(bundle_int8, backend=backend)
        assert transcriber.context == ContextPolicy.full()
        texts = [transcriber.transcribe(synthesize(t)).text for t in golden["texts"]]
        assert [normalize(t) for t in texts] == [normalize(t) for t in golden["transcripts"][backend]], (backend, texts)


def test_default_bundle_reproduces_its_golden_transcripts(bundle_auto):
    """The default model as users run it (default decoding and the runtime's memory and thread settings:
    fused encoder attention, no spinning pools, LiteRT's shared weight cache) against transcripts made when
    it became the default (how: the file's "made_by"), on both backends; word by word after the WER
    normalizer, for the reason given above."""
    import edge_asr
    from edge_asr.metrics import normalize
    from edge_asr_build.speech.synth import synthesize

    golden = json.loads(DEFAULT_GOLDEN.read_text())
    audio = [synthesize(t) for t in golden["texts"]]
    for backend in ("onnx", "tflite"):
        transcriber = edge_asr.load(bundle_auto, backend=backend)
        texts = [transcriber.transcribe(a).text for a in audio]
        assert [normalize(t) for t in texts] == [normalize(t) for t in golden["transcripts"][backend]], (backend, texts)


def test_the_default_build_is_the_adapted_model_under_its_own_name():
    """`edge-asr build` with no flags makes the adapted dynamic-context tiny.en, whose name (a hash of delta
    and policy) is the runtime's default bundle; the 30 s model and a fixed context are named apart."""
    from edge_asr.paths import DEFAULT_BUNDLE, FULL_CONTEXT_BUNDLE
    from edge_asr_build.commands.whisper import default_bundle_name, default_context
    from edge_asr_build.matching.lora import read_delta
    from edge_asr_build.recipes.adapt import DEFAULT_DELTA

    assert default_context("tiny.en", compact=False, delta=None) == "auto"
    assert default_context("tiny.en", compact=True, delta=None) == "full"  # no compact delta for it yet
    assert default_context("base", compact=False, delta=None) == "full"  # no delta shipped for base
    assert default_context("base", compact=False, delta="d.safetensors") == "auto"
    auto = default_bundle_name("tiny.en", "int8", context="auto")
    assert auto == DEFAULT_BUNDLE and auto.startswith("tiny.en-auto-") and auto.endswith("-int8")
    assert default_bundle_name("tiny.en", "int8", context="full") == FULL_CONTEXT_BUNDLE == "tiny.en-int8"
    assert len({auto, default_bundle_name("tiny.en", "int8", context="10"), FULL_CONTEXT_BUNDLE}) == 3
    assert DEFAULT_DELTA.stat().st_size < 10e6
    _, metadata = read_delta(DEFAULT_DELTA)
    assert metadata["kind"] == "context-lora" and metadata["recipe"]["match"]["seed"] == 0
    assert {c["licence"] for c in metadata["corpora"]} == {"CC BY 4.0", "Apache-2.0"}


def test_dynamic_bundle_transcribes_on_short_windows(bundle_auto, speech):
    import jiwer

    from edge_asr import Transcriber
    from edge_asr.metrics import normalize
    from edge_asr_build.speech.synth import synthesize

    for backend in ("onnx", "tflite"):
        transcriber = Transcriber(bundle_auto, backend=backend)
        seen = []
        encode = transcriber.model.encode
        transcriber.model.encode = lambda mel: seen.append(mel.shape[-1]) or encode(mel)
        texts = [transcriber.transcribe(audio).text for _, audio in speech]
        assert all(frames < 1000 for frames in seen), seen  # 3-6 s sentences: windows of 5 or 8 s, not 30
        wer = jiwer.wer([normalize(t) for t, _ in speech], [normalize(t) for t in texts])
        assert wer < 0.15, (backend, texts)
        digit = transcriber.transcribe(synthesize("Seven.")).text
        assert seen[-1] == 300 and 1 <= len(digit.split()) <= 3, digit  # the 3 s floor


def test_adapted_bundle_decodes_short_windows_with_beams_unless_told_otherwise(bundle_auto):
    """The manifest recommends beam 5 up to 5 s of audio; longer windows stay greedy, and a width the user
    gives (0: greedy) holds for every window. Both backends follow it."""
    import edge_asr
    from edge_asr.settings import DecodingSettings
    from edge_asr_build.speech.synth import synthesize

    assert json.loads((bundle_auto / "manifest.json").read_text())["decoding"]["short_window_beam"] == {
        "max_seconds": 5.0,
        "beam_size": 5,
    }
    command = synthesize("Open valve four.")
    for backend in ("onnx", "tflite"):
        default = edge_asr.load(bundle_auto, backend=backend)
        assert default.decoder.options.beam_size == 1 and default.short_decoder.options.beam_size == 5
        assert default.decoder_for(5 * 16000) is default.short_decoder
        assert default.decoder_for(5 * 16000 + 1) is default.decoder
        beams = edge_asr.load(bundle_auto, settings=DecodingSettings(beam=5), backend=backend)
        assert default.transcribe(command).text == beams.transcribe(command).text
        for beam in (0, 3):
            chosen = edge_asr.load(bundle_auto, settings=DecodingSettings(beam=beam), backend=backend)
            assert chosen.short_decoder is None and chosen.decoder.options.beam_size == max(1, beam)
            assert chosen.decoder_for(16000) is chosen.decoder


def test_litert_compiled_model_path_computes_what_the_interpreter_path_computes(bundle_auto):
    """ai-edge-litert's CompiledModel API (one packed copy of the weights for every bucket) against the
    Interpreter API (tflite-runtime's, one copy per bucket), on windows of two lengths in turn, so that the
    second window decodes over the first one's stale, masked cache slots."""
    from edge_asr.bundle import Bundle
    from edge_asr.tflite_backend import CompiledWhisper, InterpreterWhisper, whisper_model

    bundle = Bundle.load(bundle_auto)
    compiled, interpreted = whisper_model(bundle, 2), InterpreterWhisper(bundle, 2)
    assert isinstance(compiled, CompiledWhisper)
    rng = np.random.default_rng(3)
    tokens = [50257, 50362, 383, 1110, 286, 262, 4252]
    for frames in (800, 100):
        mel = rng.normal(0, 0.5, (80, frames)).astype(np.float32)
        cross = compiled.encode(mel), interpreted.encode(mel)
        assert cross[0][1].shape[-2] == frames // 2
        assert max(np.abs(a - b).max() for a, b in zip(*cross)) < 1e-4
        (first, filled), (reference, reference_filled) = (
            m.decode(tokens[:-1], 0, c) for m, c in zip((compiled, interpreted), cross)
        )
        assert filled == reference_filled == len(tokens) - 1
        assert np.abs(first - reference).max() < 1e-3
        last = compiled.decode(tokens[-1:], filled, cross[0])[0]
        assert np.abs(last - interpreted.decode(tokens[-1:], filled, cross[1])[0]).max() < 1e-3


def test_build_with_no_flags_makes_the_adapted_model(bundle_auto):
    """`edge-asr build` with no model flags (what the fixture ran) makes the adapted model."""
    manifest = json.loads((bundle_auto / "manifest.json").read_text())
    assert ContextPolicy.from_dict(manifest["frontend"]["context"]) == ContextPolicy.auto()
    assert manifest["decoding"]["short_window_beam"]["beam_size"] > 1 and "adaptation" in manifest
