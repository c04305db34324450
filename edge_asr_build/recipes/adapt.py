"""Adapt pass for dynamic audio context: Whisper that sees the audio's own length instead of 30 s.

Whisper was trained on 30 s windows only. Given fewer frames its decoder loses its footing and repeats
itself, so the model is adapted by reference matching (`reference`): the reference is the unchanged model on
the 30 s window, the student the same model, with LoRA adapters, on a window of the clip's length plus a
margin, rounded up to one of the context policy's buckets (`edge_asr.context`). The student sees exactly
the padding the runtime applies (with margins drawn from a range, so the margin can be chosen afterwards),
and now and then any length up to 30 s, which is what re-decoding a growing utterance gives.

The result is a delta file (LoRA, float16 safetensors) with its recipe in the header. The build step merges
it into the weights before export (`build --context auto`), so bundles and graphs never see an adapter.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edge_asr.context import FRAMES_PER_SECOND, ContextPolicy
from edge_asr.frontend import N_FFT, N_FRAMES, SAMPLE_RATE
from edge_asr_build.matching.engine import (
    MatchConfig,
    items_key,
    load_items,
    match_reference,
    reference_items,
    save_items,
)
from edge_asr_build.speech.training_audio import (
    AudioMix,
    HeldOutMix,
    describe_corpus,
    held_out_clips,
    isolated_word_clips,
    training_clips,
)

DELTA_DIR = Path(__file__).parent / "deltas"
DEFAULT_DELTA = DELTA_DIR / "tiny.en-context-auto.safetensors"


@dataclass(frozen=True)
class ContextRecipe:
    mix: AudioMix = field(default_factory=AudioMix)
    held_out: HeldOutMix = field(default_factory=HeldOutMix)
    # Sized to run on 2 CPU cores in under 30 minutes, data and reference states included.
    match: MatchConfig = field(
        default_factory=lambda: MatchConfig(
            steps=450, batch_size=8, learning_rate=2e-4, warmup_steps=30, checkpoint_every=50, eval_every=50
        )
    )
    policy_share: float = 0.75  # windows shaped as the runtime shapes them; the rest any length to 30 s
    max_margin_s: float = 1.5  # margins drawn from [0, max_margin_s] for those windows
    floor_s: float = 3.0  # the runtime's floor (ContextPolicy.auto)
    version: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


def training_frames(recipe: ContextRecipe) -> Callable[[int, np.random.Generator], int]:
    """The student's window length for a clip of `frames` frames: a bucketed window with a random margin, or
    now and then any even length between the clip's and 30 s."""
    runtime = replace(ContextPolicy.auto(), floor_s=recipe.floor_s)

    def frames_for(frames: int, rng: np.random.Generator) -> int:
        if rng.random() < recipe.policy_share:
            return replace(runtime, margin_s=float(rng.uniform(0, recipe.max_margin_s))).frames(frames * 160)
        low = max(frames, int(recipe.floor_s * FRAMES_PER_SECOND))
        return min(N_FRAMES, 2 * int(rng.integers(low // 2, N_FRAMES // 2 + 1)))

    return frames_for


def held_out_frames(policy: ContextPolicy) -> Callable[[int, np.random.Generator], int]:
    return lambda frames, rng: policy.frames(frames * 160)


def _encoder(tokenizer_json: Path) -> Callable[[str], list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    return lambda text: tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids


def save_clip_mels(clips: list, mel_filters, path: Path) -> None:
    """The clips' log-mels (`reference.clip_mel`, float16) and texts: what any reference needs of them."""
    import torch
    from safetensors.torch import save_file

    from edge_asr_build.matching.engine import clip_mel

    tensors = {str(i): clip_mel(c.audio, mel_filters).contiguous() for i, c in enumerate(clips)}
    texts = [c.text for c in clips]
    tmp = Path(path).with_suffix(".tmp")
    save_file(
        tensors or {"empty": torch.zeros(0)},
        str(tmp),
        metadata={"count": str(len(clips)), "texts": json.dumps(texts), "kinds": json.dumps([c.kind for c in clips])},
    )
    tmp.replace(path)


def load_clip_mels(path: Path) -> tuple[list, list[str | None]]:
    """(mels, texts) saved by `save_clip_mels`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return [f.get_tensor(str(i)) for i in range(int(meta["count"]))], json.loads(meta["texts"])


def clips_dir(
    mix: AudioMix,
    held_out_mix: HeldOutMix,
    seed: int,
    corpora: list[Path] = (),
    user_audio: list[Path] = (),
    version: int = 1,
) -> Path:
    """$EDGE_ASR_HOME/adapt/clips-KEY: the mixes' clip mels, shared by every reference model (KEY names the
    mixes and audio, not the model)."""
    from edge_asr.paths import home

    audio_key = [str(Path(p).resolve()) for p in [*corpora, *user_audio]]
    return home() / "adapt" / f"clips-{items_key(mix.main_dict(), asdict(held_out_mix), audio_key, version, seed)}"


def reference_sets(
    loaded,
    mix: AudioMix,
    held_out_mix: HeldOutMix,
    seed: int,
    corpora: list[Path] = (),
    user_audio: list[Path] = (),
    work: Path | None = None,
    prefix: str = "context",
    version: int = 1,
    step: Callable[[str], None] = lambda message: None,
    train_limit: int | None = None,
) -> tuple[Path, list, list]:
    """(work folder, training items, held-out items): the reference's transcripts and hidden states on the
    training mix (isolated words included) and the held-out sets, made once and kept in `work` (default:
    $EDGE_ASR_HOME/adapt/PREFIX-KEY, KEY naming the source, mixes and audio). Every reference-matching pass
    trains on these; passes with the same mixes share them, and references of other models share the clips
    (`clips_dir`). `train_limit` references a seeded subset of the training clips (a slower reference)."""
    from tqdm import tqdm

    from edge_asr.paths import home
    from edge_asr_build.sources import decoding_rules
    from edge_asr_build.speech.sentences import general_sentences
    from edge_asr_build.whisper.mel import mel_filters

    reference = loaded.model.eval()
    filters = mel_filters(SAMPLE_RATE, N_FFT, reference.dims.n_mels)
    decoding = decoding_rules(loaded)
    audio_key = [str(Path(p).resolve()) for p in [*corpora, *user_audio]]
    key = items_key(loaded.source.get("sha256"), mix.main_dict(), asdict(held_out_mix), audio_key, version, seed)
    work = Path(work or home() / "adapt" / f"{prefix}-{key}")
    work.mkdir(parents=True, exist_ok=True)
    shared = clips_dir(mix, held_out_mix, seed, corpora, user_audio, version)
    shared.mkdir(parents=True, exist_ok=True)
    progress = lambda items, desc: tqdm(items, desc=desc, unit="clip")  # noqa: E731
    encode_text, prompts = _encoder(loaded.tokenizer_json), general_sentences(200, seed=4242)

    def cached_items(
        path: Path,
        mels_path: Path,
        what: str,
        make_clips: Callable[[], list],
        seed: int,
        limit: int | None = None,
        **options,
    ) -> list:
        """The reference items of `make_clips()`, made once and kept at `path`; their mels at `mels_path`."""
        if not path.exists():
            if not mels_path.exists():
                step(f"make {what}")
                save_clip_mels(make_clips(), filters, mels_path)
            mels, _ = load_clip_mels(mels_path)
            if limit and limit < len(mels):
                mels = [mels[i] for i in sorted(np.random.default_rng(seed).choice(len(mels), limit, replace=False))]
            step(f"reference transcripts and hidden states of {len(mels)} clips ({what})")
            save_items(
                reference_items(
                    reference, mels, filters, decoding, encode_text, prompts, seed=seed, progress=progress, **options
                ),
                path,
            )
        return load_items(path)

    suffix = f"-{train_limit}" if train_limit else ""
    train = cached_items(
        work / f"train-items{suffix}.safetensors",
        shared / "train-mels.safetensors",
        "training audio",
        lambda: training_clips(mix, corpora, user_audio, progress),
        seed,
        train_limit,
    )
    held_out = cached_items(
        work / "held-out-items.safetensors",
        shared / "held-out-mels.safetensors",
        "held-out audio",
        lambda: [c for clips in held_out_clips(held_out_mix, corpora).values() for c in clips],
        seed + 1,
        mode_shares={"plain": 1.0},
    )
    if mix.isolated_words:
        words = f"isolated-words-{items_key(mix.isolated_words, mix.seed)}"
        limit = train_limit and round(train_limit * mix.isolated_words / mix.main_clips())
        train += cached_items(
            work / f"{words}{suffix}.safetensors",
            shared / f"{words}-mels.safetensors",
            "isolated words",
            lambda: isolated_word_clips(mix, progress),
            seed + 2,
            limit,
        )
    return work, train, held_out


def adapt_context(
    source: str,
    out: Path,
    corpora: list[Path] = (),
    user_audio: list[Path] = (),
    recipe: ContextRecipe | None = None,
    work: Path | None = None,
    resume: bool = False,
    step: Callable[[str], None] = lambda message: None,
    log=print,
) -> dict:
    """Train the dynamic-context delta of `source`; writes `out` (safetensors) and returns its metadata.

    Reference items and the training checkpoint live in `work` (default: $EDGE_ASR_HOME/adapt/KEY, KEY naming
    the source, recipe and audio). Reference items are always reused; with `resume`, so is the checkpoint of a
    stopped run, which then goes on where it was."""
    import torch

    from edge_asr_build.matching.lora import save_delta
    from edge_asr_build.sources import load_whisper

    recipe = recipe or ContextRecipe()
    torch.manual_seed(recipe.match.seed)
    step(f"load {source}")
    loaded = load_whisper(source)
    reference = loaded.model.eval()
    started = time.time()
    work, train, held_out = reference_sets(
        loaded,
        recipe.mix,
        recipe.held_out,
        recipe.match.seed,
        corpora,
        user_audio,
        work,
        "context",
        recipe.version,
        step,
    )
    prepared = time.time() - started
    step(f"match the reference ({recipe.match.steps} steps)")
    student = copy.deepcopy(reference)
    checkpoint = work / "checkpoint.pt"
    if not resume:
        checkpoint.unlink(missing_ok=True)
    result = match_reference(
        student,
        train,
        recipe.match,
        training_frames(recipe),
        held_out,
        held_out_frames(ContextPolicy.auto()),
        checkpoint=checkpoint,
        log=log,
    )
    metadata = {
        "kind": "context-lora",
        "source": loaded.source,
        "rank": recipe.match.lora_rank,
        "alpha": recipe.match.lora_alpha,
        "parts": list(recipe.match.parts),
        "recipe": recipe.to_dict(),
        "held_out_policy": ContextPolicy.auto().to_dict(),
        "corpora": [describe_corpus(p) for p in corpora],
        "user_audio": [str(p) for p in user_audio],
        "clips": {"train": len(train), "held_out": len(held_out)},
        "result": result.to_dict(),
        "seconds": {"prepare": round(prepared, 1), "train": result.seconds},
    }
    # The reference model's copy in the student had adapters added in place: save them, not the merged weights.
    save_delta(student, Path(out), metadata)
    (Path(out).with_suffix(".json")).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return metadata
