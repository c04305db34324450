"""Reference matching: train a student to reproduce the hidden states of an unchanged reference model.

The reference is the pretrained Whisper on its usual input (a 30 s window). The student is a copy that sees
something else: a shorter window (dynamic context), or factored weights (compression). For each clip the
reference transcribes greedily, and both models are run teacher-forced on that transcript; the loss is the
mean squared difference of the decoder's hidden states, every block's output and the final norm's, each
divided by the reference's variance in that layer:

    loss = mean over layers l of  || h_l(student) - h_l(reference) ||^2 / var(h_l(reference))

over every position, the prompt's included (the no-speech probability is read at the first one). A student
whose output projection differs (a factored embedding) adds, with `output_weight`, the KL divergence from the
reference's next-token distribution, computed from its cached final state, to the student's. Matching
states rather than fitting transcripts keeps what the reference knows: the student is pulled towards the
reference's behaviour everywhere, not towards a narrow set of labels. Learning rates stay low.

The reference's side is computed once per clip and cached (`reference_items`); training then runs only the
student. Each step draws a batch, asks `input_frames` how long each clip's window is for the student (the
transform under study), and groups clips of equal length into one forward pass. Runs are seeded, can be
checkpointed and resumed, run on CUDA when present, and keep the state with the lowest held-out loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from edge_asr.frontend import N_FRAMES
from edge_asr_build.matching.data import ReferenceItem, padded
from edge_asr_build.matching.lora import add_lora
from edge_asr_build.trainer import NumpyState, Trainer, TrainerConfig
from edge_asr_build.whisper.model import Whisper

# Decoding modes a reference transcribes in, so that the student learns each: plain text (the runtime's
# default), text after a previous-text prompt, and text with timestamp tokens.


@dataclass
class MatchConfig:
    steps: int = 1500
    batch_size: int = 8
    learning_rate: float = 1e-4  # for LoRA; full-parameter runs want about 1e-5
    warmup_steps: int = 50
    lora_rank: int = 32  # 0: train every parameter of `parts`
    lora_alpha: float = 32.0
    parts: tuple[str, ...] = ("encoder", "decoder")
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100
    eval_every: int = 100
    # Weight of a second term: the KL divergence from the reference's next-token distribution (its final
    # state through its own output projection) to the student's. Zero for a student whose output projection
    # is the reference's; a factored projection changes the logits without changing any hidden state.
    output_weight: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MatchResult:
    steps: int
    seconds: float
    device: str
    trainable_parameters: int
    held_out_before: float | None
    held_out_best: float | None
    best_step: int
    curve: list[dict] = field(default_factory=list)  # {"step", "train_loss", "held_out_loss"}

    def to_dict(self) -> dict:
        return asdict(self)


# --- the reference's side ---------------------------------------------------------------------------------------


# --- the student's side -------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def matching_loss(
    student: Whisper,
    items: list[ReferenceItem],
    frames: list[int],
    device,
    encoder_cache: dict | None = None,
    reference_projection: Tensor | None = None,
    output_weight: float = 0.0,
) -> tuple[Tensor, int]:
    """Sum over `items` of the per-item loss (see the module docstring), and the number of items. Items whose
    windows have the same length share one forward pass. With `encoder_cache` (a dict, for a student whose
    encoder does not train), each item's encoder output is computed once and kept, in float16. With
    `reference_projection` (the reference's token embedding, n_vocab x n_state) and `output_weight`, the KL
    divergence of the next-token distributions is added, per position, with that weight."""
    total, groups = torch.zeros((), device=device), {}
    for item, n in zip(items, frames):
        groups.setdefault(n, []).append(item)
    for n, group in groups.items():
        mel = torch.stack([padded(item.mel, n) for item in group]).to(device)
        length = max(len(item.tokens) for item in group)
        tokens = torch.zeros(len(group), length, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.bool)
        targets = torch.zeros(len(group), *group[0].states.shape[:1], length, group[0].states.shape[-1])
        for i, item in enumerate(group):
            tokens[i, : len(item.tokens)] = item.tokens
            mask[i, : len(item.tokens)] = True
            targets[i, :, : len(item.tokens)] = item.states.float()
        tokens, mask, targets = tokens.to(device), mask.to(device), targets.to(device)
        if encoder_cache is None:
            features = student.encoder(mel)
        else:
            missing = [i for i, item in enumerate(group) if (id(item), n) not in encoder_cache]
            if missing:
                with torch.no_grad():
                    computed = student.encoder(mel[missing])
                for i, f in zip(missing, computed):
                    encoder_cache[(id(group[i]), n)] = f.half()
            features = torch.stack([encoder_cache[(id(item), n)] for item in group]).float()
        states = student.decoder.hidden_states(tokens, student.decoder.cross_kv(features))
        for layer, state in zip(reference_layers(student, targets.shape[1]), states):
            target = targets[:, layer]
            variance = target[mask].var() + 1e-6
            per_position = ((state - target) ** 2).mean(-1) / variance  # (B, L)
            per_item = (per_position * mask).sum(-1) / mask.sum(-1)
            total = total + per_item.sum() / len(states)
        if reference_projection is not None and output_weight:
            log_p = torch.log_softmax(targets[:, -1] @ reference_projection.T, -1)
            log_q = torch.log_softmax(student.decoder.token_embedding.logits(states[-1]), -1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, L)
            total = total + output_weight * ((kl * mask).sum(-1) / mask.sum(-1)).sum()
    return total, len(items)


def reference_layers(student: Whisper, n_states: int) -> list[int]:
    """Which of the reference's `n_states` hidden states each of the student's matches: block for block,
    then the final norm's; a pruned student's blocks (`layers.prune`) match the original blocks they are."""
    kept = (getattr(student, "pruned", None) or {}).get("decoder")
    return [*kept, n_states - 1] if kept is not None else list(range(n_states))


@torch.no_grad()
def held_out_loss(
    student: Whisper,
    items: list[ReferenceItem],
    input_frames: Callable,
    device,
    seed: int = 1234,
    encoder_cache: dict | None = None,
    **output,
) -> float:
    """Mean loss over `items` with windows drawn by `input_frames` from a fixed seed (the same every call)."""
    rng = np.random.default_rng(seed)
    student.eval()
    total = 0.0
    for start in range(0, len(items), 16):
        batch = items[start : start + 16]
        loss, _ = matching_loss(
            student, batch, [input_frames(item.frames, rng) for item in batch], device, encoder_cache, **output
        )
        total += float(loss)
    return total / max(1, len(items))


def trainable_parameters(student: Whisper, config: MatchConfig) -> list[torch.nn.Parameter]:
    """LoRA adapters on every linear layer of `config.parts` (added in place), or with rank 0 every parameter
    of those parts. Everything else is frozen."""
    student.requires_grad_(False)
    if config.lora_rank:
        params = add_lora(student, config.lora_rank, config.lora_alpha, config.parts)
    else:
        params = [p for part in config.parts for p in student.get_submodule(part).parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


class MatchingBatches:
    """`batch_size` items drawn without replacement, each with the student's window length for it
    (`input_frames(clip_frames, rng)`), all from one numpy generator: the data order of a matching run."""

    def __init__(self, items: list[ReferenceItem], batch_size: int, input_frames: Callable, seed: int):
        self.items, self.batch_size, self.input_frames = items, batch_size, input_frames
        self.rng = np.random.default_rng(seed)

    def next_batch(self) -> tuple[list[ReferenceItem], list[int]]:
        batch = [self.items[i] for i in self.rng.choice(len(self.items), size=self.batch_size, replace=False)]
        return batch, [self.input_frames(item.frames, self.rng) for item in batch]

    def state_dict(self) -> dict:
        return {"rng": NumpyState.save(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        NumpyState.load(self.rng, state["rng"])


def match_reference(
    student: Whisper,
    items: list[ReferenceItem],
    config: MatchConfig,
    input_frames: Callable[[int, np.random.Generator], int] = lambda frames, rng: N_FRAMES,
    held_out: list[ReferenceItem] = (),
    held_out_frames: Callable | None = None,
    trainable: list[torch.nn.Parameter] | None = None,
    checkpoint: Path | None = None,
    until: int | None = None,
    reference_projection: Tensor | None = None,
    log=print,
) -> MatchResult:
    """Train `student` in place to match the reference states of `items`, on the one trainer.

    `input_frames(clip_frames, rng)` is the student's window length for a clip (the transform under study);
    `held_out_frames` does the same for the held-out loss (default: `input_frames`), which selects the state
    kept; `trainable` defaults to `trainable_parameters(student, config)`. With `checkpoint`, the run saves
    its state there every `checkpoint_every` steps and resumes from it if it exists; `until` stops the run
    after that step (with a checkpoint), as a stopped session would, for a later call to resume. When no
    trainable parameter is in the encoder, its outputs are computed once per clip and window length and
    reused (float16, in memory)."""
    torch.manual_seed(config.seed)
    device = _resolve_device(config.device)
    params = trainable if trainable is not None else trainable_parameters(student, config)
    student.to(device)
    held_out, held_out_frames = list(held_out), held_out_frames or input_frames
    output = {
        "reference_projection": None if reference_projection is None else reference_projection.to(device),
        "output_weight": config.output_weight,
    }
    encoder_ids = {id(p) for p in student.encoder.parameters()}
    encoder_cache = None if any(id(p) in encoder_ids for p in params) else {}

    def loss(batch) -> Tensor:
        student.train()
        total, count = matching_loss(student, *batch, device, encoder_cache, **output)
        return total / count

    def evaluate() -> float:
        return held_out_loss(student, held_out, held_out_frames, device, encoder_cache=encoder_cache, **output)

    trainer = Trainer(
        "match reference",
        [{"params": params, "lr": config.learning_rate}],
        loss,
        MatchingBatches(items, config.batch_size, input_frames, config.seed),
        TrainerConfig(
            steps=config.steps,
            warmup_steps=config.warmup_steps,
            eval_every=config.eval_every,
            checkpoint_every=config.checkpoint_every,
        ),
        evaluate=evaluate if held_out else None,
        checkpoint=checkpoint,
        log=log,
    )
    log(
        f"reference matching: {sum(p.numel() for p in params):,} trainable parameters, {len(items)} clips, "
        f"{config.steps} steps of {config.batch_size} on {device}"
    )
    result = trainer.run(until)
    student.eval().requires_grad_(False).to("cpu")
    return MatchResult(
        steps=result.steps,
        seconds=result.seconds,
        device=str(device),
        trainable_parameters=sum(p.numel() for p in params),
        held_out_before=None if result.before is None else round(result.before, 5),
        held_out_best=None if result.best is None else round(result.best, 5),
        best_step=result.best_step,
        curve=[
            {"step": e["step"], "train_loss": e["train_loss"], "held_out_loss": e["held_out"]} for e in result.curve
        ],
    )
