"""Audio sources for streaming: the microphone, or a file / stdin played as a stream.

Every source yields blocks of 16 kHz mono float32 samples and counts the input frames it had to drop.
A file source can be paced at real time (what a microphone would deliver, for tests and latency
measurements without hardware) or read as fast as the recognizer takes it.
"""

from __future__ import annotations

import io
import queue
import sys
import time
from collections.abc import Iterator

import numpy as np

from .audio import SAMPLE_RATE, AudioFile, decode_audio
from .errors import AudioError

# One voice-activity frame (512 samples): the endpointer decides per frame, so a block of 100 ms kept an
# endpoint waiting up to 68 ms for the rest of its block. Live command finals (benchmarks/stream_bench.py,
# the machine menu, ONNX Runtime): median 0.681 s after the end of speech with 100 ms blocks, 0.643 s with
# these, at the same RTF.
BLOCK_SECONDS = 0.032


class AudioSource:
    """Iterate for blocks of 16 kHz mono float32 audio; `stop()` ends the iteration at the next block."""

    dropped_frames = 0
    name = "audio"

    def __init__(self):
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    def __iter__(self) -> Iterator[np.ndarray]:
        raise NotImplementedError


class FileSource(AudioSource):
    """A file (or '-' for WAV/FLAC on stdin) played as a stream, optionally at real-time pace. A file is
    read block by block, so an hour of it takes no more memory than a second."""

    def __init__(
        self, path: str, realtime: bool = False, block_seconds: float = BLOCK_SECONDS, buffer_seconds: float = 30.0
    ):
        super().__init__()
        self.name = path
        if path == "-":
            audio = self._read_stdin()
            self._file, self.duration_s = None, len(audio) / SAMPLE_RATE
            self._blocks = lambda n: (audio[i : i + n] for i in range(0, len(audio), n))
        else:
            self._file = AudioFile(path)
            self.duration_s = self._file.duration_s
        self.realtime = realtime
        self.block = int(block_seconds * SAMPLE_RATE)
        self.buffer_seconds = buffer_seconds  # as much as a microphone source queues before dropping
        self.started = None  # time.monotonic() of the stream's first sample

    @staticmethod
    def _read_stdin() -> np.ndarray:
        data = sys.stdin.buffer.read()
        if not data:
            raise AudioError("stdin: no audio")
        return decode_audio(io.BytesIO(data), "stdin")

    def _read(self) -> Iterator[np.ndarray]:
        """Blocks of exactly `self.block` samples (the last one shorter)."""
        pieces = self._file.blocks(self.block / SAMPLE_RATE) if self._file else self._blocks(self.block)
        pending = np.zeros(0, np.float32)
        for piece in pieces:
            pending = np.concatenate([pending, piece]) if len(pending) else piece
            while len(pending) >= self.block:
                yield pending[: self.block]
                pending = pending[self.block :]
        if len(pending):
            yield pending

    def __iter__(self) -> Iterator[np.ndarray]:
        self.started = time.monotonic()
        offset = 0
        for block in self._read():
            if self._stopped:
                return
            offset += len(block)
            if self.realtime:
                # Deliver each block when its last sample would have been recorded, on an absolute
                # schedule: time spent downstream is caught up, never added up. A consumer more than
                # buffer_seconds behind loses the block, as it would lose microphone input.
                due = self.started + offset / SAMPLE_RATE
                lag = time.monotonic() - due
                if lag > self.buffer_seconds:
                    self.dropped_frames += len(block)
                    continue
                time.sleep(max(0.0, -lag))
            yield block


def _sounddevice():
    try:
        import sounddevice
    except ImportError:
        raise AudioError("microphone input needs sounddevice: pip install 'edge-asr[mic]'") from None
    except OSError as e:  # the PortAudio library itself is missing
        raise AudioError(f"no audio system ({e}); install PortAudio (e.g. apt install libportaudio2)") from None
    return sounddevice


def list_input_devices() -> list[dict]:
    sd = _sounddevice()
    return [
        {
            "index": i,
            "name": d["name"],
            "channels": d["max_input_channels"],
            "default_rate": int(d["default_samplerate"]),
        }
        for i, d in enumerate(sd.query_devices())
        if d["max_input_channels"] > 0
    ]


class MicrophoneSource(AudioSource):
    """Blocks from an input device, resampled to 16 kHz. The audio callback only queues; a full queue
    (the recognizer fell behind by more than `buffer_seconds`) drops blocks and counts their frames."""

    def __init__(
        self,
        device: str | int | None = None,
        rate: int | None = None,
        block_seconds: float = BLOCK_SECONDS,
        buffer_seconds: float = 30.0,
    ):
        super().__init__()
        label = "the default input" if device is None else f"input device {device!r}"
        try:
            sd = _sounddevice()
        except AudioError as e:
            raise AudioError(f"{label}: {e}; see `edge-asr devices`") from None
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        try:
            info = sd.query_devices(device, "input")
        except (ValueError, sd.PortAudioError) as e:
            raise AudioError(f"{label}: not available ({e}); see `edge-asr devices`") from None
        self.name = info["name"]
        self.rate = int(rate or info["default_samplerate"])
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(buffer_seconds / block_seconds)))
        try:
            self.stream = sd.InputStream(
                device=device,
                channels=1,
                samplerate=self.rate,
                dtype="float32",
                blocksize=int(block_seconds * self.rate),
                callback=self._callback,
            )
        except (ValueError, sd.PortAudioError) as e:
            raise AudioError(
                f"{label} ({self.name}): cannot record at {self.rate} Hz ({e}); see `edge-asr devices`"
            ) from None

    def _callback(self, data, frames, time_info, status) -> None:
        try:
            self.queue.put_nowait(data[:, 0].copy())
        except queue.Full:
            self.dropped_frames += frames

    def __iter__(self) -> Iterator[np.ndarray]:
        import soxr

        resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32")
        with self.stream:
            while not self._stopped:
                try:
                    block = self.queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                yield block if self.rate == SAMPLE_RATE else resampler.resample_chunk(block)
