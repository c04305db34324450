"""The LSTM conversion's data: clips of the reference sets with the teacher's (Whisper's) residual stream on
them, cached per teacher; batches of similar length; and the alignment of the student's frames with the
teacher's (`collate`)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import Tensor
from tqdm import tqdm

from edge_asr.context import ContextPolicy
from edge_asr_build.lstm.cald import CaldCtc, teacher_stream
from edge_asr_build.lstm.ctc_data import spoken_form
from edge_asr_build.lstm.ctc_train import encode_text
from edge_asr_build.matching.data import items_key, padded
from edge_asr_build.matching.lora import apply_delta
from edge_asr_build.recipes.adapt import DEFAULT_DELTA, ContextRecipe
from edge_asr_build.recipes.run import RecipeRun
from edge_asr_build.sources import load_whisper
from edge_asr_build.speech.training_audio import AudioMix
from edge_asr_build.whisper.vocabulary import decoding_rules


@dataclass
class Clip:
    mel: Tensor  # (n_mels, T) float16: Whisper's scaled log-mel of the clip, T even
    targets: Tensor  # (2L + 1, T/2, n_state) float16: the teacher's x_0 … x_L, then m_0 … m_{L-1}
    labels: Tensor  # (K,) int64: the teacher's transcript in ALPHABET ids
    text: str

    @property
    def steps(self) -> int:
        return self.mel.shape[-1] // 2


def transcript_text(tokens: Tensor, decoding: dict, decode: Callable[[list[int]], str]) -> str:
    """The text a reference item's decoder input holds after its prompt (timestamps and specials dropped)."""
    special = decoding["special_tokens"]
    ids = tokens.tolist()
    start = max(i for i, t in enumerate(ids) if t == special["sot"]) + 1
    return decode([t for t in ids[start:] if t < special["eot"]])


def teacher_clips(
    encoder, items: list, decoding: dict, decode: Callable[[list[int]], str], progress=None
) -> list[Clip]:
    """Each reference item's mel, its teacher states on the audio's own length (bucketed as the
    dynamic-context runtime pads it) cut to the clip's frames, and its transcript as CTC labels."""

    policy = ContextPolicy.auto()
    clips = []
    for item in progress(items) if progress else items:
        frames = item.frames - item.frames % 2
        if frames < 8:
            continue
        text = spoken_form(transcript_text(item.tokens, decoding, decode))
        window = padded(item.mel, policy.frames(frames * 160))[None]
        xs, ms = teacher_stream(encoder, window)
        targets = torch.cat([*xs, *ms])[:, : frames // 2].half()
        clips.append(Clip(item.mel[:, :frames], targets, torch.from_numpy(encode_text(text)), text))
    return clips


def save_clips(clips: list[Clip], path: Path) -> None:

    tensors = {}
    for i, c in enumerate(clips):
        tensors |= {f"{i}.mel": c.mel.contiguous(), f"{i}.targets": c.targets.contiguous(), f"{i}.labels": c.labels}
    texts = "\n".join(c.text for c in clips)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"count": str(len(clips)), "texts": texts})
    tmp.replace(path)


def load_clips(path: Path) -> list[Clip]:

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        texts = meta["texts"].split("\n")
        return [
            Clip(f.get_tensor(f"{i}.mel"), f.get_tensor(f"{i}.targets"), f.get_tensor(f"{i}.labels"), texts[i])
            for i in range(int(meta["count"]))
        ]


def batch_indices(clips: list[Clip], max_frames: int, rng: random.Random) -> list[list[int]]:
    """Batches (indices into `clips`) of similar length, at most `max_frames` padded encoder frames each, in
    random order."""
    order = sorted(range(len(clips)), key=lambda i: clips[i].steps + rng.random() * 20)
    out, current = [], []
    for i in order:
        if current and (len(current) + 1) * clips[i].steps > max_frames:
            out.append(current)
            current = []
        current.append(i)
    out.append(current)
    rng.shuffle(out)
    return out


def batches(clips: list[Clip], max_frames: int, rng: random.Random) -> list[list[Clip]]:
    """`batch_indices`, as the clips themselves."""
    return [[clips[i] for i in batch] for batch in batch_indices(clips, max_frames, rng)]


def collate(batch: list[Clip], model: CaldCtc) -> tuple[Tensor, Tensor, Tensor]:
    """(floored mel (B, n_mels, 2S), teacher targets in the student's time (B, 2L+1, S, n_state), mask
    (B, S)): student frame k holds teacher frame k - 1, so frame 0 (a lead frame) is masked out."""
    steps = max(c.steps for c in batch) + 1
    mel = torch.zeros(len(batch), batch[0].mel.shape[0], 2 * steps)
    mel[:] = (model.config.mel_floor + 4) / 4  # what follows a clip: silence at the floor
    targets = torch.zeros(len(batch), batch[0].targets.shape[0], steps, batch[0].targets.shape[-1])
    mask = torch.zeros(len(batch), steps, dtype=torch.bool)
    for i, c in enumerate(batch):
        mel[i, :, : 2 * c.steps] = c.mel.float()
        targets[i, :, 1 : c.steps + 1] = c.targets.float()
        mask[i, 1 : c.steps] = True  # the teacher's last frame needs the mel frame after the clip
    return model.floor_whisper_mel(mel), targets, mask


def teacher_encoder(loaded, delta: Path | None = None):
    """The encoder of a loaded Whisper with the dynamic-context delta merged into it (in place): the teacher."""

    apply_delta(loaded.model, Path(delta or DEFAULT_DELTA))
    return loaded.model.encoder.eval()


def conversion_sets(
    run: RecipeRun, extra_mix: AudioMix, delta: Path | None = None
) -> tuple[Path, list[Clip], list[Clip], dict]:
    """(cache folder, training clips, held-out clips, provenance) of the Whisper `run.source`: the reference
    sets every matching pass shares (in their own place, not the run's work folder) and `extra_mix`, with the
    teacher's states on them, made once and cached beside the reference sets."""
    shared = ContextRecipe()
    loaded = load_whisper(run.source)
    sets_run = replace(run, work=None)
    work, train_items, held_items = sets_run.reference_sets(loaded, shared.mix, shared.held_out, shared.match.seed)
    _, extra_items, _ = sets_run.reference_sets(loaded, extra_mix, shared.held_out, shared.match.seed)
    step = run.step
    decoding = decoding_rules(loaded)
    tokenizer = Tokenizer.from_file(str(loaded.tokenizer_json))
    decode = lambda ids: tokenizer.decode(ids)  # noqa: E731
    cache = work / f"cald-{items_key(loaded.source.get('sha256'), str(delta or 'default'), 1)}"
    cache.mkdir(exist_ok=True)
    sets, encoder = {}, None
    for name, items in (("train", train_items), ("extra", extra_items), ("held-out", held_items)):
        path = cache / f"{name}.safetensors"
        if not path.exists():
            step(f"teacher states of {len(items)} clips ({name})")
            # The reference sets are made: the loaded model may now become the teacher.
            encoder = encoder or teacher_encoder(loaded, delta)
            save_clips(
                teacher_clips(
                    encoder, items, decoding, decode, lambda xs: tqdm(xs, desc=f"teacher {name}", unit="clip")
                ),
                path,
            )
        sets[name] = load_clips(path)
    train = sets["train"] + sets["extra"]
    provenance = {
        "teacher": loaded.source,
        "teacher_delta": str(delta or "tiny.en-context-auto"),
        "clips": {k: len(v) for k, v in sets.items()},
        "mixes": [shared.mix.to_dict(), extra_mix.to_dict()],
        "hours": round(sum(c.steps for c in train) / 50 / 3600, 2),
    }
    return cache, train, sets["held-out"], provenance
