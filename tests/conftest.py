"""Shared fixtures: the real tiny.en model, bundles built from it, and synthesized speech.

Everything is made here from installed packages (the embedded tiny.en weights, a piper voice); no test
reads recorded data from outside the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

SENTENCES = [
    "Replace the hydraulic filter on press number four before the night shift.",
    "The coolant hose on the north conveyor is leaking again.",
    "Call the supervisor and stop the packaging line.",
]


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """$EDGE_ASR_THREADS (default 2) sets every thread count of the suite: torch's in this process here, every
    recognizer's and every command's by itself (`edge_asr.threads`). The suite passes at 1 and at 2."""
    import torch

    from edge_asr.threads import resolve_threads

    torch.set_num_threads(resolve_threads())


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """Keep caches (synthesized sets, bundles) out of the user's home."""
    home = tmp_path_factory.mktemp("edge_asr_home")
    old = os.environ.get("EDGE_ASR_HOME")
    os.environ["EDGE_ASR_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("EDGE_ASR_HOME", None)
    else:
        os.environ["EDGE_ASR_HOME"] = old


@pytest.fixture(scope="session")
def tiny():
    from edge_asr_build.sources import load_whisper

    return load_whisper("tiny.en")


@pytest.fixture(scope="session")
def speech() -> list[tuple[str, np.ndarray]]:
    """(text, 16 kHz audio) for a few maintenance sentences spoken by the default piper voice."""
    from edge_asr_build.speech.synth import synthesize

    return [(text, synthesize(text)) for text in SENTENCES]


@pytest.fixture(scope="session")
def stream(speech):
    """The synthesized sentences joined by 1.2 s pauses: (audio, texts, [(speech_start_s, speech_end_s)])."""
    pause = 1.2
    parts, spans, t = [np.zeros(8000, np.float32)], [], 0.5
    for _, audio in speech:
        voiced = np.flatnonzero(np.abs(audio) > 0.01)
        spans.append((t + voiced[0] / 16000, t + voiced[-1] / 16000))
        parts += [audio, np.zeros(int(pause * 16000), np.float32)]
        t += len(audio) / 16000 + pause
    return np.concatenate(parts), [text for text, _ in speech], spans


@pytest.fixture(scope="session")
def stream_wav(stream, tmp_path_factory):
    from edge_asr_build.speech.synth import write_wav

    path = tmp_path_factory.mktemp("stream") / "stream.wav"
    write_wav(path, stream[0])
    return path


def _build(tmp_path_factory, precision: str):
    from edge_asr_build.bundle.pipeline import build_whisper_bundle

    out = tmp_path_factory.mktemp("bundles") / f"tiny.en-{precision}"
    build_whisper_bundle("tiny.en", out, precision, evaluate_on=0, formats=["onnx", "ort", "tflite"])
    return out


@pytest.fixture(scope="session")
def bundle_int8(tmp_path_factory):
    return _build(tmp_path_factory, "int8")


@pytest.fixture(scope="session")
def bundle_fp32(tmp_path_factory):
    return _build(tmp_path_factory, "fp32")


@pytest.fixture(scope="session")
def transcriber_int8(bundle_int8):
    from edge_asr import Transcriber

    return Transcriber(bundle_int8)


def _reference_items(tiny, texts, seed):
    from edge_asr_build.matching.data import reference_items
    from edge_asr_build.speech.synth import synthesize
    from edge_asr_build.whisper.mel import mel_filters
    from edge_asr_build.whisper.vocabulary import decoding_rules

    clips = [synthesize(t) for t in texts]
    return reference_items(
        tiny.model,
        clips,
        mel_filters(),
        decoding_rules(tiny),
        lambda text: [],
        [],
        seed=seed,
        mode_shares={"plain": 1.0},
    )


@pytest.fixture(scope="session")
def short_items(tiny):
    """Reference items of a few short synthesized phrases (train, held out) for reference-matching runs."""
    train = _reference_items(tiny, ["Stop the line.", "Seven.", "Open the valve.", "Next.", "Four two."], 0)
    held = _reference_items(tiny, ["Close the ticket.", "Nine."], 1)
    return train, held


def teacher_clips(encoder, count=6, seed=0):
    """Clips of smooth random mel with the teacher's real states on them (LSTM conversion tests)."""
    import torch

    from edge_asr_build.lstm.cald import teacher_stream
    from edge_asr_build.lstm.cald_data import Clip

    rng = np.random.default_rng(seed)
    clips = []
    for _ in range(count):
        frames = 2 * int(rng.integers(40, 90))
        mel = torch.from_numpy(np.cumsum(rng.normal(0, 0.1, (80, frames)), 1).astype(np.float32) - 0.5)
        xs, ms = teacher_stream(encoder, mel[None])
        clips.append(Clip(mel.half(), torch.cat([*xs, *ms])[:, : frames // 2].half(), torch.tensor([3, 4]), "ab"))
    return clips


def run_cli_without_torch(args: list[str], also_block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`edge-asr ARGS` in a process where importing torch, librosa or the build step (and `also_block`)
    fails, and which fails if any heavy module got imported all the same: the runtime must need none of them."""
    blocked = ("torch", "librosa", "edge_asr_build", *also_block)
    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from edge_asr.cli import main
code = main({args!r})
assert not any(m.split('.')[0] in ('torch', 'librosa') for m in sys.modules), 'heavy module imported'
sys.exit(code)
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
