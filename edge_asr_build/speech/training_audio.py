"""Training audio for reference matching: varied speech, no labels needed.

Reference matching learns from the reference model's own outputs, so any speech will do; what matters is
that it varies the way recorded speech does. A mix is drawn from:

  synthesized  piper (the default voice, with its prosody noise and several rates) and espeak-ng (several
               accents and voice variants, rates and pitches), speaking sentences and short utterances we
               wrote (`sentences`);
  recorded     folders of real recordings, used unlabelled: the recipe names speechocean762 (read English
               by Mandarin speakers, adults and children, CC BY 4.0) and the wake-word benchmark's keyword
               clips (Apache-2.0); `--audio DIR` adds a user's own;
  long         several clips joined with pauses, up to 28 s: what a 30 s window holds;
  isolated     single words, digits and commands cut tight, as isolated-word recordings are;
  non-speech   silence and noise, so the adapted model keeps the reference's behaviour where nobody speaks.

Most clips are then augmented (`augment.MATCHING`; isolated words `augment.ISOLATED`).
Held-out sets for model selection use voices and sentences the mix never has, and recorded speakers it
never hears.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge_asr.audio import SAMPLE_RATE, load_audio
from edge_asr_build.speech.augment import ISOLATED, MATCHING, augment, non_speech
from edge_asr_build.speech.sentences import dictation_sentences, general_sentences, short_phrases
from edge_asr_build.speech.synth import espeak, espeak_available, synthesize

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
# espeak-ng voices (language + variant). Training and held-out sets never share one.
ESPEAK_TRAIN_VOICES = [
    "en-us+m1",
    "en-us+f2",
    "en-gb+m3",
    "en-gb-x-rp+f1",
    "en-029+m2",
    "en-us-nyc+m4",
    "en-gb-scotland+f3",
    "en-us+klatt2",
]
ESPEAK_HELD_OUT_VOICES = ["en-us+f4", "en-gb+m7", "en-gb-x-rp+f5"]


@dataclass
class Clip:
    audio: np.ndarray  # 16 kHz mono float32
    kind: str  # synthesized, short, recorded, long, non-speech, user
    text: str | None = None  # the words, where known (held-out sets measure WER with it)


@dataclass(frozen=True)
class AudioMix:
    """How many clips of each kind a training set has."""

    piper_sentences: int = 240
    espeak_sentences: int = 160
    short_utterances: int = 300  # 0.3-1.5 s: digits, words, commands (piper and espeak-ng)
    recorded: int = 400  # from the recorded corpora, spread over their speakers
    long_windows: int = 50
    non_speech: int = 50
    user: int = 400  # at most this many clips from --audio
    augment_share: float = 0.8  # clips that get augmented (the rest stay clean)
    seed: int = 0
    # Isolated words as people record them: tightly cut (at most 0.2 s of silence around the word), a third
    # of them in the telephone band. Their own set, so that the rest of the mix is made (and cached) as before.
    isolated_words: int = 500

    def to_dict(self) -> dict:
        return asdict(self)

    def main_clips(self) -> int:
        """Clips in the main set, --audio aside."""
        return (
            self.piper_sentences
            + self.espeak_sentences
            + self.short_utterances
            + self.recorded
            + self.long_windows
            + self.non_speech
        )

    def main_dict(self) -> dict:
        """What the main set (`training_clips`) depends on."""
        return {k: v for k, v in asdict(self).items() if k != "isolated_words"}


# --- synthesis --------------------------------------------------------------------------------------------------


def piper(text: str, rng: random.Random) -> np.ndarray:

    # piper's own prosody and voice noise (0.667 and 0.8 are its usual scales), at random rates
    return synthesize(
        text,
        length_scale=rng.uniform(0.8, 1.25),
        noise_scale=rng.uniform(0.3, 0.9),
        noise_w_scale=rng.uniform(0.4, 1.0),
    )


def _espeak_random(text: str, voices: list[str], rng: random.Random) -> np.ndarray:
    return espeak(text, rng.choice(voices), rate=rng.randrange(120, 200), pitch=rng.randrange(25, 75))


def _either_voice(i: int, text: str, rng: random.Random) -> np.ndarray:
    """Utterance i of a set spoken half by piper, half by espeak-ng (all piper where espeak-ng is missing)."""
    if i % 2 and espeak_available():
        return _espeak_random(text, ESPEAK_TRAIN_VOICES, rng)
    return piper(text, rng)


# --- recorded corpora ---------------------------------------------------------------------------------------------


def audio_files(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    return files


def speechocean_split(root: Path, split: str) -> dict[str, tuple[Path, str]]:
    """utterance id -> (wav, transcript) of one speechocean762 split ("train" or "test"; disjoint speakers)."""
    root = Path(root)
    wavs = {p.stem: p for p in (root / "WAVE").rglob("*") if p.suffix.lower() == ".wav"}
    out = {}
    for line in (root / split / "text").read_text(encoding="utf-8").splitlines():
        uid, _, text = line.partition("\t") if "\t" in line else line.partition(" ")
        if uid in wavs:
            out[uid] = (wavs[uid], text.strip())
    return out


def recorded_files(corpus: Path, held_out: bool = False) -> list[tuple[Path, str | None]]:
    """The files of a recorded corpus folder, with transcripts where the corpus has them.

    speechocean762 (a folder with WAVE/ and train/text): its train speakers, or with `held_out` its test
    speakers. The wake-word benchmark (a folder of one folder per keyword): every keyword but "smart mirror",
    or with `held_out` that one. Any other folder: all its audio, unlabelled (never held out)."""
    corpus = Path(corpus)
    if (corpus / "WAVE").is_dir() and (corpus / "train" / "text").exists():
        return list(speechocean_split(corpus, "test" if held_out else "train").values())
    keyword_dirs = [d for d in corpus.iterdir() if d.is_dir()] if corpus.is_dir() else []
    if (corpus / "smart mirror").is_dir():
        chosen = [d for d in keyword_dirs if (d.name == "smart mirror") == held_out]
        return [(p, d.name) for d in chosen for p in audio_files(d)]
    return [] if held_out else [(p, None) for p in audio_files(corpus)]


# --- the mixes ----------------------------------------------------------------------------------------------------


def _take(items: list, count: int, rng: random.Random) -> list:
    items = list(items)
    rng.shuffle(items)
    return items[:count]


def _spread(files: list[tuple[Path, str | None]], count: int, rng: random.Random) -> list[tuple[Path, str | None]]:
    """`count` files, spread evenly over the corpus' folders (its speakers or keywords)."""
    by_folder: dict[Path, list] = {}
    for item in files:
        by_folder.setdefault(item[0].parent, []).append(item)
    for group in by_folder.values():
        rng.shuffle(group)
    out, groups = [], list(by_folder.values())
    while len(out) < count and any(groups):
        for group in groups:
            if group and len(out) < count:
                out.append(group.pop())
    return out


def training_clips(mix: AudioMix, corpora: list[Path] = (), user_audio: list[Path] = (), progress=None) -> list[Clip]:
    """The training set of `mix`: clean clips made or read, then augmented. `progress(iterable, desc)` wraps
    the slow loops (tqdm)."""

    progress = progress or (lambda items, desc: items)
    rng = random.Random(mix.seed)
    clean: list[Clip] = []
    sentences = dictation_sentences(mix.piper_sentences + mix.espeak_sentences, seed=100 + mix.seed)
    short = short_phrases(mix.short_utterances, seed=100 + mix.seed)
    use_espeak = espeak_available()
    for i, text in enumerate(progress(sentences, "synthesize sentences")):
        by_espeak = use_espeak and i >= mix.piper_sentences
        audio = _espeak_random(text, ESPEAK_TRAIN_VOICES, rng) if by_espeak else piper(text, rng)
        clean.append(Clip(audio, "synthesized", text))
    for i, text in enumerate(progress(short, "synthesize short utterances")):
        clean.append(Clip(_either_voice(i, text, rng), "short", text))
    recorded = [item for corpus in corpora for item in recorded_files(corpus)]
    for path, text in progress(_spread(recorded, mix.recorded, rng), "read recorded speech"):
        clean.append(Clip(load_audio(path)[: 28 * SAMPLE_RATE], "recorded", text))
    user = [(p, None) for folder in user_audio for p in audio_files(folder)]
    for path, _ in progress(_take(user, mix.user, rng), "read --audio"):
        audio = load_audio(path)
        start = rng.randrange(max(1, len(audio) - 28 * SAMPLE_RATE))  # long recordings: a random 28 s
        clean.append(Clip(audio[start : start + 28 * SAMPLE_RATE], "user"))
    np_rng = np.random.default_rng(mix.seed)
    speech = [c.audio for c in clean]
    clips = [
        Clip(
            augment(c.audio, np_rng, MATCHING, speech) if np_rng.random() < mix.augment_share else c.audio,
            c.kind,
            c.text,
        )
        for c in progress(clean, "augment")
    ]
    for _ in range(mix.long_windows):
        parts, total = [], 0
        target = rng.uniform(10, 28) * SAMPLE_RATE
        while True:
            clip = clips[rng.randrange(len(clips))]
            if total + len(clip.audio) > target and parts:
                break
            pause = np.zeros(int(rng.uniform(0.2, 1.2) * SAMPLE_RATE), np.float32)
            parts += [clip.audio[: int(target)], pause]
            total += len(clip.audio) + len(pause)
        clips.append(Clip(np.concatenate(parts)[: 29 * SAMPLE_RATE], "long"))
    clips += [Clip(non_speech(np_rng), "non-speech") for _ in range(mix.non_speech)]
    return clips


def cut_tight(audio: np.ndarray) -> np.ndarray:
    """A synthesized utterance without its leading and trailing silence (from the first to the last sample
    above 2% of its peak)."""
    voiced = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    return audio[voiced[0] : voiced[-1] + 1] if len(voiced) else audio


def isolated_word_clips(mix: AudioMix, progress=None) -> list[Clip]:
    """`mix.isolated_words` digits, words and commands by piper and espeak-ng, cut tight and augmented."""

    progress = progress or (lambda items, desc: items)
    rng, np_rng = random.Random(mix.seed + 1), np.random.default_rng(mix.seed + 1)
    clips = []
    for i, text in enumerate(
        progress(short_phrases(mix.isolated_words, seed=200 + mix.seed), "synthesize isolated words")
    ):
        audio = cut_tight(_either_voice(i, text, rng))
        clips.append(Clip(augment(audio, np_rng, ISOLATED), "isolated", text))
    return clips


@dataclass(frozen=True)
class HeldOutMix:
    """Selection sets: synthesized sentences by espeak-ng voices training never uses, and recorded speakers
    (and a keyword) training never hears; all with transcripts, so WER can be measured too."""

    sentences: int = 30
    short_utterances: int = 30
    recorded: int = 60
    seed: int = 7

    def to_dict(self) -> dict:
        return asdict(self)


def held_out_clips(mix: HeldOutMix, corpora: list[Path] = ()) -> dict[str, list[Clip]]:
    """{"synthesized": [...], "recorded": [...]}: the held-out sets of `mix`."""

    rng = random.Random(mix.seed)
    sets: dict[str, list[Clip]] = {"synthesized": []}
    # Sentences from other templates' seeds than training's, spoken by voices training never hears.
    texts = general_sentences(mix.sentences, seed=9000 + mix.seed) + short_phrases(
        mix.short_utterances, 9000 + mix.seed
    )
    if espeak_available():
        sets["synthesized"] = [Clip(_espeak_random(t, ESPEAK_HELD_OUT_VOICES, rng), "synthesized", t) for t in texts]
    recorded = [item for corpus in corpora for item in recorded_files(corpus, held_out=True)]
    if recorded:
        sets["recorded"] = [
            Clip(load_audio(p)[: 28 * SAMPLE_RATE], "recorded", t) for p, t in _spread(recorded, mix.recorded, rng)
        ]
    return sets


@dataclass(frozen=True)
class Corpus:
    """Where a recorded corpus comes from, for the recipe's provenance."""

    name: str
    repository: str
    licence: str
    description: str


KNOWN_CORPORA = {
    "speechocean762": Corpus(
        "speechocean762",
        "jimbozhang/speechocean762",
        "CC BY 4.0",
        "5,000 read English utterances by 250 Mandarin speakers, half of them children; "
        "train speakers for training, test speakers held out",
    ),
    "wake-word-benchmark": Corpus(
        "wake-word-benchmark",
        "Picovoice/wake-word-benchmark (audio/)",
        "Apache-2.0",
        "2,293 keyword clips by more than 50 speakers; 'smart mirror' held out",
    ),
}


def describe_corpus(path: Path) -> dict:
    path = Path(path)
    if (path / "WAVE").is_dir():
        return asdict(KNOWN_CORPORA["speechocean762"]) | {"path": str(path)}
    if (path / "smart mirror").is_dir():
        return asdict(KNOWN_CORPORA["wake-word-benchmark"]) | {"path": str(path)}
    return {"name": path.name, "path": str(path), "licence": "unknown (user-supplied)"}
