"""Transcripts as files: plain text, JSON with timed segments, SubRip (SRT) and WebVTT subtitles."""

from __future__ import annotations

import json

from .results import Transcript

WRITERS = ("txt", "json", "srt", "vtt")


def clock(seconds: float, decimal: str) -> str:
    """hh:mm:ss plus milliseconds after `decimal` ("," in SRT, "." in WebVTT)."""
    ms = max(0, round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{decimal}{ms % 1000:03d}"


def short_clock(seconds: float) -> str:
    """mm:ss.ss, the times of live finals on a console."""
    return f"{int(seconds // 60):02d}:{seconds % 60:05.2f}"


def to_json(transcript: Transcript, file: str) -> str:
    t = transcript
    return json.dumps(
        {
            "file": file,
            "text": t.text,
            "duration_s": round(t.audio_seconds, 3),
            "processing_s": round(t.wall_seconds, 4),
            "cpu_s": round(t.cpu_seconds, 4),
            "rtf": round(t.rtf, 4),
            "rtf_cpu": round(t.rtf_cpu, 4),
            "segments": [s.to_dict() for s in t.segments],
        },
        ensure_ascii=False,
    )


def to_srt(transcript: Transcript) -> str:
    return "".join(
        f"{i}\n{clock(s.start, ',')} --> {clock(s.end, ',')}\n{s.text}\n\n"
        for i, s in enumerate(transcript.segments, 1)
    )


def to_vtt(transcript: Transcript) -> str:
    return "WEBVTT\n\n" + "".join(
        f"{clock(s.start, '.')} --> {clock(s.end, '.')}\n{s.text}\n\n" for s in transcript.segments
    )


def render(fmt: str, transcript: Transcript, file: str) -> str:
    """The transcript of `file` in format `fmt`, newline-terminated."""
    if fmt == "json":
        return to_json(transcript, file) + "\n"
    if fmt == "srt":
        return to_srt(transcript)
    if fmt == "vtt":
        return to_vtt(transcript)
    return transcript.text + "\n"
