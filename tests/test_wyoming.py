"""`edge-asr wyoming`, driven by the `wyoming` package's own client (`AsyncTcpClient`): describe, transcripts
of the golden clips in any audio format, several clients at once, and bad input that leaves it serving."""

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("wyoming")

from wyoming.asr import Transcribe  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.info import Describe  # noqa: E402

from edge_asr.metrics import normalize  # noqa: E402
from edge_asr.service.wyoming import MAX_EVENT_BYTES, samples_of  # noqa: E402

GOLDEN = json.loads((Path(__file__).parent / "golden" / "default_transcripts.json").read_text())


@pytest.fixture(scope="module")
def server(bundle_auto):
    """The default bundle behind a Wyoming server on a free loopback port, in a thread of its own."""
    import edge_asr
    from edge_asr.service.wyoming import WyomingServer, _serve

    recognizer = edge_asr.load(bundle_auto)
    state, ready = {}, threading.Event()

    def on_ready(wyoming_server):
        state["port"] = wyoming_server._server.sockets[0].getsockname()[1]  # noqa: SLF001
        state["loop"], state["task"] = asyncio.get_running_loop(), asyncio.current_task()
        ready.set()

    async def run():
        with contextlib.suppress(asyncio.CancelledError):
            await _serve("tcp://127.0.0.1:0", WyomingServer(recognizer, "tiny.en-default"), on_ready)

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(60)
    yield state["port"]
    state["loop"].call_soon_threadsafe(state["task"].cancel)
    thread.join(10)


@pytest.fixture(scope="module")
def clips():
    from edge_asr_build.speech.synth import synthesize

    return [synthesize(text) for text in GOLDEN["texts"]]


def pcm(audio: np.ndarray, width: int = 2, channels: int = 1) -> bytes:
    scale = float(2 ** (8 * width - 1) - 1)
    samples = np.repeat(np.clip(audio, -1, 1)[:, None], channels, axis=1)
    if width == 4:
        return (samples * scale).astype("<i4").tobytes()
    return (samples * scale).astype("<i2").tobytes()


async def connect(port: int) -> AsyncTcpClient:
    client = AsyncTcpClient("127.0.0.1", port, read_timeout=60)
    await client.connect()
    return client


async def send_utterance(client, audio: np.ndarray, rate=16000, width=2, channels=1, **request):
    await client.write_event(Transcribe(**request).event())
    await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
    data = pcm(audio, width, channels)
    for i in range(0, len(data), 2048 * width * channels):
        chunk = data[i : i + 2048 * width * channels]
        await client.write_event(AudioChunk(rate=rate, width=width, channels=channels, audio=chunk).event())
    await client.write_event(AudioStop().event())
    return await client.read_event()


def transcribe(port: int, audio: np.ndarray, **kwargs):
    async def go():
        client = await connect(port)
        try:
            return await send_utterance(client, audio, **kwargs)
        finally:
            await client.disconnect()

    return asyncio.run(go())


def test_describe_answers_info_with_the_model(server):
    async def go():
        client = await connect(server)
        await client.write_event(Describe().event())
        return await client.read_event()

    info = asyncio.run(go())
    assert info.type == "info"
    (program,) = info.data["asr"]
    assert program["name"] == "edge-asr" and program["installed"]
    assert [(m["name"], m["languages"]) for m in program["models"]] == [("tiny.en-default", ["en"])]


def test_golden_clips_in_any_audio_format(server, clips):
    import soxr

    golden = GOLDEN["transcripts"]["onnx"]
    event = transcribe(server, clips[0])
    assert event.type == "transcript" and normalize(event.data["text"]) == normalize(golden[0])
    # 44.1 kHz, 32-bit, stereo: converted to 16 kHz mono floats on arrival
    stereo = soxr.resample(clips[2], 16000, 44100).astype(np.float32)
    event = transcribe(server, stereo, rate=44100, width=4, channels=2)
    assert normalize(event.data["text"]) == normalize(golden[2]), event.data


def test_three_clients_at_once(server, clips):
    async def go():
        clients = [await connect(server) for _ in range(3)]
        events = await asyncio.gather(*(send_utterance(c, clips[i]) for i, c in enumerate(clients)))
        for client in clients:
            await client.disconnect()
        return events

    events = asyncio.run(go())
    got = [normalize(e.data["text"]) for e in events]
    assert got == [normalize(t) for t in GOLDEN["transcripts"]["onnx"][:3]]


def raw_exchange(port: int, data: bytes) -> list[dict]:
    """Send `data` as it is, and read what comes back until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := s.recv(65536):
                received += chunk
    events = []
    while received:
        line, _, received = received.partition(b"\n")
        event = json.loads(line)
        size = event.get("data_length", 0)
        event["data"] = {**event.get("data", {}), **(json.loads(received[:size]) if size else {})}
        events.append(event)
        received = received[size + event.get("payload_length", 0) :]
    return events


def test_bad_input_is_refused_and_the_server_keeps_serving(server, clips):
    # malformed events: JSON that is not an event, and lengths that are not numbers
    assert raw_exchange(server, b"[1, 2]\n")[0]["type"] == "error"
    assert raw_exchange(server, b'{"type": "audio-chunk", "payload_length": "x"}\n')[0]["type"] == "error"
    assert raw_exchange(server, b"not json at all\n") == []  # closed
    # an oversize payload is refused before it is read
    header = json.dumps({"type": "audio-chunk", "payload_length": MAX_EVENT_BYTES + 1}).encode() + b"\n"
    (reply,) = raw_exchange(server, header + b"\0" * 1000)
    assert reply["type"] == "error" and reply["data"]["code"] == "oversize"

    async def on_one_connection():
        client = await connect(server)
        replies = []
        # audio before audio-start, then an unknown model and language, then a good request
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=b"\0\0" * 100).event())
        replies.append(await client.read_event())
        await client.write_event(Transcribe(name="no-such-model").event())
        replies.append(await client.read_event())
        await client.write_event(Transcribe(language="fr").event())
        replies.append(await client.read_event())
        await client.write_event(AudioStart(rate=16000, width=3, channels=0).event())
        replies.append(await client.read_event())
        replies.append(await send_utterance(client, clips[4]))
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(AudioStop().event())  # no audio at all
        replies.append(await client.read_event())
        # 61 s of audio: one error when it passes 60 s, the rest of it dropped quietly, then served again
        await client.write_event(AudioStart(rate=8000, width=1, channels=1).event())
        for _ in range(61):
            await client.write_event(AudioChunk(rate=8000, width=1, channels=1, audio=b"\x80" * 8000).event())
        await client.write_event(AudioStop().event())
        replies.append(await client.read_event())
        await client.write_event(Describe().event())
        replies.append(await client.read_event())
        await client.disconnect()
        # a client that leaves mid-utterance
        client = await connect(server)
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=pcm(clips[0][:8000])).event())
        await client.disconnect()
        return replies

    replies = asyncio.run(on_one_connection())
    assert [r.type for r in replies] == ["error"] * 4 + ["transcript"] * 2 + ["error", "info"], replies
    assert replies[5].data["text"] == "" and "longer than 60 s" in replies[6].data["text"]
    assert "before audio-start" in replies[0].data["text"] and "no-such-model" in replies[1].data["text"]
    assert normalize(replies[4].data["text"]) == normalize(GOLDEN["transcripts"]["onnx"][4])
    assert normalize(transcribe(server, clips[3]).data["text"]) == normalize(GOLDEN["transcripts"]["onnx"][3])


def test_pcm_of_every_width_reads_as_the_same_samples():
    rng = np.random.default_rng(0)
    audio = (rng.uniform(-0.9, 0.9, 1000)).astype(np.float32)
    as16 = samples_of(pcm(audio, 2), 2, 1)
    np.testing.assert_allclose(as16, audio, atol=1e-4)
    np.testing.assert_allclose(samples_of(pcm(audio, 4, 2), 4, 2), audio, atol=1e-6)
    eight = ((audio * 127).astype(np.int16) + 128).astype(np.uint8).tobytes()
    np.testing.assert_allclose(samples_of(eight, 1, 1), audio, atol=1 / 64)
    i32 = (audio.astype(np.float64) * (2**31 - 1)).astype("<i4")
    packed24 = i32.view(np.uint8).reshape(-1, 4)[:, 1:].tobytes()  # the top three bytes, little-endian
    np.testing.assert_allclose(samples_of(packed24, 3, 1), audio, atol=1e-6)


def test_the_server_starts_without_torch_and_stops_on_sigterm(bundle_auto):
    """`edge-asr wyoming` as its systemd unit runs it: no torch, librosa or build step imported; SIGTERM ends
    it with exit 0 and one line."""
    from conftest import start_cli_without_torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_cli_without_torch(["wyoming", "--bundle", str(bundle_auto), "--uri", f"tcp://127.0.0.1:{port}"])
    try:
        started = server.stderr.readline()
        assert f"serving Wyoming on tcp://127.0.0.1:{port}" in started, started

        async def describe():
            client = await connect(port)
            await client.write_event(Describe().event())
            return await client.read_event()

        assert asyncio.run(describe()).type == "info"
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert "Wyoming server stopped" in server.stderr.read()
    finally:
        server.kill()


def test_a_bad_uri_is_one_line():
    run = subprocess.run(
        [sys.executable, "-m", "edge_asr", "wyoming", "--uri", "http://x"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2 and run.stdout == "" and run.stderr.count("\n") == 1, run.stderr
    assert "expected tcp://HOST:PORT or unix://PATH" in run.stderr
