"""Reference matching's data: the reference's side of every clip (`ReferenceItem`: the mel, the transcript it
decodes greedily, its hidden states), computed once and cached, and the reference sets every recipe trains
on (`reference_sets`: the training mix, isolated words and held-out sets), with the clip mels shared by the
references of every model (`clips_dir`)."""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from edge_asr.decoding import suppression_masks
from edge_asr.frontend import N_FFT, N_FRAMES, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from edge_asr.paths import home
from edge_asr_build.speech.sentences import general_sentences
from edge_asr_build.speech.training_audio import (
    AudioMix,
    HeldOutMix,
    held_out_clips,
    isolated_word_clips,
    training_clips,
)
from edge_asr_build.whisper.mel import mel_filters
from edge_asr_build.whisper.model import Whisper

MODES = ("plain", "prompt", "timestamps")
# The version of the clip mixes and the reference items made of them, in every cache key: raised when
# either changes meaning, so that no recipe trains on items made the old way.
ITEMS_VERSION = 1


@dataclass
class ReferenceItem:
    mel: Tensor  # (n_mels, frames) float16: log-mel of the clip's own frames, unpadded
    tokens: Tensor  # (L,) int64: the decoder input, prompt + the reference's transcript
    states: Tensor  # (n_layer + 1, L, n_state) float16: the reference's hidden states on `tokens`
    mode: str = "plain"

    @property
    def frames(self) -> int:
        return self.mel.shape[-1]


def clip_mel(audio: np.ndarray, mel_filters: np.ndarray) -> Tensor:
    """Log-mel of a clip's own frames (what `window_features` pads): the clamp below the clip's maximum makes
    it independent of how much padding follows, so one array serves every window length."""
    n_frames = len(audio) // 160
    mel = log_mel_spectrogram(audio, mel_filters, padding=N_FFT)[:, :n_frames]
    return torch.from_numpy(mel[:, :N_FRAMES]).half()


def padded(mel: Tensor, frames: int) -> Tensor:
    """The encoder input of `frames` frames: the clip's mel, zero-padded (or cut)."""
    return torch.from_numpy(pad_or_trim(mel.float().numpy(), frames))


def _decoding_prompt(decoding: dict, mode: str, previous: list[int]) -> list[int]:
    special = decoding["special_tokens"]
    prompt = list(decoding["prompt"])
    if mode == "timestamps":
        prompt = [t for t in prompt if t != special["no_timestamps"]]
    if mode == "prompt" and previous:
        prompt = [special["sot_prev"], *previous[-64:], *prompt]
    return prompt


@torch.inference_mode()
def greedy(
    reference: Whisper, cross: list, prompt: list[int], decoding: dict, timestamps: bool, max_tokens: int = 160
) -> list[int] | None:
    """The reference's greedy transcript after `prompt` (with end of text), by the runtime decoder's
    suppression rules; with `timestamps`, timestamp tokens are allowed and the first token is <|0.00|>.
    None if it runs away. `decoding` is a bundle's decoder section with n_vocab (`sources.decoding_rules`)."""
    special = decoding["special_tokens"]
    suppress, first = (torch.from_numpy(mask) for mask in suppression_masks(decoding))
    if timestamps:
        begin = special["timestamp_begin"]
        suppress[begin:] = False
        first = torch.ones_like(first)
        first[begin] = False
    logits, cache = reference.decoder.forward_cached(torch.tensor([prompt]), reference.empty_cache(), cross)
    out, mask = [], first
    for _ in range(max_tokens):
        token = int(torch.where(mask, float("-inf"), logits[0]).argmax())
        out.append(token)
        if token == special["eot"]:
            return out
        mask = suppress
        logits, cache = reference.decoder.forward_cached(torch.tensor([[token]]), cache, cross)
    return None


@torch.inference_mode()
def reference_item(
    reference: Whisper, mel: Tensor, decoding: dict, mode: str = "plain", previous: list[int] = (), observer=None
) -> ReferenceItem | None:
    """The reference's transcript and hidden states for one clip (its `clip_mel`) on its 30 s window.

    `observer` (`compression.calibration.MomentRecorder`) watches the encoder pass and the teacher-forced
    pass (`observing()`, not greedy decoding), and is told whether the item is kept (`commit`, `discard`)."""
    observing = observer.observing if observer else nullcontext
    with observing():
        cross = reference.decoder.cross_kv(reference.encoder(padded(mel, N_FRAMES)[None]))
    prompt = _decoding_prompt(decoding, mode, list(previous))
    label = greedy(reference, cross, prompt, decoding, timestamps=mode == "timestamps")
    if label is None:
        if observer:
            observer.discard()
        return None
    tokens = torch.tensor(prompt + label[:-1])  # the input; its last position predicts the end of text
    with observing():
        states = torch.stack([s[0] for s in reference.decoder.hidden_states(tokens[None], cross)]).half()
    if observer:
        observer.commit()
    return ReferenceItem(mel, tokens, states, mode)


def reference_items(
    reference: Whisper,
    clips: list,
    mel_filters: np.ndarray,
    decoding: dict,
    encode_text: Callable[[str], list[int]],
    texts: list[str],
    seed: int = 0,
    mode_shares: dict[str, float] | None = None,
    progress=None,
    observer=None,
) -> list[ReferenceItem]:
    """Reference items for `clips` (audio arrays, or their `clip_mel`s), each in a decoding mode drawn by
    `mode_shares`; "prompt" items get a previous-text prompt made of one of `texts` (tokenized by
    `encode_text`). `observer`: see `reference_item`."""
    mode_shares = mode_shares or {"plain": 0.7, "prompt": 0.15, "timestamps": 0.15}
    rng = np.random.default_rng(seed)
    modes, shares = list(mode_shares), np.array(list(mode_shares.values()))
    reference.eval()
    items = []
    iterator = progress(clips, "reference transcripts and states") if progress else clips
    for clip in iterator:
        mode = str(rng.choice(modes, p=shares / shares.sum()))
        previous = encode_text(texts[rng.integers(len(texts))]) if mode == "prompt" and texts else []
        mel = clip if isinstance(clip, Tensor) else clip_mel(clip, mel_filters)
        item = reference_item(reference, mel, decoding, mode, previous, observer)
        if item is not None:
            items.append(item)
    return items


def save_items(items: list[ReferenceItem], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, item in enumerate(items):
        tensors |= {
            f"{i}.mel": item.mel.contiguous(),
            f"{i}.tokens": item.tokens,
            f"{i}.states": item.states.contiguous(),
            f"{i}.mode": torch.tensor(MODES.index(item.mode)),
        }
    tmp = Path(path).with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"count": str(len(items))})
    tmp.replace(path)


def load_items(path: Path) -> list[ReferenceItem]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        count = int(f.metadata()["count"])
        return [
            ReferenceItem(
                f.get_tensor(f"{i}.mel"),
                f.get_tensor(f"{i}.tokens"),
                f.get_tensor(f"{i}.states"),
                MODES[int(f.get_tensor(f"{i}.mode"))],
            )
            for i in range(count)
        ]


def items_key(*parts) -> str:
    """A short hash naming a cache of reference items by everything that made them."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def _encoder(tokenizer_json: Path) -> Callable[[str], list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    return lambda text: tokenizer.encode(" " + text.strip(), add_special_tokens=False).ids


def save_clip_mels(clips: list, mel_filters, path: Path) -> None:
    """The clips' log-mels (`matching.engine.clip_mel`, float16) and texts: what any reference needs of them."""
    import torch
    from safetensors.torch import save_file

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
) -> Path:
    """$EDGE_ASR_HOME/adapt/clips-KEY: the mixes' clip mels, shared by every reference model (KEY names the
    mixes and audio, not the model)."""
    from edge_asr.paths import home

    audio_key = [str(Path(p).resolve()) for p in [*corpora, *user_audio]]
    return (
        home() / "adapt" / f"clips-{items_key(mix.main_dict(), asdict(held_out_mix), audio_key, ITEMS_VERSION, seed)}"
    )


@dataclass
class ItemCache:
    """Makes a reference's items of a set of clips once and keeps them (and the clips' mels) in files."""

    reference: Whisper
    filters: np.ndarray
    decoding: dict
    encode_text: Callable[[str], list[int]]
    prompts: list[str]
    step: Callable[[str], None]

    def __call__(
        self,
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
                self.step(f"make {what}")
                save_clip_mels(make_clips(), self.filters, mels_path)
            mels, _ = load_clip_mels(mels_path)
            if limit and limit < len(mels):
                mels = [mels[i] for i in sorted(np.random.default_rng(seed).choice(len(mels), limit, replace=False))]
            self.step(f"reference transcripts and hidden states of {len(mels)} clips ({what})")
            progress = lambda items, desc: tqdm(items, desc=desc, unit="clip")  # noqa: E731
            items = reference_items(
                self.reference,
                mels,
                self.filters,
                self.decoding,
                self.encode_text,
                self.prompts,
                seed=seed,
                progress=progress,
                **options,
            )
            save_items(items, path)
        return load_items(path)


def reference_sets(
    loaded,
    decoding: dict,
    mix: AudioMix,
    held_out_mix: HeldOutMix,
    seed: int,
    corpora: list[Path] = (),
    user_audio: list[Path] = (),
    work: Path | None = None,
    prefix: str = "context",
    step: Callable[[str], None] = lambda message: None,
    train_limit: int | None = None,
) -> tuple[Path, list, list]:
    """(work folder, training items, held-out items): the reference's transcripts and hidden states on the
    training mix (isolated words included) and the held-out sets, made once and kept in `work` (default:
    $EDGE_ASR_HOME/adapt/PREFIX-KEY, KEY naming the source, mixes and audio). Every reference-matching pass
    trains on these; passes with the same mixes share them, and references of other models share the clips
    (`clips_dir`). `train_limit` references a seeded subset of the training clips (a slower reference)."""
    reference = loaded.model.eval()
    filters = mel_filters(SAMPLE_RATE, N_FFT, reference.dims.n_mels)
    audio_key = [str(Path(p).resolve()) for p in [*corpora, *user_audio]]
    key = items_key(loaded.source.get("sha256"), mix.main_dict(), asdict(held_out_mix), audio_key, ITEMS_VERSION, seed)
    work = Path(work or home() / "adapt" / f"{prefix}-{key}")
    work.mkdir(parents=True, exist_ok=True)
    shared = clips_dir(mix, held_out_mix, seed, corpora, user_audio)
    shared.mkdir(parents=True, exist_ok=True)
    progress = lambda items, desc: tqdm(items, desc=desc, unit="clip")  # noqa: E731
    cached_items = ItemCache(
        reference, filters, decoding, _encoder(loaded.tokenizer_json), general_sentences(200, seed=4242), step
    )

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
