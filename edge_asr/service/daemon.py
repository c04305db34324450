"""`edge-asr daemon`: listen continuously, write finals to sinks, serve status, stop cleanly.

Configuration is TOML (see edge_asr_deploy/edge-asr.toml). SIGTERM and SIGINT stop taking new speech:
the utterance in flight is finished and written, then the process exits 0. SIGHUP reopens the JSONL
file (for logrotate). A status endpoint (HTTP on 127.0.0.1 by default) serves the counters and the latest
transcripts as JSON. With an [mqtt] host, the JSONL file is also the spool an MQTT publisher follows
(publisher.py): the broker being away never stops transcription.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import tomllib

from ..endpointer import Endpointer
from ..errors import EdgeAsrError, InputError
from ..limits import read_text_file
from ..paths import bundle_dir
from ..settings import DecodingSettings
from ..sources import FileSource, MicrophoneSource
from ..stream import StreamRecognizer
from ..vad import make_vad
from .sinks import JsonlSink, StdoutSink, default_device_id, timestamped

DEFAULTS = {
    "input": {"source": "microphone", "device": None, "rate": None, "realtime": True},
    "vad": {"kind": "energy", "min_silence": 0.5, "max_utterance": 20.0, "pre_roll": 0.3},
    "model": {
        "bundle": None,
        "threads": 2,
        "partial_interval": 0.0,
        "backend": "auto",
        "beam": None,
        "bias_words": [],
    },  # the last two: older places of [decoding] beam and vocabulary
    # Thresholds left out (None) are the bundle's; see `edge-asr transcribe --help` for their meaning.
    "decoding": {
        "beam": None,
        "prompt": None,
        "vocabulary": [],
        "hotword_bonus": None,
        "hotword_prompt": None,
        "guards": True,
        "no_speech_threshold": None,
        "logprob_threshold": None,
        "compression_ratio_threshold": None,
        "vad_gate": None,
        "seed": 0,
        "grammar": None,
        "grammar_threshold": None,
    },
    # Named grammars for command mode, name = "FILE"; [decoding] grammar names the one active at start (or is
    # a file), and POST /grammar {"name": …} on the status endpoint switches between them (null: free text).
    "grammars": {},
    "output": {"jsonl": None, "max_bytes": 10_000_000, "backups": 5, "stdout": False},
    "status": {"listen": "127.0.0.1:8765"},
    # Publishing to a broker: off while host is unset. device_id also names the JSONL lines' ids.
    "mqtt": {
        "host": None,
        "port": None,
        "tls": False,
        "ca_file": None,
        "cert_file": None,
        "key_file": None,
        "credentials": None,
        "topic_prefix": "edge-asr",
        "device_id": None,
        "qos": 1,
        "keepalive": 60,
        "counters_interval": 60.0,
        "reconnect_max": 30.0,
    },
}


# The kind of every key whose default is unset (None); every other key is of its default's kind, and a
# number (float) may be written as an integer.
UNSET_KINDS = {
    ("input", "device"): (str, int),
    ("input", "rate"): int,
    ("model", "bundle"): str,
    ("model", "beam"): int,
    ("decoding", "beam"): int,
    ("decoding", "prompt"): str,
    ("decoding", "hotword_bonus"): float,
    ("decoding", "hotword_prompt"): bool,
    ("decoding", "no_speech_threshold"): float,
    ("decoding", "logprob_threshold"): float,
    ("decoding", "compression_ratio_threshold"): float,
    ("decoding", "vad_gate"): bool,
    ("decoding", "grammar"): str,
    ("decoding", "grammar_threshold"): float,
    ("output", "jsonl"): str,
    ("status", "listen"): (str, bool),  # false: no endpoint
    ("mqtt", "host"): str,
    ("mqtt", "port"): int,
} | {("mqtt", k): str for k in ("ca_file", "cert_file", "key_file", "credentials", "device_id")}


def load_config(path: str | Path) -> dict:
    text = read_text_file(path, "configuration")
    try:
        user = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: not valid TOML ({e})") from None
    config = {}
    for section, defaults in DEFAULTS.items():
        given = user.get(section, {})
        if not isinstance(given, dict):
            raise InputError(f"{path}: {section} must be a section, [{section}]")
        if section == "grammars":
            if not all(isinstance(v, str) for v in given.values()):
                raise InputError(f'{path}: [grammars] maps names to grammar files, e.g. menu = "menu.gbnf"')
        else:
            unknown = set(given) - set(defaults)
            if unknown:
                raise InputError(f"{path}: unknown key(s) in [{section}]: {', '.join(sorted(unknown))}")
            for key, value in given.items():
                kind = UNSET_KINDS.get((section, key)) or type(defaults[key])
                if not _is_kind(value, kind):
                    raise InputError(f"{path}: [{section}] {key} = {str(value)[:40]}: expected {_kind_name(kind)}")
        config[section] = defaults | given
    unknown_sections = set(user) - set(DEFAULTS)
    if unknown_sections:
        raise InputError(f"{path}: unknown section(s): {', '.join(sorted(unknown_sections))}")
    return config


def _is_kind(value, kind) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    if isinstance(value, float) and float in kinds:
        return math.isfinite(value)
    if isinstance(value, list):
        return list in kinds and all(isinstance(v, str) for v in value)  # lists of words
    return isinstance(value, kinds)


def decoding_settings(config: dict) -> DecodingSettings:
    """The [decoding] section as settings; [model] beam and bias_words still count where [decoding] is silent."""
    d, model = config["decoding"], config["model"]
    vocabulary = d["vocabulary"] or model["bias_words"]
    if isinstance(vocabulary, str) or not all(isinstance(w, str) for w in vocabulary):
        raise EdgeAsrError('[decoding] vocabulary must be a list of words, e.g. ["Kestrolix", "KX-40"]')
    guards = {"enabled": d["guards"]} | {
        k: d[k] for k in ("no_speech_threshold", "logprob_threshold", "compression_ratio_threshold", "vad_gate")
    }
    beam = d["beam"] if d["beam"] is not None else model["beam"]  # None: the bundle's way
    return DecodingSettings(
        beam=beam,
        prompt=d["prompt"],
        hotwords=list(vocabulary),
        hotword_bonus=d["hotword_bonus"],
        hotword_prompt=d["hotword_prompt"],
        guards=guards,
        vad=config["vad"]["kind"],
        seed=d["seed"],
        grammar=config["grammars"].get(d["grammar"], d["grammar"]),
        grammar_threshold=d["grammar_threshold"],
    )


def mqtt_settings(config: dict, device_id: str, describe: dict):
    """The [mqtt] section as the publisher's settings."""
    from .broker import BrokerSettings
    from .publisher import MqttSettings

    m = config["mqtt"]  # of the right kinds (load_config)
    broker = BrokerSettings(
        host=m["host"],
        port=m["port"],
        tls=m["tls"],
        ca_file=m["ca_file"],
        cert_file=m["cert_file"],
        key_file=m["key_file"],
        credentials=m["credentials"],
        keepalive=m["keepalive"],
    )
    return MqttSettings(
        broker,
        device_id,
        topic_prefix=m["topic_prefix"],
        qos=m["qos"],
        counters_interval=m["counters_interval"],
        reconnect_max=m["reconnect_max"],
        describe=describe,
    )


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list of words"}
    return " or ".join(names[k] for k in kinds)


MAX_REQUEST_BYTES = 4096  # a grammar request is a name; anything longer is not one
REQUEST_TIMEOUT_S = 10.0


class NoCommandMode(EdgeAsrError):
    """The daemon's bundle cannot take a grammar (LSTM-CTC)."""


class UnknownGrammar(EdgeAsrError):
    """No grammar of that name in [grammars]."""


def status_server(daemon: "Daemon", host: str, port: int) -> ThreadingHTTPServer:
    """The status endpoint of `daemon` on host:port (0: any free port), not yet serving."""
    return ThreadingHTTPServer((host, port), _status_handler(daemon))


def _status_handler(daemon: "Daemon"):
    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S  # a client that sends half a request does not hold its thread for good

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._reply(200 if self.path in ("/", "/status", "/health") else 404, daemon.status())

        def do_POST(self):  # noqa: N802
            if self.path != "/grammar":
                return self._reply(404, {"error": 'POST /grammar {"name": …} is the only change accepted'})
            try:
                size = int(self.headers.get("Content-Length") or 0)
                if not 0 <= size <= MAX_REQUEST_BYTES:
                    raise ValueError(f"Content-Length must be 0 to {MAX_REQUEST_BYTES} bytes")
                request = json.loads(self.rfile.read(size) or b"{}")
                if not isinstance(request, dict) or not isinstance(request.get("name"), (str, type(None))):
                    raise ValueError('expected {"name": "GRAMMAR"} or {"name": null}')
            except (ValueError, RecursionError) as e:  # RecursionError: JSON nested deeper than Python parses
                return self._reply(400, {"error": f"not a grammar request: {e}"})
            try:
                daemon.switch_grammar(request.get("name"))
            except NoCommandMode as e:
                return self._reply(409, {"error": str(e)})
            except UnknownGrammar as e:
                return self._reply(404, {"error": str(e)})
            except EdgeAsrError as e:  # the file went missing or does not parse
                return self._reply(422, {"error": str(e)})
            self._reply(200, {"grammar": request.get("name")})

        def _reply(self, status: int, payload: dict):
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep the daemon's output for transcripts and errors
            pass

    return Handler


class Daemon:
    def __init__(self, config: dict):
        from ..recognizer import load

        self.config = config
        model = config["model"]
        self.transcriber = load(
            model["bundle"] or bundle_dir(), model["threads"], decoding_settings(config), model["backend"]
        )
        vad = config["vad"]
        self.endpointer = Endpointer(make_vad(vad["kind"]), vad["min_silence"], vad["max_utterance"], vad["pre_roll"])
        self.recognizer = StreamRecognizer(
            self.transcriber, self.endpointer, model["partial_interval"] or None, on_final=self._record
        )
        out = config["output"]
        device_id = config["mqtt"]["device_id"] or default_device_id()
        journal = JsonlSink(out["jsonl"], out["max_bytes"], out["backups"], device_id) if out["jsonl"] else None
        self.sinks = ([journal] if journal else []) + ([StdoutSink()] if out["stdout"] else [])
        if not self.sinks:
            raise EdgeAsrError("no output: set [output] jsonl = PATH and/or stdout = true")
        self.mqtt = None
        if config["mqtt"]["host"]:
            if not journal:
                raise EdgeAsrError("[mqtt] needs [output] jsonl = PATH: the JSONL file is the spool of what to publish")
            from .. import __version__
            from .publisher import MqttSink

            describe = {"version": __version__, "bundle": Path(model["bundle"] or bundle_dir()).name}
            # Not a sink: it follows the JSONL file on its own thread, whatever writes to it.
            self.mqtt = MqttSink(mqtt_settings(config, device_id, describe), journal, self._counters)
        self.started = time.time()
        self.stopping = False
        self.source = None
        self.grammar = config["decoding"]["grammar"]  # the active grammar's name (or file)
        self._switch = None  # (name, CommandMode or None) for the decoding loop to take up between blocks

    def feed(self, block) -> None:
        """One block of audio, after taking up a grammar switch asked for since the last."""
        if self._switch is not None:
            (self.grammar, command), self._switch = self._switch, None
            self.transcriber.use_command(command)
        self.recognizer.feed(block)

    def switch_grammar(self, name: str | None) -> None:
        """Compile the named grammar (or none: free text) for the decoding loop to switch to. From the status
        endpoint's thread: the loop itself switches, between two blocks of audio."""
        from ..commands import CommandMode

        if self.transcriber.bundle.family != "whisper":
            raise NoCommandMode("this bundle cannot take a grammar (command mode needs a Whisper bundle)")
        if name is not None and name not in self.config["grammars"]:
            known = ", ".join(sorted(self.config["grammars"])) or "none in [grammars]"
            raise UnknownGrammar(f"no grammar named {name!r} ({known})")
        command = (
            None
            if name is None
            else CommandMode.load(
                self.config["grammars"][name], self.transcriber.bundle, self.config["decoding"]["grammar_threshold"]
            )
        )
        self._switch = (name, command)

    def _record(self, final) -> None:
        record = timestamped(final.to_dict())
        for sink in self.sinks:  # the JSONL sink first: it gives the record its id
            record = sink.write(record)

    def status(self) -> dict:
        counters = self.recognizer.counters
        counters.dropped_frames = self.source.dropped_frames if self.source else 0
        guards = self.transcriber.counters  # Whisper's guards; LSTM-CTC bundles have none
        return (
            {
                "state": "stopping" if self.stopping else "listening",
                "uptime_s": round(time.time() - self.started, 1),
                "source": self.source.name if self.source else None,
                "grammar": self.grammar,
            }
            | counters.to_dict()
            | ({"guards": guards.to_dict()} if guards else {})
            | ({"mqtt": self.mqtt.status()} if self.mqtt else {})
        )

    def _counters(self) -> dict:
        """What the publisher sends every counters_interval: the status without the transcripts themselves."""
        return {k: v for k, v in self.status().items() if k != "latest"}

    def _make_source(self):
        inp = self.config["input"]
        if inp["source"] == "microphone":
            return MicrophoneSource(inp["device"], inp["rate"])
        return FileSource(inp["source"], realtime=inp["realtime"])

    def _serve_status(self):
        listen = self.config["status"]["listen"]
        if not listen:
            return None
        host, _, port = listen.rpartition(":")
        try:
            server = status_server(self, host or "127.0.0.1", int(port))
        except (OSError, ValueError, OverflowError) as e:
            raise EdgeAsrError(f"status endpoint {listen}: cannot listen ({e})") from None
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _reopen(self, signum, frame) -> None:
        for sink in self.sinks:
            sink.reopen()

    def run(self) -> int:
        self.source = self._make_source()
        server = self._serve_status()
        if self.mqtt:
            self.mqtt.start()
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reopen)
        try:
            for block in self.source:
                self.feed(block)
                if self.stopping and not self.recognizer.in_speech:
                    break
            self.recognizer.finish()
        finally:
            for sink in self.sinks:
                sink.close()
            if self.mqtt:  # after the JSONL file: what the last final appended is still published
                self.mqtt.close()
            if server:
                server.shutdown()
        return 0
