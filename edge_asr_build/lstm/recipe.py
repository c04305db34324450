"""LSTM-CTC recipes, each pass usable alone: train from synthesized speech, compress by joint SVD and
recover against the uncompressed model, export a bundle (float32 or int8)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from edge_asr.threads import resolve_threads
from edge_asr_build.lstm.ctc_data import held_out_corpus, read_corpus, training_corpus
from edge_asr_build.lstm.ctc_train import (
    TrainConfig,
    evaluate,
    normalization,
    prepare_features,
    teacher_transcripts,
    train_ctc,
)
from edge_asr_build.lstm.model import LstmConfig, LstmCtc, compress_lstm, load_lstm, lstm_matrix_params, save_lstm
from edge_asr_build.speech.training_audio import audio_files


@dataclass
class LstmRecipe:
    utterances: int = 7000  # synthesized training utterances (40% digits, 20% numbers and commands)
    copies: int = 2  # augmented versions of each
    hidden: list[int] = field(default_factory=lambda: [256, 256, 256])
    epochs: int = 8
    lr: float = 3e-3
    seed: int = 0
    sentence_share: float = 1.0  # share of the dictation sentences (over 6 words) kept: less favours digits

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, seed=self.seed)


def _with_sentence_share(items: list, recipe: LstmRecipe) -> list:
    """Every short item (digits, numbers, commands) and every k-th sentence, for k = 1 / sentence_share."""
    if recipe.sentence_share >= 1:
        return items
    step = max(1, round(1 / max(recipe.sentence_share, 1e-3)))
    sentences = [item for item in items if len(item[1].split()) > 6]
    kept = set(map(id, sentences[::step]))
    return [item for item in items if len(item[1].split()) <= 6 or id(item) in kept]


def training_items(recipe: LstmRecipe) -> list[tuple[Path, str]]:
    """The recipe's synthesized corpus (made once), with its sentence share applied."""
    return _with_sentence_share(read_corpus(training_corpus(recipe.utterances, recipe.seed)), recipe)


def _features_cache() -> Path:
    from edge_asr.paths import home

    return home() / "features"


def held_out_examples(progress: bool = True):
    return prepare_features(
        read_corpus(held_out_corpus(progress=progress)),
        copies=0,
        clean_copy=True,
        cache=_features_cache(),
        progress=progress,
    )


def train_lstm(
    out: Path,
    recipe: LstmRecipe,
    audio_dirs: list[Path] = (),
    teacher_bundle: Path | None = None,
    threads: int | None = None,
    init: Path | None = None,
    log=print,
) -> Path:
    """Synthesize (once), featurize (once), train; write `out` (.safetensors + .json). Audio folders without
    transcripts are labelled by the Whisper teacher and added to the training set. With `init`, training
    goes on from that checkpoint (its layers and normalization) with a fresh schedule."""
    torch.set_num_threads(resolve_threads(threads))
    start = time.time()
    items = training_items(recipe)
    for folder in audio_dirs:
        labelled = teacher_transcripts(audio_files(Path(folder)), teacher_bundle, threads)
        log(f"{folder}: {len(labelled)} files labelled by the teacher")
        items += labelled
    examples = prepare_features(items, recipe.copies, recipe.seed, cache=_features_cache())
    held_out = held_out_examples()
    hours = sum(len(e.features) for e in examples) / 100 / 3600
    log(f"training on {len(examples)} utterances ({hours:.1f} h with augmentation), held out {len(held_out)}")
    if init:
        model, init_meta = load_lstm(init)
        recipe.hidden = list(model.config.hidden)
        previous = init_meta.get("history", [])
        log(f"continuing from {init} ({len(previous)} epochs trained)")
    else:
        model = LstmCtc(LstmConfig(hidden=list(recipe.hidden), proj=[0] * len(recipe.hidden)))
        model.set_normalization(*normalization(examples))
        previous = []

    def keep(partial: LstmCtc, history: list[dict]) -> None:  # an interrupted run keeps its last epoch
        partial_path = Path(out).with_name(Path(out).stem + "-partial")
        save_lstm(partial, partial_path, {"recipe": asdict(recipe), "history": history})
        partial.train()

    history = train_ctc(model, examples, recipe.train_config(), held_out=held_out, log=log, on_epoch=keep)
    model.cpu().eval()
    return save_lstm(
        model,
        out,
        {
            "recipe": asdict(recipe),
            "history": previous + history,
            "init": str(init) if init else None,
            "audio_dirs": [str(d) for d in audio_dirs],
            "training_hours": round(hours, 2),
            "held_out_wer": history[-1].get("held_out_wer"),
            "train_seconds": round(time.time() - start),
            "parameters": sum(p.numel() for p in model.parameters()),
            "lstm_matrix_parameters": lstm_matrix_params(model),
        },
    )


def compress_and_recover(
    source: Path,
    out: Path,
    ratio: float = 1 / 3,
    epochs: int = 3,
    lr: float = 1e-3,
    kd_weight: float = 1.0,
    recipe: LstmRecipe | None = None,
    threads: int | None = None,
    log=print,
) -> Path:
    """Joint SVD of `source` to `ratio` of its LSTM matrices, then recovery fine-tuning: CTC on the training
    labels plus KL to the uncompressed model's frame posteriors."""
    torch.set_num_threads(resolve_threads(threads))
    teacher, meta = load_lstm(source)
    recipe = recipe or LstmRecipe(**meta.get("recipe", {}))
    student, groups = compress_lstm(teacher, ratio=ratio)
    before, after = lstm_matrix_params(teacher), lstm_matrix_params(student)
    ranks = {g.name: g.rank for g in groups}
    log(f"joint SVD: {before:,} -> {after:,} LSTM matrix parameters ({after / before:.3f}), ranks {ranks}")
    held_out = held_out_examples()
    wer_teacher, wer_svd = evaluate(teacher, held_out), evaluate(student, held_out)
    log(f"held-out WER: uncompressed {wer_teacher:.2f}, after SVD {wer_svd:.2f}")
    examples = (
        prepare_features(training_items(recipe), recipe.copies, recipe.seed, cache=_features_cache()) if epochs else []
    )
    config = TrainConfig(epochs=epochs, lr=lr, kd_weight=kd_weight, seed=recipe.seed + 1)
    history = (
        train_ctc(student, examples, config, teacher=teacher, held_out=held_out, log=log)
        if epochs
        else [{"epoch": 0, "held_out_wer": round(wer_svd, 2)}]
    )
    student.cpu().eval()
    return save_lstm(
        student,
        out,
        {
            "recipe": asdict(recipe),
            "teacher": str(source),
            "compression": {
                "ratio_target": ratio,
                "ranks": ranks,
                "lstm_matrix_parameters_before": before,
                "lstm_matrix_parameters_after": after,
                "held_out_wer_teacher": round(wer_teacher, 2),
                "held_out_wer_after_svd": round(wer_svd, 2),
            },
            "recovery": config.to_dict(),
            "history": history,
            "held_out_wer": history[-1].get("held_out_wer"),
            "parameters": sum(p.numel() for p in student.parameters()),
            "lstm_matrix_parameters": after,
        },
    )
