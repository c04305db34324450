"""Calibration for compression: what the inputs of each matrix look like, and how much each cut costs.

Two measurements on calibration audio (synthesized, varied, seeded: the same audio on every machine, so the
factors it shapes are rebuilt everywhere to within float rounding, which `compress.factors_fingerprint` checks):

  * `collect_moments` (or `MomentRecorder`, on the reference pass itself): the second moment E[x x^T] of the
    input of every linear layer, and of the decoder's final state (the input of the output projection).
    Activation-aware factorization (`compress`) weights each matrix's approximation error by it:
    directions the activations use are kept, unused ones cut.
  * `Distortion`: the reference model's next-token distributions on its own transcripts of the calibration
    clips, teacher-forced. `Distortion.of(model)` is the mean KL divergence from the reference to `model`
    over every position: the price of a cut, measured on the output instead of guessed from singular
    values (`compress.measure_groups` factors one matrix at a time at each candidate rank).
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge_asr.frontend import N_FRAMES
from edge_asr_build.matching.data import ReferenceItem, padded
from edge_asr_build.speech.augment import MATCHING, augment
from edge_asr_build.speech.sentences import dictation_sentences, short_phrases
from edge_asr_build.speech.synth import synthesize
from edge_asr_build.whisper.model import Whisper

# The decoder's final layer norm: its output is the input of the output projection (the tied embedding).
FINAL_STATE = "decoder.ln"


@dataclass(frozen=True)
class CalibrationMix:
    """Calibration clips: piper without its prosody noise (deterministic), sentences and short utterances
    at varied rates, half of them augmented by a seeded chain (noise, reverberation, band, level)."""

    sentences: int = 48
    short_utterances: int = 16
    augment_share: float = 0.5
    seed: int = 31

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_clips(mix: CalibrationMix = CalibrationMix()) -> list[np.ndarray]:

    rng, np_rng = random.Random(mix.seed), np.random.default_rng(mix.seed)
    texts = dictation_sentences(mix.sentences, seed=500 + mix.seed) + short_phrases(
        mix.short_utterances, 500 + mix.seed
    )
    clips = []
    for text in texts:
        audio = synthesize(text, length_scale=round(rng.uniform(0.8, 1.25), 2))
        clips.append(augment(audio, np_rng, MATCHING) if np_rng.random() < mix.augment_share else audio)
    return clips


# --- input moments ------------------------------------------------------------------------------------------------


@dataclass
class InputMoments:
    """Running sums of a layer's inputs: sum of x x^T, sum of x, count (float64)."""

    outer: Tensor
    total: Tensor
    count: int = 0

    @classmethod
    def empty(cls, dim: int) -> "InputMoments":
        return cls(torch.zeros(dim, dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64))

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        self.outer += x.T @ x
        self.total += x.sum(0)
        self.count += len(x)

    def second_moment(self, with_constant: bool = False) -> Tensor:
        """E[x x^T]; `with_constant`: of [x, 1], for a layer whose bias is folded in as a last input column."""
        m = self.outer / self.count
        if not with_constant:
            return m
        mean = (self.total / self.count)[:, None]
        return torch.cat([torch.cat([m, mean], 1), torch.cat([mean.T, torch.ones(1, 1, dtype=m.dtype)], 1)])

    def whitener(self, with_constant: bool = False, damping: float = 1e-4) -> Tensor:
        """Lower-triangular L with L L^T = E[x x^T] + damping * mean(diag) * I. For any W, the error of a
        truncated SVD of W L, mapped back by L^-1, is E||(W - W_r) x||^2: the activation-weighted error.
        The damping keeps L invertible where some input direction is (nearly) never used."""
        m = self.second_moment(with_constant)
        m = m + damping * m.diagonal().mean() * torch.eye(len(m), dtype=m.dtype)
        return torch.linalg.cholesky(m)


class MomentRecorder:
    """Records the input moments of every linear layer of `sides` (and the output of `FINAL_STATE`) while it is
    `observing()`. What one clip recorded is added when the clip is kept (`commit`) and dropped if not
    (`discard`), so a pass that makes reference items (`matching.data.reference_items(observer=...)`)
    collects the moments of the items it keeps on the way, without a second forward pass."""

    def __init__(self, model: Whisper, sides: tuple[str, ...] = ("encoder", "decoder")):
        self.moments: dict[str, InputMoments] = {}
        self._pending: list[tuple[str, Tensor]] = []  # (layer, input), in the order the hooks fired
        self._on = False
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[0] in sides]
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in layers]
        self._handles.append(model.get_submodule(FINAL_STATE).register_forward_hook(self._hook(FINAL_STATE, True)))

    def _hook(self, name: str, output: bool = False):
        def record(module, inputs, result):
            if self._on:
                self._pending.append((name, (result if output else inputs[0]).detach()))

        return record

    @contextmanager
    def observing(self):
        self._on = True
        try:
            yield
        finally:
            self._on = False

    def commit(self) -> None:
        for name, x in self._pending:
            self.moments.setdefault(name, InputMoments.empty(x.shape[-1])).add(x)
        self._pending.clear()

    def discard(self) -> None:
        self._pending.clear()

    def __enter__(self) -> MomentRecorder:
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()


@torch.inference_mode()
def collect_moments(
    model: Whisper,
    items: list[ReferenceItem],
    frames: int = N_FRAMES,
    device: str = "cpu",
    sides: tuple[str, ...] = ("encoder", "decoder"),
) -> dict[str, InputMoments]:
    """{layer name: moments of its input} for every linear layer of `sides`, and `FINAL_STATE` for the
    decoder's final state, over `items` (each clip on a window of `frames`, its reference transcript
    teacher-forced)."""
    try:
        model.eval().to(device)
        with MomentRecorder(model, sides) as recorder:
            for item in items:
                with recorder.observing():
                    mel = padded(item.mel, frames)[None].to(device)
                    model.decoder.hidden_states(
                        item.tokens[None].to(device), model.decoder.cross_kv(model.encoder(mel))
                    )
                recorder.commit()
    finally:
        model.to("cpu")
    return recorder.moments


# --- output distortion --------------------------------------------------------------------------------------------


@dataclass
class Distortion:
    """The reference's log-probabilities on calibration items, to score other models against."""

    items: list[ReferenceItem]
    features: list[Tensor]  # the reference encoder's output per item
    log_probs: list[Tensor]  # (L, n_vocab) per item
    frames: int = N_FRAMES
    device: str = "cpu"

    @classmethod
    @torch.inference_mode()
    def of_reference(
        cls, reference: Whisper, items: list[ReferenceItem], frames: int = N_FRAMES, device: str = "cpu"
    ) -> "Distortion":
        reference.eval().to(device)
        features, log_probs = [], []
        for item in items:
            f = reference.encoder(padded(item.mel, frames)[None].to(device))
            logits = reference.decoder(item.tokens[None].to(device), f)[0]
            features.append(f.half())
            log_probs.append(F.log_softmax(logits.float(), -1).half())
        reference.to("cpu")
        return cls(items, features, log_probs, frames, device)

    @torch.inference_mode()
    def of(self, model: Whisper, encoder_changed: bool = True) -> float:
        """Mean KL(reference || model) per position. Without `encoder_changed`, the reference's encoder
        output is reused (the model differs only in its decoder)."""
        model.eval().to(self.device)
        total, positions = 0.0, 0
        for item, f, target in zip(self.items, self.features, self.log_probs):
            if encoder_changed:
                f = model.encoder(padded(item.mel, self.frames)[None].to(self.device))
            log_q = F.log_softmax(model.decoder(item.tokens[None].to(self.device), f.float())[0].float(), -1)
            log_p = target.float()
            total += float((log_p.exp() * (log_p - log_q)).sum())
            positions += len(item.tokens)
        return total / positions
