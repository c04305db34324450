"""Converting Whisper's encoder to the streaming LSTM encoder of `cald`, and training its CTC head.

Stages, each checkpointed in the work folder (a stopped run resumes at the last checkpoint):

  1. layerwise  every LSTM block alone learns its attention sublayer's contribution from the teacher's
                own input to that block: dense per-frame regression, all blocks in one step.
  2. joint      the stacked encoder, from the mel, matches the teacher's residual stream after every
                block (reference matching on hidden states); the transferred FFNs and norms move at a
                far lower learning rate than the new LSTMs.
  3. head       a CTC head over characters on the frozen converted encoder's output, trained on the
                teacher's transcripts of the same audio (numbers in their spoken form).
  4. ctc        end to end: CTC on those transcripts (with SpecAugment) plus the stream matching of
                stage 2, which keeps the encoder near the teacher; the state with the lowest held-out
                WER against the teacher is kept.

The teacher is Whisper on the audio's own length (the dynamic-context delta merged), so its states do not
depend on 30 s of padding. The audio and the teacher's transcripts are the reference sets the
reference-matching passes share (`matching.data.reference_sets`): varied synthesized speech, recorded
speech (speechocean762, the wake-word benchmark) and a user's `--audio`, augmented, with held-out sets of
unseen voices and speakers that select the kept state. The losses divide each layer's squared error by
the teacher's variance in that layer, as `matching.engine.matching_loss` does for the decoder.

`recover` is the same joint matching with the unfactored converted model as the reference, for a
jointly factored copy, plus the KL divergence of its CTC posteriors.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from edge_asr.ctc import ALPHABET, greedy_symbols, symbols_to_text
from edge_asr.metrics import word_error_rate
from edge_asr.threads import resolve_threads
from edge_asr_build.lstm.cald import (
    CaldCtc,
    compress_cald,
    from_whisper,
    load_cald,
    lstm_matrix_params,
    save_cald,
)
from edge_asr_build.lstm.cald_data import Clip, batch_indices, batches, collate, conversion_sets, teacher_encoder
from edge_asr_build.lstm.ctc_train import spec_augment
from edge_asr_build.recipes.run import RecipeRun
from edge_asr_build.sources import load_whisper
from edge_asr_build.speech.training_audio import AudioMix
from edge_asr_build.trainer import EpochBatches, SampledBatches, Trainer, TrainerConfig

STAGES = ("layerwise", "joint", "head", "ctc")


def _extra_mix():

    # More recorded speech and short utterances than the shared mix: CTC learns to spell from these.
    return AudioMix(
        piper_sentences=100,
        espeak_sentences=100,
        short_utterances=400,
        recorded=1200,
        long_windows=0,
        non_speech=20,
        isolated_words=500,
        seed=1,
    )


@dataclass
class CaldRecipe:
    layerwise_steps: int = 400
    joint_steps: int = 400
    head_steps: int = 1500
    ctc_steps: int = 3000
    match_weight: float = 1.0  # the stream-matching term beside CTC in the end-to-end stage
    extra_mix: object = field(default_factory=_extra_mix)  # a second reference set (AudioMix), for CTC
    batch_frames: int = 3000  # encoder frames (20 ms) per batch
    lr_new: float = 1e-3  # the LSTMs and their output matrices: new parameters
    lr_transferred: float = 1e-5  # Whisper's FFNs and norms: pretrained, kept close
    lr_head: float = 3e-3
    mel_floor: float = -6.0
    seed: int = 0
    eval_every: int = 100

    def to_dict(self) -> dict:
        return asdict(self)

    def stage_groups(self, stage: str, model: CaldCtc) -> list[dict]:
        """What trains in a stage, at which learning rate: the new LSTMs fast, Whisper's weights slowly."""
        if stage == "layerwise":
            return [{"params": lstm_params(model), "lr": self.lr_new}]
        groups = [
            {"params": lstm_params(model), "lr": self.lr_new / 3},
            {"params": transferred_params(model), "lr": self.lr_transferred},
        ]
        if stage == "ctc":
            groups[1]["lr"] = 3 * self.lr_transferred
            groups.append({"params": list(model.head.parameters()), "lr": self.lr_head})
        return groups


# --- data -----------------------------------------------------------------------------------------------------


def _normalized_error(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over masked frames, divided by the target's variance there."""
    variance = target[mask].var() + 1e-6
    return ((prediction - target) ** 2).mean(-1)[mask].mean() / variance


# --- stage losses -----------------------------------------------------------------------------------------------


def layerwise_loss(model: CaldCtc, batch: list[Clip]) -> Tensor:
    """Each block's attention replacement, fed the teacher's input to that block (block 0: the converted
    front end's own output, which lacks the positional embedding the target holds)."""
    mel, targets, mask = collate(batch, model)
    n = model.config.n_layer
    with torch.no_grad():
        x0 = model.front(mel, *model.initial_state(mel.shape[0])[:2])[0]
    total = mel.new_zeros(())
    for i, block in enumerate(model.blocks):
        x_in = x0 if i == 0 else targets[:, i]
        delta, _ = block.mix(x_in)
        total = total + _normalized_error(x_in + delta, targets[:, n + 1 + i], mask)
    return total / n


def stream_loss(model: CaldCtc, batch: list[Clip]) -> Tensor:
    """The stacked encoder's residual stream after every block against the teacher's."""
    mel, targets, mask = collate(batch, model)
    _, _, stream = model.encode(mel, hidden=True)
    return _stream_error(stream, targets, mask)


def _stream_error(stream: list[Tensor], targets: Tensor, mask: Tensor) -> Tensor:
    n = len(stream) - 1
    return sum(_normalized_error(stream[i + 1], targets[:, i + 1], mask) for i in range(n)) / n


class CtcStreamLoss:
    """End to end: CTC of the head on the teacher's transcripts, plus `match_weight` times the stream error
    against the teacher, which keeps the encoder near what it was distilled to. SpecAugment (in training)
    draws from `generator`, which the trainer saves with its checkpoint."""

    def __init__(self, match_weight: float = 1.0, augment: bool = True, seed: int = 0):
        self.match_weight, self.augment = match_weight, augment
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: CaldCtc, batch: list[Clip]) -> Tensor:
        mel, targets, mask = collate(batch, model)
        if self.augment and model.training:  # masks filled with the floor: what silence reads
            b, n_mels, t = mel.shape
            floor = torch.full((n_mels,), (model.config.mel_floor + 4) / 4)
            mel = spec_augment(mel.transpose(1, 2), torch.full((b,), t), floor, self.generator).transpose(1, 2)
        out, _, stream = model.encode(mel, hidden=True)
        log_probs = model.head(out).log_softmax(-1).transpose(0, 1)
        ctc = torch.nn.functional.ctc_loss(
            log_probs,
            torch.cat([c.labels for c in batch]),
            torch.tensor([c.steps + 1 for c in batch]),
            torch.tensor([len(c.labels) for c in batch]),
            zero_infinity=True,
        )
        return ctc + self.match_weight * _stream_error(stream, targets, mask)


# --- training loop ---------------------------------------------------------------------------------------------


def run_stage(
    name: str,
    model: CaldCtc,
    param_groups: list[dict],
    loss_fn: Callable,
    clips: list[Clip],
    held_out: list[Clip],
    steps: int,
    recipe: CaldRecipe,
    checkpoint: Path | None = None,
    log=print,
    score: Callable[[CaldCtc], float] | None = None,
    until: int | None = None,
) -> dict:
    """Train `param_groups` of `model` for `steps` batches of `clips` on `loss_fn(model, batch)` (the one
    trainer); keep the parameters that score lowest on the held-out clips: `score(model)`, by default the
    mean held-out loss. Checkpointed every `eval_every` steps; `until` stops early, as a stopped run would."""
    model.requires_grad_(False)

    def evaluate() -> float:
        model.eval()
        if score is not None:
            value = score(model)
        else:
            value = sum(
                float(loss_fn(model, b)) * len(b) for b in batches(held_out, recipe.batch_frames, random.Random(0))
            ) / len(held_out)
        model.train()
        return value

    order = EpochBatches(clips, lambda rng: batch_indices(clips, recipe.batch_frames, rng), recipe.seed)
    trainer = Trainer(
        name,
        param_groups,
        lambda batch: loss_fn(model, batch),
        order,
        TrainerConfig(steps=steps, warmup_steps=max(1, steps // 20), eval_every=recipe.eval_every),
        evaluate=evaluate,
        checkpoint=checkpoint,
        generators=(loss_fn.generator,) if isinstance(loss_fn, CtcStreamLoss) else (),
        log=log,
    )
    model.train()
    result = trainer.run(until)
    model.eval()
    log(
        f"{name}: held-out {'score' if score else 'loss'} {result.curve[0]['held_out']} -> {result.best:.5f} "
        f"(step {result.best_step})"
    )
    curve = [{"step": e["step"], "train": e["train_loss"], "held_out": e["held_out"]} for e in result.curve]
    return {"steps": steps, "best_step": result.best_step, "held_out_best": round(result.best, 5), "curve": curve}


def lstm_params(model: CaldCtc) -> list:
    return [p for b in model.blocks for m in (b.lstm, b.out, b.input_proj) if m is not None for p in m.parameters()]


def transferred_params(model: CaldCtc) -> list:
    return [p for b in model.blocks for m in (b.attn_ln, b.mlp_ln, b.mlp) for p in m.parameters()]


# --- the CTC head ------------------------------------------------------------------------------------------------


@torch.no_grad()
def encoder_outputs(model: CaldCtc, clips: list[Clip], batch_frames: int) -> list[Tensor]:
    """The converted encoder's output (after ln_post) for every clip, in the clips' order."""
    out: dict[int, Tensor] = {}
    index = {id(c): i for i, c in enumerate(clips)}
    for batch in batches(clips, batch_frames, random.Random(0)):
        mel, _, _ = collate(batch, model)
        features, _ = model.encode(mel)
        for i, c in enumerate(batch):
            out[index[id(c)]] = features[i, : c.steps + 1].half()
    return [out[i] for i in range(len(clips))]


def ctc_loss(head: torch.nn.Module, features: list[Tensor], labels: list[Tensor]) -> Tensor:
    length = max(len(f) for f in features)
    x = torch.zeros(len(features), length, features[0].shape[-1])
    for i, f in enumerate(features):
        x[i, : len(f)] = f.float()
    log_probs = head(x).log_softmax(-1).transpose(0, 1)
    return torch.nn.functional.ctc_loss(
        log_probs,
        torch.cat(labels),
        torch.tensor([len(f) for f in features]),
        torch.tensor([len(label) for label in labels]),
        zero_infinity=True,
    )


def greedy_texts(head: torch.nn.Module, features: list[Tensor], alphabet: str = ALPHABET) -> list[str]:
    with torch.no_grad():
        return [symbols_to_text(greedy_symbols(head(f.float()).log_softmax(-1).numpy())[0], alphabet) for f in features]


def held_out_wer(held_out: list[Clip], batch_frames: int) -> Callable[[CaldCtc], float]:
    """A score for `run_stage`: greedy WER of the model against the teacher's transcripts of `held_out`."""

    def score(model: CaldCtc) -> float:
        features = encoder_outputs(model, held_out, batch_frames)
        texts = greedy_texts(model.head, features, model.config.alphabet)
        return word_error_rate([c.text for c in held_out], texts, normalized=False)

    return score


def train_head(
    model: CaldCtc,
    clips: list[Clip],
    held_out: list[Clip],
    recipe: CaldRecipe,
    log=print,
    checkpoint: Path | None = None,
    until: int | None = None,
) -> dict:
    """The CTC head alone (the one trainer) on the frozen encoder's cached outputs, 32 clips a step; keeps
    the best held-out WER against the teacher's transcripts, measured every 250 steps."""
    features = encoder_outputs(model, clips, recipe.batch_frames)
    held_features = encoder_outputs(model, held_out, recipe.batch_frames)
    head = model.head

    def loss(batch: list[int]) -> Tensor:
        return ctc_loss(head, [features[i] for i in batch], [clips[i].labels for i in batch])

    def evaluate() -> float:
        texts = greedy_texts(head, held_features, model.config.alphabet)
        return word_error_rate([c.text for c in held_out], texts, normalized=False)

    trainer = Trainer(
        "head",
        [{"params": list(head.parameters()), "lr": recipe.lr_head}],
        loss,
        SampledBatches(list(range(len(clips))), 32, recipe.seed),
        TrainerConfig(
            steps=recipe.head_steps,
            weight_decay=1e-4,
            warmup_steps=50,
            clip_norm=None,
            eval_every=250,
            evaluate_first=False,
        ),
        evaluate=evaluate,
        checkpoint=checkpoint,
        log=log,
    )
    result = trainer.run(until)
    if result.best is None:  # stopped (`until`) before its first evaluation
        return {"steps": result.steps, "stopped": True}
    log(f"head: held-out WER against the teacher {result.best:.2f} (step {result.best_step})")
    curve = [
        {"step": e["step"], "loss": e["train_loss"], "held_out_wer": round(e["held_out"], 2)} for e in result.curve
    ]
    return {
        "steps": recipe.head_steps,
        "best_step": result.best_step,
        "held_out_wer": round(result.best, 2),
        "curve": curve,
    }


# --- the whole conversion ---------------------------------------------------------------------------------------


def convert(run: RecipeRun, recipe: CaldRecipe | None = None, threads: int | None = None) -> Path:
    """The whole conversion of the Whisper `run.source`, stage by stage; writes `run.out` (.safetensors +
    .json). Stages are kept in the work folder; with `run.resume`, those done are not run again."""
    torch.set_num_threads(resolve_threads(threads))
    recipe = recipe or CaldRecipe()
    torch.manual_seed(recipe.seed)
    started = time.time()
    step, log = run.step, run.log
    cache, train, held_out, provenance = conversion_sets(run, recipe.extra_mix)
    prepared = time.time() - started
    step(f"convert ({len(train)} clips, {provenance['hours']} h)")
    model = from_whisper(teacher_encoder(load_whisper(run.source)))
    model.config.mel_floor = recipe.mel_floor
    stages_dir = Path(run.work or cache) / f"stages-{recipe.seed}"
    stages_dir.mkdir(parents=True, exist_ok=True)
    if not run.resume:
        for f in stages_dir.glob("*"):
            f.unlink()
    history, seconds = {}, {"prepare": round(prepared, 1)}
    for stage in STAGES:
        done = stages_dir / f"{stage}.safetensors"
        if done.exists():
            model, meta = load_cald(done)
            history[stage] = meta["stage"]
            log(f"{stage}: done earlier")
            continue
        t = time.time()
        if stage == "head":
            history[stage] = train_head(model, train, held_out, recipe, log, stages_dir / "head.pt")
        else:
            loss, steps, score = {
                "layerwise": (layerwise_loss, recipe.layerwise_steps, None),
                "joint": (stream_loss, recipe.joint_steps, None),
                "ctc": (
                    CtcStreamLoss(recipe.match_weight, seed=recipe.seed),
                    recipe.ctc_steps,
                    held_out_wer(held_out, recipe.batch_frames),
                ),
            }[stage]
            history[stage] = run_stage(
                stage,
                model,
                recipe.stage_groups(stage, model),
                loss,
                train,
                held_out,
                steps,
                recipe,
                stages_dir / f"{stage}.pt",
                log,
                score,
            )
        seconds[stage] = round(time.time() - t, 1)
        history[stage]["seconds"] = seconds[stage]
        save_cald(model, done, {"stage": history[stage]})
    return save_cald(
        model,
        run.out,
        {
            "recipe": recipe.to_dict(),
            "provenance": provenance,
            "history": history,
            "seconds": seconds,
            "corpora": [str(c) for c in run.corpora],
            "user_audio": [str(a) for a in run.user_audio],
            "parameters": sum(p.numel() for p in model.parameters()),
            "lstm_matrix_parameters": lstm_matrix_params(model),
            "held_out_wer_vs_teacher": history["ctc"]["held_out_best"],
        },
    )


# --- joint SVD and recovery against the unfactored converted model --------------------------------------------


def recovery_loss(reference: CaldCtc, kl_weight: float = 1.0) -> Callable:
    """Reference matching against the unfactored converted model: its residual stream after every block,
    and the KL divergence from its CTC posteriors to the student's."""

    def loss_fn(model: CaldCtc, batch: list[Clip]) -> Tensor:
        mel, _, mask = collate(batch, model)
        with torch.no_grad():
            ref_out, _, ref_stream = reference.encode(mel, hidden=True)
            ref_log_probs = reference.head(ref_out).log_softmax(-1)
        out, _, stream = model.encode(mel, hidden=True)
        n = model.config.n_layer
        total = sum(_normalized_error(stream[i + 1], ref_stream[i + 1], mask) for i in range(n)) / n
        log_probs = model.head(out).log_softmax(-1)
        kl = (ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1)[mask].mean()
        return total + kl_weight * kl

    return loss_fn


def compress_and_recover(
    run: RecipeRun,
    ratio: float = 1 / 3,
    model_source: str = "tiny.en",
    recipe: CaldRecipe | None = None,
    threads: int | None = None,
) -> Path:
    """Joint SVD of the converted model `run.source` (a checkpoint) to `ratio` of its LSTM matrices, then
    `run.steps` (default 300) of recovery (the LSTMs and their factors train; the rest stays) on the
    conversion's clips (those of the Whisper `model_source`); writes `run.out`."""
    source, steps, step, log = Path(run.source), 300 if run.steps is None else run.steps, run.step, run.log
    torch.set_num_threads(resolve_threads(threads))
    recipe = recipe or CaldRecipe()
    reference, meta = load_cald(source)
    student, groups = compress_cald(reference, ratio)
    before, after = lstm_matrix_params(reference), lstm_matrix_params(student)
    ranks = {g.name: g.rank for g in groups}
    log(f"joint SVD: {before:,} -> {after:,} LSTM matrix parameters ({after / before:.3f}), ranks {ranks}")
    cache, train, held_out, provenance = conversion_sets(replace(run, source=model_source), recipe.extra_mix)
    checkpoint = run.checkpoint(Path(run.work or cache) / f"recover-{source.stem}-{ratio:.3f}.pt")
    step(f"recover ({steps} steps)")
    started = time.time()
    history = (
        run_stage(
            "recover",
            student,
            [{"params": lstm_params(student), "lr": recipe.lr_new / 3}],
            recovery_loss(reference),
            train,
            held_out,
            steps,
            recipe,
            checkpoint,
            log,
        )
        if steps
        else {}
    )
    history["seconds"] = round(time.time() - started, 1)
    return save_cald(
        student,
        run.out,
        {
            "recipe": meta.get("recipe"),
            "provenance": meta.get("provenance"),
            "teacher": str(source),
            "compression": {
                "ratio_target": ratio,
                "ranks": ranks,
                "lstm_matrix_parameters_before": before,
                "lstm_matrix_parameters_after": after,
            },
            "recovery": history,
            "parameters": sum(p.numel() for p in student.parameters()),
            "lstm_matrix_parameters": after,
        },
    )
