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

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from edge_asr.decoding import suppression_masks
from edge_asr.frontend import N_FFT, N_FRAMES, log_mel_spectrogram, pad_or_trim
from edge_asr_build.matching.lora import add_lora
from edge_asr_build.whisper.model import Whisper

# Decoding modes a reference transcribes in, so that the student learns each: plain text (the runtime's
# default), text after a previous-text prompt, and text with timestamp tokens.
MODES = ("plain", "prompt", "timestamps")


@dataclass
class ReferenceItem:
    mel: Tensor  # (n_mels, frames) float16: log-mel of the clip's own frames, unpadded
    tokens: Tensor  # (L,) int64: the decoder input, prompt + the reference's transcript
    states: Tensor  # (n_layer + 1, L, n_state) float16: the reference's hidden states on `tokens`
    mode: str = "plain"

    @property
    def frames(self) -> int:
        return self.mel.shape[-1]


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
    reference: Whisper, mel: Tensor, decoding: dict, mode: str = "plain", previous: list[int] = ()
) -> ReferenceItem | None:
    """The reference's transcript and hidden states for one clip (its `clip_mel`) on its 30 s window."""
    cross = reference.decoder.cross_kv(reference.encoder(padded(mel, N_FRAMES)[None]))
    prompt = _decoding_prompt(decoding, mode, list(previous))
    label = greedy(reference, cross, prompt, decoding, timestamps=mode == "timestamps")
    if label is None:
        return None
    tokens = torch.tensor(prompt + label[:-1])  # the input; its last position predicts the end of text
    states = torch.stack([s[0] for s in reference.decoder.hidden_states(tokens[None], cross)]).half()
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
) -> list[ReferenceItem]:
    """Reference items for `clips` (audio arrays, or their `clip_mel`s), each in a decoding mode drawn by
    `mode_shares`; "prompt" items get a previous-text prompt made of one of `texts` (tokenized by
    `encode_text`)."""
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
        item = reference_item(reference, mel, decoding, mode, previous)
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
    """Train `student` in place to match the reference states of `items`.

    `input_frames(clip_frames, rng)` is the student's window length for a clip (the transform under study);
    `held_out_frames` does the same for the held-out loss (default: `input_frames`), which selects the state kept;
    `trainable` defaults to `trainable_parameters(student, config)`. With `checkpoint`, the run saves its state
    there every `checkpoint_every` steps and resumes from it if it exists; `until` stops the run after that step
    (with a checkpoint), as a stopped session would, for a later call to resume. The parameters that scored the
    lowest held-out loss are restored at the end. When no trainable parameter is in the encoder, its outputs are
    computed once per clip and window length and reused (float16, in memory)."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    device = _resolve_device(config.device)
    params = trainable if trainable is not None else trainable_parameters(student, config)
    student.to(device)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    warmup = lambda s: min(1.0, (s + 1) / config.warmup_steps) * 0.5 * (1 + math.cos(math.pi * s / config.steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
    held_out_frames = held_out_frames or input_frames
    output = {
        "reference_projection": None if reference_projection is None else reference_projection.to(device),
        "output_weight": config.output_weight,
    }
    encoder_ids = {id(p) for p in student.encoder.parameters()}
    encoder_cache = None if any(id(p) in encoder_ids for p in params) else {}
    rng = np.random.default_rng(config.seed)
    curve, train_losses, step, started = [], [], 0, time.time()
    best = {"loss": math.inf, "step": 0, "params": None}
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=True)
        for p, value in zip(params, state["params"]):
            p.data.copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = _numpy_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        step, curve = int(state["step"]), list(_curve(state["curve"]))
        best = {
            "loss": float(state["best_loss"]),
            "step": int(state["best_step"]),
            "params": state["best_params"] or None,
        }
        log(f"resumed at step {step} from {checkpoint}")
    before = (
        held_out_loss(student, list(held_out), held_out_frames, device, encoder_cache=encoder_cache, **output)
        if held_out and step == 0
        else None
    )
    if before is not None:
        curve.append({"step": 0, "train_loss": None, "held_out_loss": round(before, 5)})
        best = {"loss": before, "step": 0, "params": [p.detach().cpu().clone() for p in params]}
    log(
        f"reference matching: {sum(p.numel() for p in params):,} trainable parameters, {len(items)} clips, "
        f"{config.steps} steps of {config.batch_size} on {device}"
    )
    bar = tqdm(total=config.steps, initial=step, desc="match reference", unit="step")
    last = min(config.steps, until or config.steps)
    while step < last:
        student.train()
        batch = [items[i] for i in rng.choice(len(items), size=config.batch_size, replace=False)]
        frames = [input_frames(item.frames, rng) for item in batch]
        loss, count = matching_loss(student, batch, frames, device, encoder_cache, **output)
        loss = loss / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        train_losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(train_losses[-50:]):.4f}")
        bar.update()
        if held_out and (step % config.eval_every == 0 or step == config.steps):
            value = held_out_loss(
                student, list(held_out), held_out_frames, device, encoder_cache=encoder_cache, **output
            )
            curve.append(
                {
                    "step": step,
                    "train_loss": round(float(np.mean(train_losses[-config.eval_every :])), 5),
                    "held_out_loss": round(value, 5),
                }
            )
            if value < best["loss"]:
                best = {"loss": value, "step": step, "params": [p.detach().cpu().clone() for p in params]}
        if checkpoint is not None and (step % config.checkpoint_every == 0 or step == last):
            _save_checkpoint(checkpoint, params, optimizer, scheduler, rng, step, curve, best)
    bar.close()
    if best["params"] is not None:
        for p, value in zip(params, best["params"]):
            p.data.copy_(value.to(p.device))
    student.eval().requires_grad_(False).to("cpu")
    return MatchResult(
        steps=step,
        seconds=round(time.time() - started, 1),
        device=str(device),
        trainable_parameters=sum(p.numel() for p in params),
        held_out_before=None if before is None else round(before, 5),
        held_out_best=None if not held_out else round(best["loss"], 5),
        best_step=best["step"],
        curve=curve,
    )


def _save_checkpoint(path: Path, params, optimizer, scheduler, rng, step, curve, best) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "params": [p.detach().cpu() for p in params],
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _flat_numpy_state(rng.bit_generator.state),
        "torch_rng": torch.get_rng_state(),
        "step": step,
        "curve": [
            [c["step"], c["train_loss"] if c["train_loss"] is not None else -1.0, c["held_out_loss"]] for c in curve
        ],
        "best_loss": best["loss"],
        "best_step": best["step"],
        "best_params": best["params"] or [],
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a run stopped mid-save keeps the previous checkpoint


def _flat_numpy_state(state: dict) -> list:
    # PCG64's state as plain numbers: a checkpoint then loads with weights_only=True.
    return [state["state"]["state"], state["state"]["inc"], state["has_uint32"], state["uinteger"]]


def _numpy_state(flat: list) -> dict:
    return {
        "bit_generator": "PCG64",
        "state": {"state": int(flat[0]), "inc": int(flat[1])},
        "has_uint32": int(flat[2]),
        "uinteger": int(flat[3]),
    }


def _curve(rows):
    for s, train, held in rows:
        yield {"step": int(s), "train_loss": None if train < 0 else train, "held_out_loss": held}


def items_key(*parts) -> str:
    """A short hash naming a cache of reference items by everything that made them."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]
