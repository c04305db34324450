"""Fuzz targets: every input a user or a file can hand the runtime, each as a function of bytes.

A target returns when the input was refused the way a user would see it (the module's one-line error) or
gave a valid result, and raises `FuzzFailure` when a property broke:

- only the expected one-line error, never another exception (which the CLI would print as a traceback);
- no numeric warning (the console stays clean);
- every call finishes within `TIME_BOUND_S`;
- no file is opened outside the bundle's folder while a bundle loads.

tests/test_fuzz.py runs each for a few seconds with hypothesis; benchmarks/fuzz.py runs them for minutes
with atheris (coverage-guided), or hypothesis where atheris does not install. Both start from `seeds`,
valid inputs that the mutations work from.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import noise_signals
import numpy as np

from edge_asr.audio import AudioWarning  # here, not in _Watch: an import inside a bundle load opens files

TIME_BOUND_S = 5.0
# Tokens that mean something to a parser, for mutations to insert (libFuzzer's -dict, in hypothesis too).
DICTIONARY = [
    b"Infinity", b"-Infinity", b"NaN", b"1e400", b"-1", b"0", b"9223372036854775808", b"true", b"null", b'""',
    b"[" * 2000, b"{" * 2000, b'"seq": ', b"\n", b"../", b"/etc/hostname", b"::=", b"{64}", b"*", b"|",
    b"\r\n", b"Content-Length: -1\r\n", b"Content-Length: 99999999999999999999\r\n", b"inf", b"nan", b"[[x]]",
    b"= [", b"\"\"\"", b"RIFF", b"WAVEfmt ", b"data", b"fLaC", b"OggS", b"\xff\xff\xff\x7f", b"\x00" * 8,
]  # fmt: skip


class FuzzFailure(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise FuzzFailure(message)


class _Watch:
    """Runs one input: any exception but `expected` is a failure, and so is a warning, an exception Python
    would print from a callback ("Exception ignored in …"), or a slow call."""

    def __init__(self, name: str, expected: tuple[type, ...]):
        self.name, self.expected = name, expected

    def __enter__(self):
        self.start = time.perf_counter()
        self.caught = warnings.catch_warnings(record=True)
        self.warnings = self.caught.__enter__()
        warnings.simplefilter("always")
        self.unraisable, self.hook = [], sys.unraisablehook
        sys.unraisablehook = self.unraisable.append
        return self

    def __exit__(self, kind, error, traceback):
        self.caught.__exit__(None, None, None)
        sys.unraisablehook = self.hook
        elapsed = time.perf_counter() - self.start
        if self.unraisable:
            raise FuzzFailure(f"{self.name}: printed an exception from a callback: {self.unraisable[0].exc_value!r}")
        if kind is not None and not issubclass(kind, FuzzFailure) and not issubclass(kind, self.expected):
            raise FuzzFailure(f"{self.name}: {kind.__name__}: {error}") from error
        noisy = [w for w in self.warnings if not issubclass(w.category, AudioWarning)]
        check(not noisy, f"{self.name}: a warning reached the console: {noisy[0].message if noisy else ''}")
        check(elapsed < TIME_BOUND_S, f"{self.name}: took {elapsed:.1f} s")
        return kind is not None and not issubclass(kind, FuzzFailure)  # the expected error: swallowed


# -- audio files -------------------------------------------------------------------------------------------------


def audio_seeds() -> list[bytes]:
    """Short files in every format libsndfile writes (WAV, FLAC, OGG, MP3, AIFF, CAF, RF64, W64 …, each in its
    default encoding), and WAV, AIFF and AU in a few more (float, stereo, 8-bit, 24-bit, µ-law)."""
    import soundfile as sf

    t = np.arange(1600) / 8000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = np.stack([tone, -tone], 1)
    seeds = []
    for fmt, subtype, audio in [
        ("WAV", "PCM_16", tone),
        ("WAV", "FLOAT", stereo),
        ("WAV", "PCM_U8", tone),
        ("FLAC", "PCM_16", tone),
        ("OGG", "VORBIS", tone),
        ("AIFF", "PCM_24", stereo),
        ("AU", "ULAW", tone),
    ] + [
        (fmt, sf.default_subtype(fmt), tone)
        for fmt in sf.available_formats()
        if sf.default_subtype(fmt) and fmt != "SD2"  # SD2 writes a resource fork, "._" in the working folder
    ]:
        buffer = io.BytesIO()
        sf.write(buffer, audio, 8000, format=fmt, subtype=subtype)
        seeds.append(buffer.getvalue())
    return seeds


def audio_file(data: bytes) -> None:
    """Any bytes as an audio file: mono float32 samples, finite, at 16 kHz; or one AudioError."""
    from edge_asr.audio import decode_audio
    from edge_asr.errors import AudioError

    with _Watch("audio", (AudioError,)), _Console() as console:
        audio = decode_audio(io.BytesIO(data), "fuzz.wav")
        check(audio.dtype == np.float32 and audio.ndim == 1, f"audio: {audio.dtype} {audio.shape}")
        check(bool(np.isfinite(audio).all()), "audio: non-finite samples came through")
        peak = float(np.abs(audio).max(initial=0))
        check(peak <= 1.0, f"audio: samples reach {peak:.3g}, outside [-1, 1]")
    check(not console.text, f"audio: the decoders printed {console.text[:80]!r}")


class _Console:
    """What reaches file descriptors 1 and 2 meanwhile (what a user's console would show), in `text`."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile()
        self.saved = [os.dup(1), os.dup(2)]
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.file.seek(0)
        self.text = self.file.read().decode("utf-8", errors="replace")
        self.file.close()


def no_speech(data: bytes, recognizer) -> None:
    """Any bytes as the recipe of a signal without speech: `recognizer` must give no text for it."""
    audio = noise_signals.from_bytes(data)
    with _Watch("no speech", ()):
        text = recognizer.transcribe(audio).text.strip()
    check(text == "", f"no speech: {len(audio) / 16000:.1f} s of signal {data[:1].hex()} read as {text[:80]!r}")


# -- the bundle loader -------------------------------------------------------------------------------------------

N_VOCAB = 300  # a small Whisper-shaped vocabulary: the 256 byte tokens, a few merges, then special tokens


def make_bundle(folder: Path) -> Path:
    """A small bundle of the default's shape (manifest, filterbank, tokens, ONNX graphs, one of them with its
    tensors in a file beside it) that loads in milliseconds: what the loader's fuzz target mutates."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edge_asr.manifest import file_records, header
    from edge_asr.tokenizer import _CHAR_OF_BYTE

    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "mel_filters.npy", np.full((80, 201), 0.01, np.float32))
    tokens = [_CHAR_OF_BYTE[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "in", "er"]
    special = {"eot": len(tokens), "sot": len(tokens) + 1, "no_timestamps": len(tokens) + 2}
    special |= {"sot_prev": len(tokens) + 3, "no_speech": len(tokens) + 4, "timestamp_begin": len(tokens) + 5}
    tokens += [f"<|{name}|>" for name in special] + [f"<|{i / 50:.2f}|>" for i in range(N_VOCAB - len(tokens) - 6)]
    (folder / "tokens.json").write_text(json.dumps(tokens))
    for role in ("encoder", "decoder"):
        weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        io_ = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in "xy"]
        graph = helper.make_graph([node], role, io_[:1], io_[1:], [weight])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        location = f"{role}.rows.bin" if role == "decoder" else None
        onnx.save(model, folder / f"{role}.onnx", save_as_external_data=bool(location), location=location,
                  size_threshold=0)  # fmt: skip
    names = ["encoder.onnx", "decoder.onnx", "decoder.rows.bin", "tokens.json", "mel_filters.npy"]
    dims = {"n_mels": 80, "n_vocab": N_VOCAB, "n_text_ctx": 448, "n_text_layer": 1, "n_audio_ctx": 1500}
    manifest = header("fuzz") | {
        "model": {
            "family": "whisper",
            "dims": dims,
            "parameters": 16,
            "precision": "fp32",
            "graphs": {"encoder": "encoder.onnx", "decoder": "decoder.onnx"},
            "graph_data": {"decoder": ["decoder.rows.bin"]},
        },
        "frontend": {"sample_rate": 16000, "n_fft": 400, "hop_length": 160, "n_mels": 80, "chunk_seconds": 30,
                     "mel_filters": "mel_filters.npy",
                     "context": {"mode": "auto", "margin_s": 0.5, "floor_s": 3.0, "buckets_s": [1.0, 3.0, 30.0]}},
        "tokenizer": {"type": "byte-level-bpe", "tokens": "tokens.json", "special": special},
        "decoder": {"prompt": [special["sot"], special["no_timestamps"]], "special_tokens": special,
                    "suppress_tokens": [1, 2], "suppress_blank": [220, special["eot"]], "mode": "no-timestamps"},
        "decoding": {"guards": {"no_speech_threshold": 0.7, "temperatures": [0.0, 0.5]}, "grammar_threshold": 0.3,
                     "short_window_beam": {"max_seconds": 5.0, "beam_size": 3}},
        "files": file_records(folder, names),
    }  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


class OpenedFiles:
    """The files this process opens inside the `with`, resolved, in `paths`. An audit hook cannot be removed, so
    one is installed for all and records only while a `with` is open."""

    _recording: list | None = None
    _installed = False

    def __enter__(self) -> OpenedFiles:
        if not OpenedFiles._installed:
            sys.addaudithook(OpenedFiles._hook)
            OpenedFiles._installed = True
        OpenedFiles._recording = self.paths = []
        return self

    def __exit__(self, *exc) -> None:
        OpenedFiles._recording = None

    @staticmethod
    def _hook(event: str, args: tuple) -> None:
        recording = OpenedFiles._recording
        if recording is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            recording.append(os.path.realpath(os.fsdecode(args[0])))


def _load_bundle(folder: Path) -> None:
    """Load the bundle in `folder` and everything the runtime derives from its manifest before decoding."""
    from edge_asr.bundle import Bundle
    from edge_asr.context import ContextPolicy
    from edge_asr.decoding import suppression_masks
    from edge_asr.errors import BundleError
    from edge_asr.guards import Guards
    from edge_asr.settings import DecodingSettings
    from edge_asr.transcriber import ShortWindowBeam

    inside = folder.resolve()
    with OpenedFiles() as opened, _Watch("bundle", (BundleError,)):
        bundle = Bundle.load(folder)
        manifest = bundle.manifest
        Guards.from_manifest(manifest)
        ContextPolicy.from_manifest(manifest).frames(16000)
        if bundle.family == "whisper":
            suppression_masks(dict(manifest.decoder, n_vocab=manifest.model.dims["n_vocab"]))
            ShortWindowBeam.recommended(bundle, DecodingSettings())
            bundle.tokenizer.decode(list(range(min(len(bundle.tokenizer.tokens), 400))))
    outside = [p for p in opened.paths if inside not in Path(p).parents]
    check(not outside, f"bundle: opened {outside[0] if outside else ''}, outside the bundle")


def manifest_seeds(folder: Path) -> list[bytes]:
    return [(folder / "manifest.json").read_bytes()]


def manifest_file(data: bytes, folder: Path) -> None:
    """Any bytes as the manifest of the bundle in `folder` (from `make_bundle`)."""
    manifest = folder / "manifest.json"
    original = manifest.read_bytes()
    manifest.write_bytes(data)
    try:
        _load_bundle(folder)
    finally:
        manifest.write_bytes(original)


def graph_seeds(folder: Path) -> list[bytes]:
    return [(folder / "decoder.onnx").read_bytes()]


def graph_file(data: bytes, folder: Path) -> None:
    """Any bytes as the bundle's decoder graph, its checksum recorded: what a tamperer who rewrites both
    can make the loader read."""
    from edge_asr.manifest import file_records

    graph, manifest = folder / "decoder.onnx", folder / "manifest.json"
    originals = graph.read_bytes(), manifest.read_bytes()
    graph.write_bytes(data)
    raw = json.loads(originals[1])
    raw["files"] |= file_records(folder, ["decoder.onnx"])
    manifest.write_text(json.dumps(raw))
    try:
        _load_bundle(folder)
    finally:
        graph.write_bytes(originals[0])
        manifest.write_bytes(originals[1])


# -- the daemon's configuration ----------------------------------------------------------------------------------

CONFIG_SEED = """\
[input]
source = "clip.wav"
realtime = false

[vad]
min_silence = 0.5
max_utterance = 20.0

[model]
threads = 2

[decoding]
beam = 5
prompt = "Maintenance log."
vocabulary = ["Kestrolix", "KX-40"]
no_speech_threshold = 0.7

[grammars]
menu = "menu.gbnf"

[output]
jsonl = "transcripts.jsonl"
max_bytes = 1000000

[status]
listen = "127.0.0.1:8765"

[mqtt]
host = "broker.local"
port = 8883
tls = true
qos = 1
"""


def config_seeds() -> list[bytes]:
    return [CONFIG_SEED.encode(), b"[decoding]\nguards = false\nvocabulary = []\n", b'[mqtt]\nhost = "h"\n']


def config_file(data: bytes, folder: Path) -> None:
    """Any bytes as the daemon's TOML configuration: read and turned into decoding and MQTT settings."""
    from edge_asr.errors import EdgeAsrError
    from edge_asr.service.daemon import decoding_settings, load_config, mqtt_settings

    path = folder / "edge-asr.toml"
    path.write_bytes(data)
    with _Watch("config", (EdgeAsrError,)):
        config = load_config(path)
        decoding_settings(config)
        if config["mqtt"]["host"]:
            mqtt_settings(config, "fuzz-device", {})


# -- hotwords, prompts and grammars ------------------------------------------------------------------------------


def text_seeds() -> list[bytes]:
    return [
        b"Kestrolix\nKX-40  # the press\nnorth conveyor\n",
        b'root ::= "start line" [0-9] | "stop" | part\npart ::= "part number" [0-9]{3}\n',
        b"yes\nno\ncancel\nline ( one | two )\n",
        b'root ::= ("a" | "b")* "c"{2,4} [a-z]?\n',
    ]


def user_text(data: bytes, tokenizer) -> None:
    """Any bytes as a hotwords file, a prompt and a grammar file, tokenized and compiled over `tokenizer`."""
    from edge_asr.commands import CommandMode
    from edge_asr.errors import InputError
    from edge_asr.grammar import Grammar
    from edge_asr.hotwords import TokenBias, read_word_list
    from edge_asr.settings import DecodingSettings

    with tempfile.NamedTemporaryFile(suffix=".txt") as f:
        f.write(data)
        f.flush()
        with _Watch("hotwords", (InputError,)):
            words = read_word_list(path=f.name)
            if words:
                TokenBias(words, tokenizer, 1.0)
        with _Watch("prompt", (InputError,)):
            prompt = data.decode("utf-8", errors="replace")
            DecodingSettings(prompt=prompt)
            tokenizer.encode(" " + prompt)
        with _Watch("grammar", (InputError,)):
            grammar = Grammar.from_file(f.name)
            CommandMode(grammar, tokenizer)


# -- the JSONL spool ---------------------------------------------------------------------------------------------


def spool_seeds() -> list[bytes]:
    lines = [json.dumps({"seq": i, "text": f"line {i}", "id": f"d-{i}"}).encode() for i in range(1, 6)]
    return [
        b"\n".join(lines) + b"\n",
        b"\n".join(lines[:3]) + b"\n" + lines[3][:10],  # torn at a power cut
        b"\n".join([lines[0], lines[0], lines[2], lines[1]]) + b"\n",  # duplicated and reordered
    ]


def spool_log(data: bytes, folder: Path) -> None:
    """Any bytes as the JSONL log (its first half as a rotated backup) and as its offset file: read as the
    MQTT publisher reads it, every line whole, once, in growing sequence."""
    from edge_asr.service.spool import OffsetFile, SpoolReader, drop_torn_tail, last_seq_in

    log = folder / "transcripts.jsonl"
    for old in folder.glob("transcripts.jsonl*"):
        old.unlink()
    cut = data.find(b"\n", len(data) // 2) + 1
    if cut:
        Path(f"{log}.1").write_bytes(data[:cut])
    log.write_bytes(data[cut:])
    log.with_name(log.name + ".offset").write_bytes(data[:64])
    with _Watch("spool", ()):
        whole = set(data.split(b"\n"))
        position = OffsetFile(log).load()
        last_seq_in(log)
        drop_torn_tail(log)
        reader = SpoolReader(log, threading.Lock(), position)
        seen = []
        for _ in range(len(data) + 2):
            item = reader.next_line()
            if item is None:
                break
            line, at = item
            check(line in whole, "spool: a line that is not one of the log's came back")
            check(not seen or at.seq > seen[-1], "spool: a sequence number came back out of order")
            seen.append(at.seq)
        else:
            raise FuzzFailure("spool: the reader never reached the end")
        reader.close()


# -- the daemon's status endpoint --------------------------------------------------------------------------------


class _StatusDaemon:
    """What the status endpoint asks of a daemon: its status, and grammar switches."""

    def status(self) -> dict:
        return {"state": "listening", "utterances": 3, "latest": ["start line three"]}

    def switch_grammar(self, name):
        from edge_asr.service.daemon import UnknownGrammar

        if name not in (None, "menu"):
            raise UnknownGrammar(f"no grammar named {name!r}")


@dataclass
class StatusServer:
    server: ThreadingHTTPServer
    errors: list

    @classmethod
    def start(cls) -> StatusServer:
        from edge_asr.service.daemon import status_server

        server = status_server(_StatusDaemon(), "127.0.0.1", 0)
        errors = []
        server.handle_error = lambda request, address: errors.append(sys.exc_info()[1])  # what would be printed
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return cls(server, errors)

    def request(self, data: bytes, timeout: float = 2.0) -> bytes:
        with socket.create_connection(self.server.server_address, timeout=timeout) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            try:
                while chunk := s.recv(65536):
                    reply += chunk
            except (TimeoutError, ConnectionResetError):
                pass
            return reply

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def http_seeds() -> list[bytes]:
    body = b'{"name": "menu"}'
    return [
        b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /grammar HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
        b'POST /grammar HTTP/1.0\r\nContent-Length: 9\r\n\r\n{"name":1',
    ]


def status_request(data: bytes, server: StatusServer) -> None:
    """Any bytes sent to the status endpoint: an HTTP answer or a closed connection, never an error the server
    prints; and the endpoint still answers a good request after it."""
    with _Watch("status", (OSError,)):
        server.request(data)
    good = server.request(http_seeds()[0])
    check(good.startswith(b"HTTP/1.0 200"), f"status: no answer after that request ({good[:40]!r})")
    check(not server.errors, f"status: the server hit {server.errors[:1]}")
