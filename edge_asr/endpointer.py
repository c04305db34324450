"""Endpointing: cut a stream of voice-activity decisions into utterances.

An utterance starts at the first speech frame (plus `pre_roll` of audio before it, so a soft onset is
not clipped) and ends once `min_silence` has passed without speech. Speech longer than
`max_utterance` is split at its quietest frame in the last third, and the rest carries on as the next
utterance: a 30 s Whisper window is never overrun and a final never waits forever.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE
from .vad import FRAME_SAMPLES


@dataclass
class Utterance:
    audio: np.ndarray
    start_s: float  # stream time of its first sample (pre-roll included)
    last_speech_s: float  # stream time of the end of its last speech frame
    end_s: float  # stream time at which it was cut
    forced: bool = False  # cut by the maximum length rather than by silence


class Endpointer:
    def __init__(
        self,
        vad,
        min_silence: float = 0.5,
        max_utterance: float = 20.0,
        pre_roll: float = 0.3,
        min_speech: float = 0.2,
        tail: float = 0.2,
    ):
        self.vad = vad
        self.min_silence_frames = max(1, round(min_silence * SAMPLE_RATE / FRAME_SAMPLES))
        self.max_frames = round(max_utterance * SAMPLE_RATE / FRAME_SAMPLES)
        self.pre_roll_frames = round(pre_roll * SAMPLE_RATE / FRAME_SAMPLES)
        self.min_speech_frames = max(1, round(min_speech * SAMPLE_RATE / FRAME_SAMPLES))
        self.tail_frames = round(tail * SAMPLE_RATE / FRAME_SAMPLES)
        self._pending = np.zeros(0, dtype=np.float32)
        self._frames: list[np.ndarray] = []  # the current utterance (or the pre-roll while idle)
        self._energy: list[float] = []
        self._start_frame = 0  # stream frame index of self._frames[0]
        self._frame_index = 0  # frames consumed so far
        self._speech_frames = 0
        self._last_speech = -1  # index into self._frames of the last speech frame
        self.in_speech = False

    @property
    def time_s(self) -> float:
        return self._frame_index * FRAME_SAMPLES / SAMPLE_RATE

    def current(self) -> np.ndarray:
        """The utterance so far (for partial results)."""
        return np.concatenate(self._frames) if self.in_speech and self._frames else np.zeros(0, np.float32)

    def feed(self, block: np.ndarray) -> list[Utterance]:
        """Consume audio; returns the utterances that ended within it."""
        data = np.concatenate([self._pending, block.astype(np.float32, copy=False)])
        n = len(data) // FRAME_SAMPLES
        self._pending = data[n * FRAME_SAMPLES :]
        ended = []
        for frame in data[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES):
            ended += self._step(frame)
        return ended

    def flush(self) -> list[Utterance]:
        """End of the stream: the utterance in flight, if it holds enough speech."""
        if self.in_speech and self._speech_frames >= self.min_speech_frames:
            return [self._cut(len(self._frames), forced=False)]
        return []

    def _step(self, frame: np.ndarray) -> list[Utterance]:
        speech = self.vad(frame)
        self._frames.append(frame)
        self._energy.append(float(np.mean(frame.astype(np.float64) ** 2)))
        self._frame_index += 1
        if not self.in_speech:
            if speech:
                self.in_speech, self._speech_frames, self._last_speech = True, 1, len(self._frames) - 1
            elif len(self._frames) > self.pre_roll_frames:
                drop = len(self._frames) - self.pre_roll_frames
                del self._frames[:drop], self._energy[:drop]
            self._start_frame = self._frame_index - len(self._frames)
            return []
        if speech:
            self._speech_frames += 1
            self._last_speech = len(self._frames) - 1
        if len(self._frames) - 1 - self._last_speech >= self.min_silence_frames:
            if self._speech_frames < self.min_speech_frames:  # a click, not speech
                self._reset_idle()
                return []
            return [self._cut(min(len(self._frames), self._last_speech + 1 + self.tail_frames), forced=False)]
        if len(self._frames) >= self.max_frames:
            third = len(self._frames) * 2 // 3
            cut = third + int(np.argmin(self._energy[third:]))
            return [self._cut(max(cut, 1), forced=True)]
        return []

    def _cut(self, n_frames: int, forced: bool) -> Utterance:
        start = self._start_frame
        audio = np.concatenate(self._frames[:n_frames])
        utterance = Utterance(
            audio,
            start * FRAME_SAMPLES / SAMPLE_RATE,
            (start + min(self._last_speech, n_frames - 1) + 1) * FRAME_SAMPLES / SAMPLE_RATE,
            (start + n_frames) * FRAME_SAMPLES / SAMPLE_RATE,
            forced,
        )
        if forced:  # the rest is the start of the next utterance, still in speech
            del self._frames[:n_frames], self._energy[:n_frames]
            self._start_frame += n_frames
            self._last_speech = max(0, self._last_speech - n_frames)
            self._speech_frames = len(self._frames)
        else:
            self._reset_idle()
        return utterance

    def _reset_idle(self) -> None:
        self.in_speech, self._speech_frames, self._last_speech = False, 0, -1
        keep = self._frames[-self.pre_roll_frames :] if self.pre_roll_frames else []
        self._energy = self._energy[len(self._energy) - len(keep) :]
        self._frames = list(keep)
        self._start_frame = self._frame_index - len(self._frames)
