"""Recover pass: fine-tune a compressed Whisper against its uncompressed teacher (distillation).

Student = the compressed model, teacher = the model it was compressed from. On each window of unlabeled
audio the teacher transcribes greedily (the pseudo-label); the student is trained, teacher-forced on that
transcript, with
    loss = ce_weight * CE(student, pseudo-label) + kl_weight * T^2 * KL(teacher_T || student_T)
         (+ hidden_weight * MSE(student encoder output, teacher encoder output) when the encoder changed)
and only the factors are trained: the factored attention, linear and embedding tensors; everything the
compression left as it was stays frozen. When the encoder is untouched, the teacher's encoder output is
computed once per window and reused every epoch, which is what makes this fit in minutes on a CPU.

Audio is any folder of speech; `synthesized_audio` makes one from sentences written for it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .compress import FactoredLinear, FactoredTokenEmbedding
from .training_audio import audio_files  # noqa: F401  (the recover pass reads folders as the adapt pass does)
from .whisper_model import MultiHeadAttention, Whisper



@dataclass
class RecoveryConfig:
    epochs: int = 8
    batch_size: int = 8
    learning_rate: float = 5e-4
    warmup_steps: int = 20
    kl_weight: float = 1.0
    ce_weight: float = 0.5
    temperature: float = 2.0
    hidden_weight: float = 1.0
    max_tokens: int = 96
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Window:
    mel: Tensor        # (n_mels, 3000)
    tokens: list[int]  # prompt + pseudo-label + end of text
    prompt_len: int
    teacher_features: Tensor | None = None


# --- data ---------------------------------------------------------------------------------------------------

def synthesized_audio(count: int, seed: int = 0, voice: str | Path | None = None, progress: bool = True) -> Path:
    """A cached folder of `count` dictation sentences, spoken at three rates by the default piper voice."""
    from edge_asr.paths import home

    from .sentences import dictation_sentences
    from .synth import default_voice_path, speech_set

    voice_path = Path(voice or default_voice_path())
    folder = home() / "synth" / f"recovery-{voice_path.stem}-seed{seed}-n{count}"
    return speech_set(dictation_sentences(count, seed), folder, voice_path, length_scales=[1.0, 0.85, 1.15],
                      progress=progress)


def augment(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Level between -18 and +3 dB and, half of the time, white noise 15 to 40 dB below the speech."""
    audio = audio * 10 ** (rng.uniform(-18, 3) / 20)
    if rng.random() < 0.5:
        rms = np.sqrt(np.mean(audio ** 2)) + 1e-9
        audio = audio + rng.normal(0, rms * 10 ** (-rng.uniform(15, 40) / 20), audio.shape)
    return np.clip(audio, -1, 1).astype(np.float32)


class TorchWhisper:
    """A torch `Whisper` behind the runtime backend's interface (encode / empty_cache / decode), so that
    the teacher's pseudo-labels come from the runtime's own `GreedyDecoder` and its suppression rules.
    `features` holds the encoder output of the last `encode`."""

    def __init__(self, model: Whisper):
        self.model = model
        self.features: Tensor | None = None
        self.max_tokens = model.dims.n_text_ctx

    @torch.no_grad()
    def encode(self, mel: np.ndarray) -> list:
        self.features = self.model.encoder(torch.from_numpy(mel)[None])
        return self.model.decoder.cross_kv(self.features)

    def empty_cache(self) -> list:
        return self.model.empty_cache()

    @torch.no_grad()
    def decode(self, tokens: list[int], cache: list, cross: list) -> tuple[np.ndarray, list]:
        logits, cache = self.model.decoder.forward_cached(torch.tensor([tokens]), cache, cross)
        return logits[0].numpy(), cache


def prepare_windows(teacher: Whisper, files: list[Path], decoding: dict, seed: int, max_tokens: int,
                    keep_features: bool) -> list[Window]:
    """Mel windows of (augmented) audio, with the teacher's pseudo-labels and, if asked, its encoder output.
    `decoding` is a bundle's decoder section with n_vocab (`decoding_rules`)."""
    from tqdm import tqdm

    from edge_asr.audio import load_audio
    from edge_asr.decoding import DecodingOptions, GreedyDecoder
    from edge_asr.frontend import window_features

    from .mel import mel_filters

    filters = mel_filters(16000, 400, teacher.dims.n_mels)
    rng = np.random.default_rng(seed)
    backend = TorchWhisper(teacher)
    decoder = GreedyDecoder(backend, decoding, DecodingOptions(max_new_tokens=max_tokens))
    windows = []
    for path in tqdm(files, desc="pseudo-label", unit="file"):
        mel = window_features(augment(load_audio(path)[: 30 * 16000], rng), filters)
        label = decoder.decode(mel)
        features = backend.features[0].half() if keep_features else None
        windows.append(Window(torch.from_numpy(mel), decoder.prompt + label + [decoder.eot], len(decoder.prompt), features))
    return windows


def decoding_rules(loaded) -> dict:
    """The decoder section a bundle of `loaded` would carry, with n_vocab: the runtime decoder's config."""
    from .bundle import decoder_section

    return decoder_section(loaded) | {"n_vocab": loaded.model.dims.n_vocab}


# --- training -----------------------------------------------------------------------------------------------

def factor_parameters(model: Whisper) -> list[torch.nn.Parameter]:
    """The tensors a compression pass created: factored attention, factored linears, embedding factors."""
    params = []
    for module in model.modules():
        if isinstance(module, FactoredLinear):
            params += list(module.parameters())
        elif isinstance(module, MultiHeadAttention) and module.factored:
            params += list(module.parameters())
        elif isinstance(module, FactoredTokenEmbedding):
            params += [module.tail_proj, module.tail_t]
    return list({id(p): p for p in params}.values())


def encoder_is_factored(model: Whisper) -> bool:
    """Whether compression touched the encoder: then it trains too, and its output cannot be cached."""
    factors = {id(p) for p in factor_parameters(model)}
    return any(id(p) in factors for p in model.encoder.parameters())


def _batch(windows: list[Window]) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forcing inputs (B, L), next-token targets (B, L), and a mask (B, L) of the positions whose
    next token is part of the label (the pseudo-label and its end of text, not the prompt or padding)."""
    length = max(len(w.tokens) for w in windows) - 1
    inputs = torch.zeros(len(windows), length, dtype=torch.long)
    targets = torch.zeros(len(windows), length, dtype=torch.long)
    mask = torch.zeros(len(windows), length, dtype=torch.bool)
    for i, w in enumerate(windows):
        inputs[i, : len(w.tokens) - 1] = torch.tensor(w.tokens[:-1])
        targets[i, : len(w.tokens) - 1] = torch.tensor(w.tokens[1:])
        mask[i, w.prompt_len - 1: len(w.tokens) - 1] = True
    return inputs, targets, mask


def recover(student: Whisper, teacher: Whisper, windows: list[Window], config: RecoveryConfig,
            log=print) -> dict:
    """Fine-tune `student` in place; returns a summary (steps, seconds, first and last losses)."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))
    teacher.eval().requires_grad_(False).to(device)
    student.train().requires_grad_(False)
    trainable = factor_parameters(student)
    for p in trainable:
        p.requires_grad_(True)
    student.to(device)
    encoder_trained = encoder_is_factored(student)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    rng = np.random.default_rng(config.seed)
    steps_per_epoch = math.ceil(len(windows) / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = lambda s: min(1.0, (s + 1) / config.warmup_steps) * 0.5 * (1 + math.cos(math.pi * s / total))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    log(f"recovery: {sum(p.numel() for p in trainable):,} trainable parameters, {len(windows)} windows, "
        f"{total} steps on {device}{' (encoder included)' if encoder_trained else ''}")
    losses, start = [], time.time()
    bar = tqdm(total=total, desc="recover", unit="step")
    T = config.temperature
    for epoch in range(config.epochs):
        for batch_ids in np.array_split(rng.permutation(len(windows)), steps_per_epoch):
            batch = [windows[i] for i in batch_ids]
            inputs, targets, mask = (t.to(device) for t in _batch(batch))
            loss = torch.zeros((), device=device)
            with torch.no_grad():
                if batch[0].teacher_features is not None:
                    teacher_features = torch.stack([w.teacher_features for w in batch]).float().to(device)
                else:
                    teacher_features = teacher.encoder(torch.stack([w.mel for w in batch]).to(device))
                teacher_logits = teacher.decoder(inputs, teacher_features)[mask]
            if encoder_trained:
                features = student.encoder(torch.stack([w.mel for w in batch]).to(device))
                loss = loss + config.hidden_weight * F.mse_loss(features, teacher_features) / teacher_features.var()
            else:
                features = teacher_features
            logits = student.decoder(inputs, features)[mask]
            kl = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(teacher_logits / T, -1), log_target=True,
                          reduction="batchmean") * T * T
            ce = F.cross_entropy(logits, targets[mask])
            loss = loss + config.kl_weight * kl + config.ce_weight * ce
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-steps_per_epoch:]):.3f}")
            bar.update()
    bar.close()
    student.eval().requires_grad_(False).to("cpu")
    teacher.to("cpu")
    first = float(np.mean(losses[:steps_per_epoch]))
    last = float(np.mean(losses[-steps_per_epoch:]))
    return {"steps": total, "windows": len(windows), "seconds": round(time.time() - start, 1),
            "loss_first_epoch": round(first, 4), "loss_last_epoch": round(last, 4), "device": str(device),
            "trainable_parameters": sum(p.numel() for p in trainable), "config": config.to_dict()}
