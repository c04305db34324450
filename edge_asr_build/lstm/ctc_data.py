"""Training data for LSTM-CTC models: texts we write, spoken by many synthetic voices, then augmented.

Nothing recorded is needed. Texts are digits, numbers, commands and dictation from templates; voices are
piper (neural, one speaker, varied prosody) and espeak-ng (formant synthesis: eight English accents times
dozens of voice variants, pitches and rates). A few accents and variants are never used for training, so
a held-out set can be spoken by a voice the model has not heard.

Labels are the text's spoken form over a character alphabet: numbers become words ("42" -> "forty two"),
punctuation other than the apostrophe goes.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_asr.ctc import ALPHABET
from edge_asr_build.speech.sentences import _COMMANDS, _MACHINES, _NUMBER_WORDS, dictation_sentences
from edge_asr_build.speech.synth import espeak, espeak_available, synthesize, write_wav

ESPEAK_ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd", "en-us-nyc"]
ESPEAK_VARIANTS = [
    "m1",
    "m2",
    "m3",
    "m5",
    "m6",
    "m7",
    "m8",
    "f1",
    "f2",
    "f3",
    "f5",
    "klatt",
    "klatt2",
    "klatt3",
    "Alex",
    "Annie",
    "Denis",
    "Gene",
    "Jacky",
    "Mike",
    "Tweaky",
    "adam",
    "anika",
    "aunty",
    "boris",
    "caleb",
    "david",
    "ed",
    "edward",
    "grandma",
    "grandpa",
    "iven",
    "john",
    "linda",
    "max",
    "michel",
    "norbert",
    "paul",
    "pedro",
    "quincy",
    "rob",
    "robert",
    "steph",
    "travis",
    "victor",
    "zac",
]
# Never used for training: the held-out voice is one of these accents with one of these variants.
HELD_OUT_ACCENTS = ["en-029"]
HELD_OUT_VARIANTS = ["f4", "m4", "Andy"]

EXTRA_COMMANDS = [
    "yes",
    "no",
    "stop",
    "go",
    "start",
    "cancel",
    "repeat",
    "next",
    "previous",
    "up",
    "down",
    "left",
    "right",
    "on",
    "off",
    "pause",
    "resume",
    "confirm",
    "help",
    "back",
    "enter",
    "delete",
    "okay",
    "open",
    "close",
    "save",
    "undo",
    "louder",
    "quieter",
    "select",
]


@dataclass(frozen=True)
class Voice:
    engine: str  # "piper" or "espeak"
    name: str = ""  # espeak: accent+variant
    rate: float = 1.0  # piper: length scale; espeak: words per minute / 175
    pitch: int = 50  # espeak only, 0-99

    def __str__(self) -> str:
        return (
            f"piper:joe@{self.rate:.2f}"
            if self.engine == "piper"
            else f"espeak:{self.name}@{self.rate:.2f},p{self.pitch}"
        )


def spoken_form(text: str) -> str:
    """The label a CTC model is trained on: lower case, numbers as words, only letters, space and '."""
    from num2words import num2words

    text = re.sub(r"\d+", lambda m: " " + num2words(int(m.group())) + " ", text.lower())
    text = text.replace("&", " and ").replace("-", " ")
    text = "".join(c if c in ALPHABET else " " for c in text)
    return " ".join(text.split())


def digit_texts(n: int, rng: random.Random) -> list[str]:
    """Half isolated digits, half strings of two to six digits, as words."""
    out = []
    for i in range(n):
        count = 1 if i % 2 == 0 else rng.randrange(2, 7)
        out.append(" ".join(rng.choice(_NUMBER_WORDS) for _ in range(count)))
    return out


def number_texts(n: int, rng: random.Random) -> list[str]:
    forms = ["{n}", "{n}", "number {n}", "{n} degrees", "{n} hours", "set it to {n}", "{n} percent", "line {n}"]
    return [
        rng.choice(forms).format(n=rng.choice([rng.randrange(10, 100), rng.randrange(100, 2000)])) for _ in range(n)
    ]


def command_texts(n: int, rng: random.Random) -> list[str]:
    phrases = (
        EXTRA_COMMANDS
        + [c.rstrip(".") for c in _COMMANDS]
        + [f"{v} {m}" for v in ("check", "restart", "stop") for m in _MACHINES]
    )
    return [rng.choice(phrases) for _ in range(n)]


def training_texts(n: int, seed: int = 0) -> list[str]:
    """`n` texts: 40% digits, 10% numbers, 10% commands, 40% dictation sentences."""
    rng = random.Random(seed)
    n_digits, n_numbers, n_commands = int(0.4 * n), int(0.1 * n), int(0.1 * n)
    texts = (
        digit_texts(n_digits, rng)
        + number_texts(n_numbers, rng)
        + command_texts(n_commands, rng)
        + dictation_sentences(n - n_digits - n_numbers - n_commands, seed)
    )
    rng.shuffle(texts)
    return texts


def training_voices(count: int, seed: int = 0, piper_share: float = 0.35) -> list[Voice]:
    """`count` voices: a share of piper at varied rates, the rest espeak-ng accents x variants x pitch x rate."""
    rng = random.Random(seed)
    use_espeak = espeak_available()
    voices = []
    for _ in range(count):
        if not use_espeak or rng.random() < piper_share:
            voices.append(Voice("piper", rate=rng.uniform(0.8, 1.3)))
        else:
            voices.append(
                Voice(
                    "espeak",
                    f"{rng.choice(ESPEAK_ACCENTS)}+{rng.choice(ESPEAK_VARIANTS)}",
                    rate=rng.uniform(0.75, 1.2),
                    pitch=rng.randrange(25, 80),
                )
            )
    return voices


def held_out_voice(kind: str = "unseen-accent") -> Voice:
    """A voice training never uses: "unseen-accent" (an accent and a variant outside the training pools; hard
    even for Whisper) or "unseen-variant" (American English with a variant outside the pools)."""
    if kind == "unseen-variant":
        return Voice("espeak", f"en-us+{HELD_OUT_VARIANTS[1]}", rate=1.0, pitch=45)
    return Voice("espeak", f"{HELD_OUT_ACCENTS[0]}+{HELD_OUT_VARIANTS[0]}", rate=0.95, pitch=55)


def speak(text: str, voice: Voice) -> np.ndarray:
    """16 kHz mono float32 audio of `text` in `voice`."""
    if voice.engine == "piper":
        return synthesize(text, length_scale=voice.rate, noise_scale=0.667, noise_w_scale=0.8)
    return espeak(text, voice.name, rate=int(175 * voice.rate), pitch=voice.pitch)


def _speak_item(item: tuple[str, Path, str, Voice]) -> str:
    uid, folder, text, voice = item

    write_wav(folder / f"{uid}.wav", speak(text, voice))
    return uid


def corpus_key(texts: list[str], voices: list[Voice]) -> str:
    digest = hashlib.sha256("\n".join(f"{t}|{v}" for t, v in zip(texts, voices)).encode()).hexdigest()
    return digest[:12]


def synthesize_corpus(
    texts: list[str], voices: list[Voice], folder: Path, workers: int = 2, progress: bool = True
) -> Path:
    """Speak texts[i] with voices[i] into `folder` (wav files, refs.tsv, and voices.tsv naming each
    utterance's voice), once."""
    folder = Path(folder)
    if (folder / "refs.tsv").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    items = [(f"utt{i:05d}", folder, t, v) for i, (t, v) in enumerate(zip(texts, voices))]
    uids = parallel_map(_speak_item, items, workers, progress, "synthesize", chunksize=16)
    (folder / "voices.tsv").write_text("".join(f"{u}\t{v}\n" for u, v in zip(uids, voices)), encoding="utf-8")
    (folder / "refs.tsv.tmp").write_text("".join(f"{u}\t{t}\n" for u, t in zip(uids, texts)), encoding="utf-8")
    (folder / "refs.tsv.tmp").replace(folder / "refs.tsv")  # written last: its presence means complete
    return folder


def progress_bar(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="utt")


def parallel_map(fn, items: list, workers: int, progress: bool, desc: str, chunksize: int = 16) -> list:
    """[fn(item) for item in items], in `workers` processes (spawned: torch and piper do not fork well)."""
    if workers <= 1:
        return list(progress_bar(map(fn, items), len(items), progress, desc))
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return list(progress_bar(pool.imap(fn, items, chunksize=chunksize), len(items), progress, desc))


def read_corpus(folder: Path) -> list[tuple[Path, str]]:
    """(wav path, text) for every line of a corpus' refs.tsv."""
    folder = Path(folder)
    items = []
    for line in (folder / "refs.tsv").read_text(encoding="utf-8").splitlines():
        if line.strip():
            uid, text = line.split("\t")
            items.append((folder / f"{uid}.wav", text))
    return items


def training_corpus(count: int, seed: int = 0, progress: bool = True) -> Path:
    """`count` training texts, each in its own voice, synthesized once into the cache."""
    from edge_asr.paths import home

    texts, voices = training_texts(count, seed), training_voices(count, seed)
    folder = home() / "synth" / f"ctc-train-{count}-{corpus_key(texts, voices)}"
    return synthesize_corpus(texts, voices, folder, progress=progress)


def held_out_corpus(count: int = 200, seed: int = 1000, progress: bool = True, voice: str = "unseen-accent") -> Path:
    """Dictation, digits and commands the training set does not contain, in a voice it never uses:
    the measure of open-vocabulary use on unseen text and an unheard voice."""
    from edge_asr.paths import home

    rng = random.Random(seed)
    seen = set(training_texts(8000, 0))  # every training corpus of up to 8000 texts with seed 0
    sentences = [s for s in dictation_sentences(count * 4, seed) if s not in seen][: count // 2]
    texts = sentences + digit_texts(count // 4, rng) + number_texts(count - len(sentences) - count // 4, rng)
    voices = [held_out_voice(voice)] * len(texts)
    folder = home() / "synth" / f"ctc-heldout-{count}-{corpus_key(texts, voices)}"
    return synthesize_corpus(texts, voices, folder, progress=progress)
