"""Benchmark a bundle on folders of audio with references: WER, real-time factor, peak memory.

A folder holds audio files and `refs.tsv` (id TAB reference text); audio is `<id>.<ext>` in any format
soundfile reads, at any rate. Timing covers features + model + decoding (reading and resampling are
excluded), after one warm-up utterance; RTF is the median over `runs` passes.
"""

from __future__ import annotations

import resource
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, load_audio
from .device import device_info
from .errors import AudioError
from .metrics import normalize, word_error_rate
from .transcriber import Transcriber

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus")


@dataclass
class Utterance:
    uid: str
    reference: str
    path: Path

    @property
    def audio(self) -> np.ndarray:
        """Decoded each time it is asked for, so that a set is never held whole: dev/ljspeech's 106 s were
        7 MB of the bench's peak RSS."""
        return load_audio(self.path)


def load_speech_set(folder: str | Path) -> list[Utterance]:
    folder = Path(folder)
    refs = folder / "refs.tsv"
    if not refs.exists():
        raise AudioError(f"{folder}: no refs.tsv (expected lines of: id TAB reference text)")
    items = []
    for n, line in enumerate(refs.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise AudioError(f"{refs}:{n}: expected 'id<TAB>text'")
        uid, text = line.split("\t", 1)
        path = next((folder / (uid + e) for e in AUDIO_EXTENSIONS if (folder / (uid + e)).exists()), None)
        if path is None:
            raise AudioError(f"{folder}: no audio file for id {uid!r}")
        items.append(Utterance(uid, text, path))
    if not items:
        raise AudioError(f"{refs}: no utterances listed")
    return items


def set_label(folder: str | Path) -> str:
    parts = Path(folder).resolve().parts
    return "/".join(parts[-2:])


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM first: getrusage's maxrss survives exec, so a
    process started by a big parent would report the parent's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux and Android


def run_bench(transcriber: Transcriber, folders: list[str | Path], runs: int = 3, progress=None) -> dict:
    sets = {set_label(f): load_speech_set(f) for f in folders}
    transcriber.transcribe(next(iter(sets.values()))[0].audio)  # warm-up: allocations, kernel selection
    counters = transcriber.counters  # Whisper's guard events, counted over the first pass
    guards = {}
    results, pooled_refs, pooled_hyps = {}, [], []
    pooled_audio, pooled_wall, pooled_cpu = 0.0, [0.0] * runs, [0.0] * runs
    for label, items in sets.items():
        samples, walls, cpus, hyps = 0, [], [], []
        for r in range(runs):
            before = counters.to_dict() if counters else {}
            wall = cpu = 0.0
            for u in items:
                audio = u.audio
                samples += len(audio) if r == 0 else 0
                t = transcriber.transcribe(audio)
                del audio
                wall += t.wall_seconds
                cpu += t.cpu_seconds
                if r == 0:
                    hyps.append(t.text)
                if progress:
                    progress()
            if r == 0 and counters:
                guards = {k: guards.get(k, 0) + v - before[k] for k, v in counters.to_dict().items()}
            walls.append(wall)
            cpus.append(cpu)
            pooled_wall[r] += wall
            pooled_cpu[r] += cpu
        audio_s = samples / SAMPLE_RATE
        refs = [u.reference for u in items]
        results[label] = dict(
            n=len(items),
            audio_s=round(audio_s, 1),
            words=sum(len(normalize(x).split()) for x in refs),
            wer=round(word_error_rate(refs, hyps), 2),
            rtf_wall=round(statistics.median(walls) / audio_s, 4),
            rtf_cpu=round(statistics.median(cpus) / audio_s, 4),
            hypotheses={u.uid: h for u, h in zip(items, hyps)},
        )
        pooled_refs += refs
        pooled_hyps += hyps
        pooled_audio += audio_s
    bundle = transcriber.bundle
    return dict(
        sets=results,
        wer=round(word_error_rate(pooled_refs, pooled_hyps), 2),
        words=sum(r["words"] for r in results.values()),
        audio_s=round(pooled_audio, 1),
        rtf_wall=round(statistics.median(pooled_wall) / pooled_audio, 4),
        rtf_cpu=round(statistics.median(pooled_cpu) / pooled_audio, 4),
        peak_rss_mb=round(peak_rss_mb()),
        backend=transcriber.model.backend,
        bundle_mb=round(bundle.model_bytes(transcriber.model.backend) / 1e6, 2),
        params=bundle.parameters,
        bundle=bundle.manifest.name,
        context=transcriber.context and transcriber.context.to_dict(),
        runs=runs,
        guards=guards or None,
        device=device_info(),
    )
