"""`edge-asr wyoming`: the recognizer as a Wyoming speech-to-text server, for Home Assistant's Assist and
Rhasspy.

Wyoming is JSON-line events with binary payloads over TCP or a Unix socket; the `wyoming` package reads
and writes them. A client sends `describe` (answered with `info`), or `transcribe` and then
`audio-start`, `audio-chunk`s and `audio-stop`, and gets one `transcript` when the audio stops.

- Audio of any rate, sample width (1-4 bytes) and channel count is converted to 16 kHz mono floats.
- Several clients may be connected at once, each holding its own utterance (at most
  `MAX_UTTERANCE_SECONDS`); one thread decodes, one utterance at a time, so that memory is that of one
  window, whatever the number of clients. Utterances wait their turn in the order their audio stopped.
- Bad input gets an `error` event, and the server goes on serving: an event past `MAX_EVENT_BYTES` or a
  malformed one also closes its connection (its framing can no longer be trusted), as does a connection
  idle for `IDLE_SECONDS`; audio before `audio-start`, an unknown model or language, an audio format out
  of range and audio past `MAX_UTTERANCE_SECONDS` are refused and the connection kept.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np

from .. import __version__
from ..audio import resample
from ..errors import EdgeAsrError, InputError
from ..frontend import SAMPLE_RATE

LANGUAGES = ["en"]  # every bundle the build step makes transcribes English (multilingual ones with <|en|>)
MAX_EVENT_BYTES = 1 << 20  # an event's JSON data or payload; Home Assistant sends chunks of 2,048 bytes
MAX_UTTERANCE_SECONDS = 60.0  # a voice command is seconds long; this bounds the memory a client holds
MAX_CLIENTS = 32  # connections served at once; more are told so and closed
IDLE_SECONDS = 60.0  # a connection that sends nothing for this long is closed: it holds one of the places
MAX_RATE = 192_000
# Whose weights a family's bundles carry (converted, compressed and adapted by the build step).
WEIGHTS = {"whisper": ("OpenAI Whisper", "https://github.com/openai/whisper")}


class OversizeEvent(Exception):
    """An event whose data or payload claims more than `MAX_EVENT_BYTES`."""


class _BoundedReader:
    """The stream reader as `wyoming.event.async_read_event` uses it, refusing lengths past the bound
    before reading them (the package reads whatever `payload_length` an event claims)."""

    def __init__(self, reader: asyncio.StreamReader):
        self.reader = reader

    async def readline(self) -> bytes:
        return await self.reader.readline()  # bounded by the stream's own limit (64 KiB)

    async def readexactly(self, n: int) -> bytes:
        if n > MAX_EVENT_BYTES:
            raise OversizeEvent(f"an event of {n:,} bytes; at most {MAX_EVENT_BYTES:,}")
        return await self.reader.readexactly(n)


def samples_of(payload: bytes, width: int, channels: int) -> np.ndarray:
    """PCM bytes (little-endian, signed; 8-bit unsigned, as WAV has it) -> mono float32 in [-1, 1]."""
    frame = width * channels
    if len(payload) % frame:
        raise InputError(f"an audio chunk of {len(payload)} bytes is not whole frames of {frame} bytes")
    if width == 1:
        audio = (np.frombuffer(payload, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # 24-bit: widen each sample to 32 bits, low byte zero
        raw = np.frombuffer(payload, np.uint8).reshape(-1, 3)
        padded = np.zeros((len(raw), 4), np.uint8)
        padded[:, 1:] = raw
        audio = padded.view("<i4").ravel().astype(np.float32) / 2**31
    else:
        dtype = {2: "<i2", 4: "<i4"}[width]
        audio = np.frombuffer(payload, dtype).astype(np.float32) / float(2 ** (8 * width - 1))
    return audio.reshape(-1, channels).mean(axis=1, dtype=np.float32)


@dataclass
class Utterance:
    """The audio of one client's utterance, in the format its `audio-start` gave."""

    rate: int
    width: int
    channels: int
    blocks: list[np.ndarray] = field(default_factory=list)
    samples: int = 0

    @classmethod
    def start(cls, data: dict) -> Utterance:
        rate, width, channels = data.get("rate"), data.get("width"), data.get("channels")
        ok = (
            all(isinstance(v, int) and not isinstance(v, bool) for v in (rate, width, channels))
            and 1 <= rate <= MAX_RATE
            and width in (1, 2, 3, 4)
            and 1 <= channels <= 32
        )
        if not ok:
            raise InputError(
                f"audio-start: rate {rate!r}, width {width!r}, channels {channels!r}: expected a rate of 1 to "
                f"{MAX_RATE:,} Hz, a width of 1 to 4 bytes and 1 to 32 channels"
            )
        return cls(rate, width, channels)

    def add(self, payload: bytes) -> None:
        audio = samples_of(payload, self.width, self.channels)
        if (self.samples + len(audio)) / self.rate > MAX_UTTERANCE_SECONDS:
            raise InputError(f"an utterance longer than {MAX_UTTERANCE_SECONDS:g} s")
        self.blocks.append(audio)
        self.samples += len(audio)

    def audio(self) -> np.ndarray:
        joined = np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.float32)
        return resample(joined, self.rate, SAMPLE_RATE)


class WyomingServer:
    """One recognizer behind a Wyoming server, shared by every connection's handler (`handler_class`)."""

    def __init__(self, recognizer, model_name: str):
        self.recognizer = recognizer
        self.model_name = model_name
        # One thread decodes, one utterance at a time, in the order their audio stopped: memory is that of one
        # window, and the C heap one arena's (a pool of threads would each grow an arena of their own).
        self.decoder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-asr-decode")
        self.clients = 0
        self.served = 0

    def info(self):
        from wyoming.info import AsrModel, AsrProgram, Attribution, Info

        attribution = Attribution(name="edge-asr", url="https://pypi.org/project/edge-asr/")
        family = self.recognizer.bundle.family
        weights = Attribution(*WEIGHTS[family]) if family in WEIGHTS else attribution
        model = AsrModel(
            name=self.model_name,
            attribution=weights,
            installed=True,
            description=f"{self.recognizer.bundle.family} bundle {self.model_name}",
            version=__version__,
            languages=LANGUAGES,
        )
        program = AsrProgram(
            name="edge-asr",
            attribution=attribution,
            installed=True,
            description="offline speech recognition for edge devices",
            version=__version__,
            models=[model],
        )
        return Info(asr=[program])

    def check_request(self, data: dict) -> None:
        """A `transcribe` event's model and language, if it names them, must be this server's."""
        name, language = data.get("name"), data.get("language")
        if name is not None and name != self.model_name:
            raise InputError(f"transcribe: no model {str(name)[:80]!r}; this server has {self.model_name}")
        if language is not None and language not in LANGUAGES:
            raise InputError(f"transcribe: language {str(language)[:20]!r}; this model transcribes {LANGUAGES}")

    async def transcribe(self, audio: np.ndarray) -> str:
        result = await asyncio.get_running_loop().run_in_executor(self.decoder, self.recognizer.transcribe, audio)
        self.served += 1
        return result.text.strip()


@functools.lru_cache(maxsize=1)
def handler_class():
    """The connection handler, built on `wyoming.server.AsyncEventHandler`; made on first use, so that the
    runtime imports the `wyoming` package only when it serves Wyoming."""
    from wyoming.event import async_read_event
    from wyoming.server import AsyncEventHandler

    class Handler(AsyncEventHandler):
        def __init__(self, server: WyomingServer, reader, writer):
            super().__init__(reader, writer)
            self.server = server
            self.utterance: Utterance | None = None
            self.discarding = False  # the rest of a refused utterance, up to its audio-stop: dropped quietly

        async def run(self) -> None:
            """Events until the client leaves, one is malformed or past the bound, or the server stops."""
            self.server.clients += 1
            try:
                if self.server.clients > MAX_CLIENTS:
                    await self.refuse(f"{MAX_CLIENTS} clients are connected; try again later", "busy")
                    return
                self._is_running = True
                while self._is_running:
                    try:
                        event = await asyncio.wait_for(async_read_event(_BoundedReader(self.reader)), IDLE_SECONDS)
                    except asyncio.TimeoutError:
                        return await self.refuse(f"no event in {IDLE_SECONDS:g} s", "idle")
                    except OversizeEvent as e:
                        return await self.refuse(str(e), "oversize")
                    except (AttributeError, KeyError, TypeError) as e:  # JSON that is not an event
                        return await self.refuse(f"malformed event ({type(e).__name__})", "malformed")
                    if event is None or not await self.handle_event(event):
                        return
            except (ConnectionError, asyncio.IncompleteReadError):
                return  # the client left mid-event or mid-utterance: its audio is dropped
            finally:
                self.server.clients -= 1
                self.writer.close()

        async def refuse(self, text: str, code: str) -> None:
            from wyoming.error import Error

            with contextlib.suppress(ConnectionError):
                await self.write_event(Error(text=text, code=code).event())

        async def handle_event(self, event) -> bool:
            try:
                await answer(self, event)
            except EdgeAsrError as e:  # bad input (one line, as the CLI gives it); the connection is kept
                self.discarding = self.utterance is not None
                self.utterance = None
                await self.refuse(str(e), "bad-input" if isinstance(e, InputError) else "failed")
            return True

    return Handler


async def answer(handler, event) -> None:
    """What one event asks of a connection: info, a request checked, audio kept, or the transcript."""
    from wyoming.asr import Transcribe, Transcript
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.info import Describe

    if Describe.is_type(event.type):
        await handler.write_event(handler.server.info().event())
    elif Transcribe.is_type(event.type):
        handler.server.check_request(event.data)
    elif AudioStart.is_type(event.type):
        handler.discarding = False
        handler.utterance = Utterance.start(event.data)
    elif AudioChunk.is_type(event.type) or AudioStop.is_type(event.type):
        if handler.discarding:  # its error was sent when it was refused
            handler.discarding = not AudioStop.is_type(event.type)
            return
        if handler.utterance is None:
            raise InputError(f"{event.type} before audio-start")
        if AudioChunk.is_type(event.type):
            handler.utterance.add(event.payload or b"")
            return
        audio, handler.utterance = handler.utterance.audio(), None
        text = await handler.server.transcribe(audio)
        await handler.write_event(Transcript(text=text, language=LANGUAGES[0]).event())


def parse_uri(uri: str) -> str:
    """`uri` if the Wyoming server can listen on it (tcp://HOST:PORT or unix://PATH), else an InputError."""
    parts = urlparse(uri)
    try:
        port = parts.port
    except ValueError:
        port = None
    if (parts.scheme == "tcp" and parts.hostname and port is not None) or (parts.scheme == "unix" and parts.path):
        return uri
    raise InputError(f"--uri {uri}: expected tcp://HOST:PORT or unix://PATH")


async def _serve(uri: str, server: WyomingServer, ready=None) -> None:
    from wyoming.server import AsyncServer

    handler = handler_class()
    wyoming_server = AsyncServer.from_uri(uri)
    try:
        await wyoming_server.start(lambda reader, writer: handler(server, reader, writer))
    except OSError as e:
        raise EdgeAsrError(f"cannot listen on {uri}: {e.strerror or e}") from None
    print(f"edge-asr: serving Wyoming on {uri} ({server.model_name})", file=sys.stderr, flush=True)
    if ready is not None:
        ready(wyoming_server)
    try:
        await asyncio.Event().wait()  # until cancelled (Ctrl-C, SIGTERM)
    finally:
        await wyoming_server.stop()


def serve(uri: str, recognizer, model_name: str) -> int:
    """Serve until SIGTERM or Ctrl-C; 0 then."""
    import signal

    try:
        import wyoming  # noqa: F401
    except ImportError:
        raise EdgeAsrError("edge-asr wyoming needs the wyoming package: pip install 'edge-asr[wyoming]'") from None
    parse_uri(uri)
    server = WyomingServer(recognizer, model_name)

    async def main():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await _serve(uri, server)
        except asyncio.CancelledError:
            pass

    started = time.monotonic()
    asyncio.run(main())
    print(
        f"edge-asr: Wyoming server stopped after {time.monotonic() - started:.0f} s, {server.served} transcripts",
        file=sys.stderr,
    )
    return 0
