"""Decoding that operators can trust: the guards against text from silence, noise and loops, beam search
with its reordered cache, the tokenizer's encoder behind prompts and hotwords, timestamps and subtitles."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from noise_signals import CASES

from edge_asr.decoding import DecodingOptions, forced_decoding, log_softmax
from edge_asr.frontend import window_features
from edge_asr.guards import Guards, compression_ratio, loop_start
from edge_asr.hotwords import TokenBias, read_word_list
from edge_asr.metrics import word_error_rate
from edge_asr.results import Segment, Transcript
from edge_asr.transcriber import Transcriber
from edge_asr.writers import to_srt, to_vtt


@pytest.fixture(scope="module")
def guarded(bundle_int8):
    return {gate: Transcriber(bundle_int8, guards=Guards(vad_gate=gate)) for gate in (False, True)}


@pytest.mark.parametrize("vad_gate", [False, True], ids=["model-gate", "model-and-vad-gate"])
@pytest.mark.parametrize("case", list(CASES))
def test_no_text_from_silence_noise_hum_or_music(guarded, case, vad_gate):
    t = guarded[vad_gate].transcribe(CASES[case]())
    assert t.text == "" and t.segments == []


def test_without_guards_the_model_writes_words_nobody_said(transcriber_int8, bundle_int8):
    """What the guards are for: the same audio gives text with them off."""
    unguarded = Transcriber(bundle_int8, guards=Guards.off())
    texts = [unguarded.transcribe(CASES[c]()).text for c in ("silence-65s", "pink-20dBFS", "music-10s")]
    assert all(texts), texts


def test_guards_keep_speech_as_it_was(guarded, bundle_int8, speech):
    unguarded = Transcriber(bundle_int8, guards=Guards.off())
    for text, audio in speech:
        plain = unguarded.transcribe(audio).text
        assert guarded[False].transcribe(audio).text == plain
        assert guarded[True].transcribe(audio).text == plain
        assert word_error_rate([text], [plain]) <= 25


def test_loops_and_compression_ratio():
    assert loop_start([5, 1, 2, 3, 4] * 4) == 5  # one copy of the repeated span is kept
    assert loop_start([7] * 12) == 1 and loop_start([7] * 11) is None
    assert loop_start([9, 9, 1, 9, 9, 1]) is None  # short repetitions are speech ("check, check, check")
    assert loop_start(list(range(40))) is None
    assert (
        compression_ratio("the pump is hot " * 20)
        > 2.4
        > compression_ratio("Replace the hydraulic filter on press number four before the night shift.")
    )


def test_fallback_sampling_is_seeded_and_counted(bundle_int8, speech):
    """A threshold every result fails makes each window go through all temperatures; the same seed gives
    the same text."""
    always = Guards(compression_ratio_threshold=0.0)
    texts = []
    for _ in range(2):
        t = Transcriber(bundle_int8, guards=always, seed=3)
        texts.append(t.transcribe(speech[0][1]).text)
        assert t.counters.fallbacks == len(always.temperatures) - 1
    assert texts[0] == texts[1] and texts[0]


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_beam_search_scores_match_a_fresh_teacher_forced_pass(bundle_fp32, speech, backend):
    """ONNX Runtime runs the beams as one batched decoder call per step, LiteRT one beam after another from
    each beam's own cache rows; either way beams swap cache rows as they overtake each other, and the
    winner's score must equal the log-probability of its tokens decoded alone from scratch. (In fp32:
    int8's dynamic quantization scales activations per batch, so a beam's numbers depend on its company.)"""
    t = Transcriber(bundle_fp32, options=DecodingOptions(beam_size=5), guards=Guards.off(), backend=backend)
    mel = window_features(speech[1][1], t.bundle.mel_filters)
    window = t.decoder.prefill(mel)
    result = t.decoder.decode(window)
    assert t.decoder.decode(window, temperature=0.0).tokens == result.tokens  # the runtime's cache was left usable
    _, logits, _ = forced_decoding(t.model, mel, t.decoder.prompt, result.tokens + [t.decoder.eot])
    rules = t.decoder.rules
    total = sum(
        float(log_softmax(rules.apply(logits[i], result.tokens[:i]))[token])
        for i, token in enumerate(result.tokens + [t.decoder.eot])
    )
    assert total == pytest.approx(result.sum_logprob, abs=2e-3)


def test_a_beam_of_one_is_greedy_and_beams_transcribe(bundle_int8, speech):
    greedy = Transcriber(bundle_int8, guards=Guards.off())
    assert (
        Transcriber(bundle_int8, options=DecodingOptions(beam_size=1), guards=Guards.off())
        .transcribe(speech[1][1])
        .text
        == greedy.transcribe(speech[1][1]).text
    )
    beam_hyps = [Transcriber(bundle_int8, options=DecodingOptions(beam_size=5)).transcribe(a).text for _, a in speech]
    assert word_error_rate([s for s, _ in speech], beam_hyps) < 15


def test_tokenizer_encodes_as_whisper_does(transcriber_int8):
    from whisper.tokenizer import get_tokenizer

    reference = get_tokenizer(multilingual=False)
    for text in [
        " Replace the KX-40 seal, then call Brennholt's 2nd shift at 06:30!",
        "naïve  über  日本",
        "a_b __x._y",
        "Mr. O'Neill ordered 1,250 units @ 50%.\n",
        " x",
    ]:
        assert transcriber_int8.tokenizer.encode(text) == reference.encode(text)
        assert transcriber_int8.tokenizer.decode(transcriber_int8.tokenizer.encode(text)) == text


def test_hotword_bias_favours_starts_and_continuations(transcriber_int8):
    tokenizer = transcriber_int8.tokenizer
    bias = TokenBias(["Kestrolix"], tokenizer, 2.0)
    spelled = tokenizer.encode(" Kestrolix")
    logits = np.zeros(tokenizer.eot + 1, np.float32)
    bias.apply(logits, tokenizer.encode(" the"))
    assert logits[spelled[0]] == 2.0 and logits[spelled[1]] == 0.0
    logits[:] = 0
    bias.apply(logits, tokenizer.encode(" the") + spelled[:1])
    assert logits[spelled[1]] == 2.0


def test_hotwords_find_a_name_the_model_misses(bundle_int8):
    import edge_asr
    from edge_asr.settings import DecodingSettings
    from edge_asr_build.speech.synth import synthesize

    audio = synthesize("Fit a new seal on the Kestrolix pump before lunch.")
    plain = edge_asr.load(bundle_int8).transcribe(audio).text
    favoured = (
        edge_asr.load(bundle_int8, settings=DecodingSettings(hotwords=["Kestrolix", "Vantorq"])).transcribe(audio).text
    )
    assert "Kestrolix" not in plain and "Kestrolix" in favoured, (plain, favoured)
    assert (
        edge_asr.load(bundle_int8, settings=DecodingSettings(hotwords=["Kestrolix"]))
        .transcribe(CASES["silence-5s"]())
        .text
        == ""
    )


def test_word_lists(tmp_path):
    (tmp_path / "words.txt").write_text("Kestrolix\n# suppliers\nBrennholt  # the Hamburg one\n\nKX-40\n")
    assert read_word_list("Vantorq, KX-40", str(tmp_path / "words.txt")) == [
        "Vantorq",
        "KX-40",
        "Kestrolix",
        "Brennholt",
    ]
    assert read_word_list(f"@{tmp_path / 'words.txt'}") == ["Kestrolix", "Brennholt", "KX-40"]


def _parse_subtitles(text: str, decimal: str) -> list[tuple[float, float, str]]:
    stamp = rf"(\d\d):(\d\d):(\d\d){re.escape(decimal)}(\d\d\d)"
    cues = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        if lines[0] == "WEBVTT":
            continue
        if decimal == ",":
            assert lines[0].isdigit() and int(lines[0]) == len(cues) + 1
            lines = lines[1:]
        m = re.fullmatch(rf"{stamp} --> {stamp}", lines[0])
        assert m, lines[0]
        h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, m.groups())
        cues.append(
            (h1 * 3600 + m1 * 60 + s1 + ms1 / 1000, h2 * 3600 + m2 * 60 + s2 + ms2 / 1000, "\n".join(lines[1:]))
        )
    return cues


def test_srt_and_vtt_parse_back():
    segments = [Segment(0.0, 2.5, "Check the pump."), Segment(2.5, 3661.042, "Then the valve, twice.")]
    t = Transcript("", 3700.0, 1.0, 1.0, segments)
    vtt = to_vtt(t)
    assert vtt.startswith("WEBVTT\n\n")
    for text, decimal in ((to_srt(t), ","), (vtt, ".")):
        assert _parse_subtitles(text, decimal) == [(s.start, s.end, s.text) for s in segments]


def test_timestamps_fall_in_the_pauses_between_sentences(bundle_int8):
    """Multi-sentence dictation (piper, pauses of 0.3-1.0 s): segment boundaries within 0.5 s of the pauses,
    and about one segment per sentence."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "benchmarks"))
    from timestamps import TOLERANCE_S, boundary_errors, dictation

    from edge_asr_build.speech.sentences import dictation_sentences
    from edge_asr_build.speech.synth import synthesize

    t = Transcriber(bundle_int8, options=DecodingOptions(timestamps=True))
    rng = np.random.default_rng(11)
    errors, segments, sentences = [], 0, 0
    texts = dictation_sentences(10, seed=11)
    for part in (texts[:5], texts[5:]):
        audio, pauses = dictation(part, rng, synthesize)
        result = t.transcribe(audio)
        assert all(a.end <= b.start + 1e-6 for a, b in zip(result.segments, result.segments[1:]))
        errors += boundary_errors(pauses, result.segments)
        segments += len(result.segments)
        sentences += len(part)
    assert sum(e <= TOLERANCE_S for e in errors) >= 0.9 * len(errors), errors
    assert segments <= 1.1 * sentences


def test_cli_formats(bundle_int8, tmp_path, speech):
    from edge_asr_build.speech.synth import write_wav

    wav = tmp_path / "two.wav"
    write_wav(wav, np.concatenate([speech[0][1], np.zeros(12000, np.float32), speech[1][1]]))

    def cli(*args):
        run = subprocess.run(
            [sys.executable, "-m", "edge_asr", "transcribe", "--bundle", str(bundle_int8), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    out = json.loads(cli("--format", "json", "--timestamps", str(wav)))
    assert len(out["segments"]) >= 2
    for s in out["segments"]:
        assert {"start", "end", "text", "avg_logprob", "no_speech_prob"} <= set(s)
        assert s["avg_logprob"] < 0 and 0 <= s["no_speech_prob"] < 0.6
    assert len(_parse_subtitles(cli("--format", "srt", str(wav)), ",")) == len(out["segments"])
    cli("--format", "vtt", "--output-dir", str(tmp_path / "subs"), str(wav))
    assert [c[2] for c in _parse_subtitles((tmp_path / "subs" / "two.vtt").read_text(), ".")] == [
        s["text"] for s in out["segments"]
    ]
