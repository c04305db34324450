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
reference-matching passes share (`context_adapt.reference_sets`): varied synthesized speech, recorded
speech (speechocean762, the wake-word benchmark) and a user's `--audio`, augmented, with held-out sets of
unseen voices and speakers that select the kept state. The losses divide each layer's squared error by
the teacher's variance in that layer, as `reference.matching_loss` does for the decoder.

`recover` is the same joint matching with the unfactored converted model as the reference, for a
jointly factored copy, plus the KL divergence of its CTC posteriors.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from edge_asr.ctc import ALPHABET, greedy_symbols, symbols_to_text
from edge_asr.metrics import word_error_rate
from edge_asr.threads import resolve_threads
from edge_asr_build.lstm.cald import CaldCtc, from_whisper, lstm_matrix_params, save_cald, teacher_stream

STAGES = ("layerwise", "joint", "head", "ctc")


def _extra_mix():
    from edge_asr_build.speech.training_audio import AudioMix

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


@dataclass
class Clip:
    mel: Tensor  # (n_mels, T) float16: Whisper's scaled log-mel of the clip, T even
    targets: Tensor  # (2L + 1, T/2, n_state) float16: the teacher's x_0 … x_L, then m_0 … m_{L-1}
    labels: Tensor  # (K,) int64: the teacher's transcript in ALPHABET ids
    text: str

    @property
    def steps(self) -> int:
        return self.mel.shape[-1] // 2


# --- data -----------------------------------------------------------------------------------------------------


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
    from edge_asr.context import ContextPolicy
    from edge_asr_build.lstm.ctc_data import spoken_form
    from edge_asr_build.lstm.ctc_train import encode_text
    from edge_asr_build.matching.engine import padded

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
    from safetensors.torch import save_file

    tensors = {}
    for i, c in enumerate(clips):
        tensors |= {f"{i}.mel": c.mel.contiguous(), f"{i}.targets": c.targets.contiguous(), f"{i}.labels": c.labels}
    texts = "\n".join(c.text for c in clips)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"count": str(len(clips)), "texts": texts})
    tmp.replace(path)


def load_clips(path: Path) -> list[Clip]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        texts = meta["texts"].split("\n")
        return [
            Clip(f.get_tensor(f"{i}.mel"), f.get_tensor(f"{i}.targets"), f.get_tensor(f"{i}.labels"), texts[i])
            for i in range(int(meta["count"]))
        ]


def batches(clips: list[Clip], max_frames: int, rng: random.Random) -> list[list[Clip]]:
    """Batches of similar length, at most `max_frames` padded encoder frames each, in random order."""
    order = sorted(clips, key=lambda c: c.steps + rng.random() * 20)
    out, current = [], []
    for c in order:
        if current and (len(current) + 1) * c.steps > max_frames:
            out.append(current)
            current = []
        current.append(c)
    out.append(current)
    rng.shuffle(out)
    return out


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


def ctc_stream_loss(match_weight: float = 1.0, augment: bool = True, seed: int = 0) -> Callable:
    """End to end: CTC of the head on the teacher's transcripts, plus `match_weight` times the stream
    error against the teacher, which keeps the encoder near what it was distilled to."""
    rng = torch.Generator().manual_seed(seed)

    from edge_asr_build.lstm.ctc_train import spec_augment

    def loss_fn(model: CaldCtc, batch: list[Clip]) -> Tensor:
        mel, targets, mask = collate(batch, model)
        if augment and model.training:  # masks filled with the floor: what silence reads
            b, n_mels, t = mel.shape
            floor = torch.full((n_mels,), (model.config.mel_floor + 4) / 4)
            mel = spec_augment(mel.transpose(1, 2), torch.full((b,), t), floor, rng).transpose(1, 2)
        out, _, stream = model.encode(mel, hidden=True)
        log_probs = model.head(out).log_softmax(-1).transpose(0, 1)
        ctc = torch.nn.functional.ctc_loss(
            log_probs,
            torch.cat([c.labels for c in batch]),
            torch.tensor([c.steps + 1 for c in batch]),
            torch.tensor([len(c.labels) for c in batch]),
            zero_infinity=True,
        )
        return ctc + match_weight * _stream_error(stream, targets, mask)

    return loss_fn


# --- training loop ---------------------------------------------------------------------------------------------


def _schedule(optimizer, steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )


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
) -> dict:
    """Train `param_groups` of `model` for `steps` batches of `clips` on `loss_fn(model, batch)`; keep the
    parameters that score lowest on the held-out clips: `score(model)`, by default the mean held-out loss.
    Checkpointed every `eval_every` steps."""
    from tqdm import tqdm

    params = [p for g in param_groups for p in g["params"]]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    scheduler = _schedule(optimizer, steps, max(1, steps // 20))
    rng = random.Random(recipe.seed)
    queue: list = []
    step, curve, best = 0, [], {"loss": float("inf"), "step": 0, "params": None}
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        for p, value in zip(params, state["params"]):
            p.data.copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, curve = int(state["step"]), [dict(zip(("step", "train", "held_out"), r)) for r in state["curve"].tolist()]
        best = {
            "loss": float(state["best_loss"]),
            "step": int(state["best_step"]),
            "params": state["best_params"] or None,
        }
        rng.seed(recipe.seed + step)
        log(f"{name}: resumed at step {step}")

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            if score is not None:
                value = score(model)
            else:
                value = sum(
                    float(loss_fn(model, b)) * len(b) for b in batches(held_out, recipe.batch_frames, random.Random(0))
                ) / len(held_out)
        model.train()
        return value

    if step == 0:
        best["loss"] = held_out_loss()
        curve.append({"step": 0, "train": None, "held_out": round(best["loss"], 5)})
    bar = tqdm(total=steps, initial=step, desc=name, unit="step")
    running = []
    model.train()
    while step < steps:
        if not queue:
            queue = batches(clips, recipe.batch_frames, rng)
        loss = loss_fn(model, queue.pop())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        running.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}")
        if step % recipe.eval_every == 0 or step == steps:
            held = held_out_loss()
            curve.append(
                {
                    "step": step,
                    "train": round(float(np.mean(running[-recipe.eval_every :])), 5),
                    "held_out": round(held, 5),
                }
            )
            if held < best["loss"]:
                best = {"loss": held, "step": step, "params": [p.detach().clone() for p in params]}
            if checkpoint is not None:
                rows = [[c["step"], -1.0 if c["train"] is None else c["train"], c["held_out"]] for c in curve]
                tmp = checkpoint.with_suffix(".tmp")
                torch.save(
                    {
                        "params": [p.detach() for p in params],
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "step": step,
                        "curve": torch.tensor(rows),
                        "best_loss": best["loss"],
                        "best_step": best["step"],
                        "best_params": best["params"] or [],
                    },
                    tmp,
                )
                tmp.replace(checkpoint)
    bar.close()
    if best["params"] is not None:
        for p, value in zip(params, best["params"]):
            p.data.copy_(value)
    model.eval().requires_grad_(False)
    log(
        f"{name}: held-out {'score' if score else 'loss'} {curve[0]['held_out']} -> {best['loss']:.5f} "
        f"(step {best['step']})"
    )
    return {"steps": steps, "best_step": best["step"], "held_out_best": round(best["loss"], 5), "curve": curve}


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


def train_head(model: CaldCtc, clips: list[Clip], held_out: list[Clip], recipe: CaldRecipe, log=print) -> dict:
    """The CTC head alone on the frozen encoder's cached outputs; keeps the best held-out WER (against the
    teacher's transcripts)."""
    from tqdm import tqdm

    features = encoder_outputs(model, clips, recipe.batch_frames)
    held_features = encoder_outputs(model, held_out, recipe.batch_frames)
    head = model.head
    head.requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=recipe.lr_head, weight_decay=1e-4)
    scheduler = _schedule(optimizer, recipe.head_steps, 50)
    rng = random.Random(recipe.seed)
    order = list(range(len(clips)))
    best = {"wer": float("inf"), "step": 0, "state": None}
    curve = []
    for step in tqdm(range(1, recipe.head_steps + 1), desc="head", unit="step"):
        chosen = rng.sample(order, min(32, len(order)))
        loss = ctc_loss(head, [features[i] for i in chosen], [clips[i].labels for i in chosen])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 250 == 0 or step == recipe.head_steps:
            texts = greedy_texts(head, held_features, model.config.alphabet)
            wer = word_error_rate([c.text for c in held_out], texts, normalized=False)
            curve.append({"step": step, "loss": round(float(loss), 4), "held_out_wer": round(wer, 2)})
            if wer < best["wer"]:
                best = {"wer": wer, "step": step, "state": {k: v.clone() for k, v in head.state_dict().items()}}
    head.load_state_dict(best["state"])
    head.requires_grad_(False)
    log(f"head: held-out WER against the teacher {best['wer']:.2f} (step {best['step']})")
    return {
        "steps": recipe.head_steps,
        "best_step": best["step"],
        "held_out_wer": round(best["wer"], 2),
        "curve": curve,
    }


# --- the whole conversion ---------------------------------------------------------------------------------------


def teacher_encoder(loaded, delta: Path | None = None):
    """The encoder of a loaded Whisper with the dynamic-context delta merged into it (in place): the teacher."""
    from edge_asr_build.matching.lora import apply_delta
    from edge_asr_build.recipes.adapt import DEFAULT_DELTA

    apply_delta(loaded.model, Path(delta or DEFAULT_DELTA))
    return loaded.model.encoder.eval()


def conversion_sets(
    source: str,
    corpora: list[Path],
    user_audio: list[Path],
    work: Path | None,
    step=lambda m: None,
    delta: Path | None = None,
    recipe: CaldRecipe | None = None,
) -> tuple[Path, list[Clip], list[Clip], dict]:
    """(work folder, training clips, held-out clips, provenance), made once and cached in the work folder:
    the reference sets every matching pass shares, and the recipe's extra set."""
    from tokenizers import Tokenizer
    from tqdm import tqdm

    from edge_asr_build.matching.engine import items_key
    from edge_asr_build.recipes.adapt import ContextRecipe, reference_sets
    from edge_asr_build.sources import decoding_rules, load_whisper

    shared = ContextRecipe()
    loaded = load_whisper(source)
    work, train_items, held_items = reference_sets(
        loaded,
        shared.mix,
        shared.held_out,
        shared.match.seed,
        corpora,
        user_audio,
        None,
        "context",
        shared.version,
        step,
    )
    extra_mix = (recipe or CaldRecipe()).extra_mix
    _, extra_items, _ = reference_sets(
        loaded,
        extra_mix,
        shared.held_out,
        shared.match.seed,
        corpora,
        user_audio,
        None,
        "context",
        shared.version,
        step,
    )
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


def convert(
    out: Path,
    source: str = "tiny.en",
    corpora: list[Path] = (),
    user_audio: list[Path] = (),
    recipe: CaldRecipe | None = None,
    work: Path | None = None,
    resume: bool = False,
    threads: int | None = None,
    step=lambda m: None,
    log=print,
) -> Path:
    """The whole conversion, stage by stage; writes `out` (.safetensors + .json)."""
    torch.set_num_threads(resolve_threads(threads))
    recipe = recipe or CaldRecipe()
    torch.manual_seed(recipe.seed)
    started = time.time()
    cache, train, held_out, provenance = conversion_sets(
        source, list(corpora), list(user_audio), work, step, recipe=recipe
    )
    prepared = time.time() - started
    step(f"convert ({len(train)} clips, {provenance['hours']} h)")
    from edge_asr_build.sources import load_whisper

    model = from_whisper(teacher_encoder(load_whisper(source)))
    model.config.mel_floor = recipe.mel_floor
    stages_dir = Path(work or cache) / f"stages-{recipe.seed}"
    stages_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for f in stages_dir.glob("*"):
            f.unlink()
    history, seconds = {}, {"prepare": round(prepared, 1)}
    for stage in STAGES:
        done = stages_dir / f"{stage}.safetensors"
        if done.exists():
            from edge_asr_build.lstm.cald import load_cald

            model, meta = load_cald(done)
            history[stage] = meta["stage"]
            log(f"{stage}: done earlier")
            continue
        t = time.time()
        if stage == "head":
            history[stage] = train_head(model, train, held_out, recipe, log)
        else:
            loss, steps, score = {
                "layerwise": (layerwise_loss, recipe.layerwise_steps, None),
                "joint": (stream_loss, recipe.joint_steps, None),
                "ctc": (
                    ctc_stream_loss(recipe.match_weight, seed=recipe.seed),
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
        out,
        {
            "recipe": recipe.to_dict(),
            "provenance": provenance,
            "history": history,
            "seconds": seconds,
            "corpora": [str(c) for c in corpora],
            "user_audio": [str(a) for a in user_audio],
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
    source: Path,
    out: Path,
    ratio: float = 1 / 3,
    steps: int = 300,
    corpora: list[Path] = (),
    user_audio: list[Path] = (),
    model_source: str = "tiny.en",
    recipe: CaldRecipe | None = None,
    work: Path | None = None,
    resume: bool = False,
    threads: int | None = None,
    step=lambda m: None,
    log=print,
) -> Path:
    """Joint SVD of a converted model to `ratio` of its LSTM matrices, then `steps` of recovery (the LSTMs
    and their factors train; the rest stays) on the conversion's clips; writes `out`."""
    from edge_asr_build.lstm.cald import compress_cald, load_cald

    torch.set_num_threads(resolve_threads(threads))
    recipe = recipe or CaldRecipe()
    reference, meta = load_cald(source)
    student, groups = compress_cald(reference, ratio)
    before, after = lstm_matrix_params(reference), lstm_matrix_params(student)
    ranks = {g.name: g.rank for g in groups}
    log(f"joint SVD: {before:,} -> {after:,} LSTM matrix parameters ({after / before:.3f}), ranks {ranks}")
    cache, train, held_out, provenance = conversion_sets(
        model_source, list(corpora), list(user_audio), work, step, recipe=recipe
    )
    checkpoint = Path(work or cache) / f"recover-{Path(source).stem}-{ratio:.3f}.pt"
    if not resume:
        checkpoint.unlink(missing_ok=True)
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
        out,
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
