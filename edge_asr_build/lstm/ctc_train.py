"""Training passes for LSTM-CTC models: features, CTC training, and recovery after compression.

- `prepare_features`: augmented copies of a corpus as log-mel frames and label ids, computed once and
  cached as one .npz (no pickle).
- `train_ctc`: CTC on the labels, SpecAugment, and, given a teacher, KL to the teacher's frame
  posteriors (the recovery of a compressed model against its uncompressed original).
- `teacher_transcripts`: labels for audio that has none, from the Whisper teacher (any bundle).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edge_asr.ctc import ALPHABET, greedy_symbols, symbols_to_text
from edge_asr.frontend import N_FFT, SAMPLE_RATE, frame_log_mel
from edge_asr_build.lstm.ctc_data import parallel_map, progress_bar, spoken_form
from edge_asr_build.lstm.model import LstmCtc
from edge_asr_build.speech.augment import CTC, augment
from edge_asr_build.trainer import FixedBatches, Trainer, TrainerConfig
from edge_asr_build.whisper.mel import mel_filters

FEATURES_VERSION = 2  # 2: augmentation by speech.augment's CTC preset


@dataclass
class Example:
    features: np.ndarray  # (T, n_mels) float16
    labels: np.ndarray  # int64 ids into ALPHABET
    text: str


def encode_text(text: str) -> np.ndarray:
    return np.array([ALPHABET.index(c) for c in spoken_form(text)], dtype=np.int64)


@lru_cache(maxsize=1)
def _mel_filters() -> np.ndarray:

    return mel_filters(SAMPLE_RATE, N_FFT, 80)


def _features_of(item: tuple[str, str, int, bool]) -> np.ndarray:
    path, _, seed, augmented = item
    from edge_asr.audio import load_audio

    audio = load_audio(path)
    if augmented:
        audio = augment(audio, np.random.default_rng(seed), CTC)
    return frame_log_mel(audio, _mel_filters()).astype(np.float16)


def prepare_features(
    items: list[tuple[Path, str]],
    copies: int = 2,
    seed: int = 0,
    cache: Path | None = None,
    clean_copy: bool = False,
    workers: int = 2,
    progress: bool = True,
) -> list[Example]:
    """`copies` augmented versions of every (audio, text) item (plus the clean audio if `clean_copy`)."""
    jobs = []
    for n, (path, text) in enumerate(items):
        variants = ([False] if clean_copy else []) + [True] * copies
        jobs += [(str(path), text, seed * 1_000_003 + n * 17 + k, aug) for k, aug in enumerate(variants)]
    key = hashlib.sha256(repr((FEATURES_VERSION, jobs)).encode()).hexdigest()[:12]
    file = Path(cache) / f"features-{key}.npz" if cache else None
    if file and file.exists():
        with np.load(file, allow_pickle=False) as z:
            data, offsets, texts = z["data"], z["offsets"], [str(t) for t in z["texts"]]
        feats = [data[offsets[i] : offsets[i + 1]] for i in range(len(texts))]
    else:
        feats = parallel_map(_features_of, jobs, workers, progress, "features", chunksize=32)
        texts = [j[1] for j in jobs]
        if file:
            file.parent.mkdir(parents=True, exist_ok=True)
            offsets = np.cumsum([0] + [len(f) for f in feats])
            tmp = file.with_suffix(".tmp.npz")
            np.savez(tmp, data=np.concatenate(feats), offsets=offsets, texts=np.array(texts))
            tmp.replace(file)
    return [Example(f, encode_text(t), t) for f, t in zip(feats, texts)]


def normalization(examples: list[Example], sample: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Per-mel-bin mean and deviation of the training frames."""
    rng = random.Random(0)
    chosen = rng.sample(examples, min(sample, len(examples)))
    frames = np.concatenate([e.features for e in chosen]).astype(np.float64)
    return frames.mean(0), frames.std(0)


def batches(examples: list[Example], max_frames: int, rng: random.Random, shuffle: bool = True) -> list[list[Example]]:
    """Batches of similar length, at most `max_frames` padded frames each, in random order (or shortest
    first, without `shuffle`)."""
    order = sorted(examples, key=lambda e: len(e.features) + rng.random() * 50)
    out, current = [], []
    for e in order:
        if current and (len(current) + 1) * len(e.features) > max_frames:
            out.append(current)
            current = []
        current.append(e)
    if current:
        out.append(current)
    if shuffle:
        rng.shuffle(out)
    return out


def collate(batch: list[Example], stack: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_frames = max(len(e.features) for e in batch)
    n_frames += -n_frames % stack
    x = torch.zeros(len(batch), n_frames, batch[0].features.shape[1])
    for i, e in enumerate(batch):
        x[i, : len(e.features)] = torch.from_numpy(e.features.astype(np.float32))
    steps = torch.tensor([len(e.features) // stack for e in batch])
    labels = torch.from_numpy(np.concatenate([e.labels for e in batch]))
    label_lengths = torch.tensor([len(e.labels) for e in batch])
    return x, steps, labels, label_lengths


def spec_augment(x: torch.Tensor, frames: torch.Tensor, mean: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Two frequency masks of up to 10 bins and a time mask per second of up to 0.1 s (less would leave a
    short word whole, more would erase it), filled with the mean (zero after normalization)."""
    x = x.clone()
    b, t, n = x.shape
    for i in range(b):
        for _ in range(2):
            w = int(torch.randint(0, 11, (1,), generator=rng))
            f0 = int(torch.randint(0, n - w + 1, (1,), generator=rng))
            x[i, :, f0 : f0 + w] = mean[f0 : f0 + w]
        length = int(frames[i])
        for _ in range(max(1, length // 100)):
            w = int(torch.randint(0, 11, (1,), generator=rng))
            t0 = int(torch.randint(0, max(1, length - w), (1,), generator=rng))
            x[i, t0 : t0 + w] = mean
    return x


@dataclass
class TrainConfig:
    epochs: int = 12
    lr: float = 2e-3
    max_frames: int = 8_000  # padded 10 ms frames per batch (80 s of audio)
    kd_weight: float = 0.0  # weight of KL to a teacher's posteriors (recovery)
    spec_augment: bool = True
    sorta_grad: bool = True  # first epoch shortest first, unmasked: CTC leaves its all-blank start sooner
    seed: int = 0
    clip: float = 5.0

    def to_dict(self) -> dict:
        return asdict(self)


class CtcLoss:
    """CTC on a batch's labels (SpecAugment after the first epoch where `config` asks), plus, with a teacher,
    `config.kd_weight` times the KL divergence from its frame posteriors."""

    def __init__(self, model: LstmCtc, config: TrainConfig, teacher: LstmCtc | None, generator, device: str):
        self.model, self.config, self.teacher, self.generator, self.device = model, config, teacher, generator, device

    def __call__(self, item: tuple[int, list[Example]]) -> Tensor:
        epoch, batch = item
        model, config, device, stack = self.model, self.config, self.device, self.model.config.stack
        x, steps, labels, label_lengths = collate(batch, stack)
        if config.spec_augment and not (config.sorta_grad and epoch == 0):
            x = spec_augment(x, steps * stack, model.mean.cpu(), self.generator)
        x, steps = x.to(device), steps.to(device)
        log_probs, _ = model(x, lengths=steps)
        total = F.ctc_loss(
            log_probs.transpose(0, 1), labels.to(device), steps, label_lengths.to(device), blank=0, zero_infinity=True
        )
        if self.teacher is not None and config.kd_weight:
            with torch.no_grad():
                target, _ = self.teacher(x, lengths=steps)
            mask = (torch.arange(log_probs.shape[1], device=device)[None] < steps[:, None]).float()
            kl = (target.exp() * (target - log_probs)).sum(-1)
            total = total + config.kd_weight * (kl * mask).sum() / mask.sum()
        return total


def train_ctc(
    model: LstmCtc,
    examples: list[Example],
    config: TrainConfig,
    teacher: LstmCtc | None = None,
    held_out: list[Example] | None = None,
    log=print,
    progress: bool = True,
    on_epoch=None,
    checkpoint: Path | None = None,
    until: int | None = None,
) -> list[dict]:
    """Train `model` in place on the one trainer (one-cycle learning rate, AdamW, gradient clipping); returns
    per-epoch logs (the mean batch loss, seconds, held-out WER). `on_epoch(model, history)` is called after
    every epoch (to keep a checkpoint of work so far); `checkpoint` makes the run resumable step by step."""
    torch.manual_seed(config.seed)
    rng, gen = random.Random(config.seed), torch.Generator().manual_seed(config.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    stack = model.config.stack
    examples = [e for e in examples if len(e.labels) and len(e.features) // stack > 2 * len(e.labels)]
    # Every epoch's batches up front: their count varies a little, and the schedule needs the total.
    epochs = [
        batches(examples, config.max_frames, rng, shuffle=not (config.sorta_grad and n == 0))
        for n in range(config.epochs)
    ]
    ends = list(itertools.accumulate(map(len, epochs)))

    loss = CtcLoss(model, config, teacher, gen, device)

    def held_out_wer() -> float:
        wer = evaluate(model, held_out)
        model.train()
        return wer

    history, evaluations = [], []

    def epoch_done(entry: dict) -> None:
        history.append(_epoch_entry(len(history) + 1, entry, evaluations[-1]["seconds"] if evaluations else 0.0))
        evaluations.append(entry)
        log(" ".join(f"{k} {v}" for k, v in history[-1].items()))
        if on_epoch:
            on_epoch(model, history)

    trainer = Trainer(
        "ctc",
        [{"params": list(model.parameters()), "lr": config.lr}],
        loss,
        FixedBatches([(n, batch) for n, epoch in enumerate(epochs) for batch in epoch]),
        TrainerConfig(
            steps=ends[-1],
            weight_decay=1e-4,
            schedule="one-cycle",
            clip_norm=config.clip,
            eval_every=ends[-1],
            eval_steps=tuple(ends),
            evaluate_first=False,
            keep_best=False,
        ),
        evaluate=held_out_wer if held_out else None,
        checkpoint=checkpoint,
        generators=(gen,),
        log=log,
        progress=progress,
        on_evaluate=epoch_done,
    )
    result = trainer.run(until)
    model.train()
    curve = result.curve
    return [_epoch_entry(n + 1, e, curve[n - 1]["seconds"] if n else 0.0) for n, e in enumerate(curve)]


def _epoch_entry(epoch: int, entry: dict, started: float) -> dict:
    """An epoch's line of the history from the trainer's evaluation `entry` after it (`started`: the
    trainer's seconds when the epoch began)."""
    line = {"epoch": epoch, "loss": round(entry["train_loss"], 4), "seconds": round(entry["seconds"] - started, 1)}
    if entry["held_out"] is not None:
        line["held_out_wer"] = round(entry["held_out"], 2)
    return line


@torch.no_grad()
def transcribe_examples(model: LstmCtc, examples: list[Example]) -> list[str]:
    model.eval()
    device = next(model.parameters()).device
    out = []
    for e in examples:
        x = torch.from_numpy(e.features.astype(np.float32))[None].to(device)
        log_probs, _ = model(x)
        out.append(symbols_to_text(greedy_symbols(log_probs[0].cpu().numpy())[0]))
    return out


def evaluate(model: LstmCtc, examples: list[Example]) -> float:
    """WER (%) of greedy transcripts, normalized as everywhere in edge-asr."""
    from edge_asr.metrics import word_error_rate

    return word_error_rate([spoken_form(e.text) for e in examples], transcribe_examples(model, examples))


def teacher_transcripts(
    files: list[Path], bundle: str | Path | None = None, threads: int | None = None, progress: bool = True
) -> list[tuple[Path, str]]:
    """(file, transcript) pairs for audio without references, transcribed by a Whisper bundle."""
    from edge_asr.audio import load_audio
    from edge_asr.paths import bundle_dir
    from edge_asr.transcriber import Transcriber

    teacher = Transcriber(bundle or bundle_dir(), threads=threads)
    pairs = []
    for f in progress_bar(files, len(files), progress, "teacher labels"):
        text = teacher.transcribe(load_audio(f)).text
        if spoken_form(text):
            pairs.append((f, text))
    return pairs
