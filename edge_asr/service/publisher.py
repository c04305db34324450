"""The MQTT sink: publishes the JSONL log to a broker, at least once, in order, through outages.

The log is the spool. The JSONL sink appends and fsyncs each final first; this sink follows the file in a
thread of its own and publishes every line after the acknowledged offset with QoS 1 to
`<prefix>/<device>/transcripts`. When the broker's PUBACKs cover a contiguous run of lines, the offset moves
past them and is written atomically to `<log>.offset`. So:

- while the broker is unreachable, finals are only appended; on reconnect everything after the offset goes
  out in order, then live finals follow;
- a SIGKILL or power cut loses nothing: on restart the lines after the offset are published again (those
  the broker already had arrive twice, with the same `id`, for the receiver to drop);
- rotation keeps every file that still holds lines after the offset.

A retained `<prefix>/<device>/status` says online or offline (the broker's Last Will says offline for a
device that vanished), with version and bundle; `<prefix>/<device>/counters` carries the daemon's counters
every `counters_interval` seconds.
"""

from __future__ import annotations

import collections
import json
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from ..errors import EdgeAsrError
from .broker import BrokerSettings, connect, connection_lost, log, make_client, refusal, topic_prefix
from .sinks import JsonlSink
from .spool import OffsetFile, SpoolReader, last_seq_in, log_files

INFLIGHT = 20  # unacknowledged messages at once (paho's own limit), so paho never queues any itself
COMMIT_EVERY_S = 0.2  # the offset file is rewritten at most this often; a stale offset only repeats lines


@dataclass
class MqttSettings:
    broker: BrokerSettings
    device_id: str
    topic_prefix: str = "edge-asr"
    qos: int = 1
    counters_interval: float = 60.0
    reconnect_min: float = 1.0
    reconnect_max: float = 30.0
    drain_seconds: float = 2.0  # on stop, how long to wait for the broker to take what is still unsent
    describe: dict = field(default_factory=dict)  # version and bundle for the status topic

    def __post_init__(self):
        self.topic_prefix = topic_prefix(self.topic_prefix, "mqtt topic_prefix")

    def topic(self, leaf: str) -> str:
        return f"{self.topic_prefix}/{self.device_id}/{leaf}"


class MqttSink:
    def __init__(self, settings: MqttSettings, journal: JsonlSink, counters: Callable[[], dict] | None = None):
        if settings.qos not in (0, 1, 2):
            raise EdgeAsrError(f"mqtt qos {settings.qos}: must be 0, 1 or 2 (1 or 2 for at-least-once delivery)")
        if any(c in settings.device_id for c in "/+#") or not settings.device_id:
            raise EdgeAsrError(f"mqtt device_id {settings.device_id!r}: must be non-empty, without / + #")
        self.settings, self.journal, self.counters = settings, journal, counters
        self.client = make_client(settings.broker, f"edge-asr-{settings.device_id}", clean_session=True)
        offline = json.dumps({"state": "offline", "device": settings.device_id} | settings.describe)
        self.client.will_set(settings.topic("status"), offline, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

        self.offset = OffsetFile(journal.path)
        self.committed = self.saved = self.offset.load()
        self.reader = SpoolReader(journal.path, journal.lock, self.committed)
        self.inflight: collections.deque[list] = collections.deque()  # [mid, Position, acknowledged], in order
        self.by_mid: dict[int, list] = {}
        journal.releasable = self.releasable

        self.state = "down"  # down, connecting, up
        self.failures = 0  # consecutive failed attempts, for the backoff
        self.next_attempt = 0.0
        self.connecting_since = 0.0
        self.last_error: str | None = None
        self.acknowledged = 0
        self.last_save = 0.0
        self.caught_up = False
        self.next_counters = 0.0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mqtt", daemon=True)

    # -- the daemon's side ------------------------------------------------------------------------------------
    def start(self) -> "MqttSink":
        self.thread.start()
        return self

    def close(self) -> None:
        if self.thread.ident is None:  # never started: the daemon failed before listening
            return
        self.stopping.set()
        self.thread.join(timeout=self.settings.drain_seconds + self.settings.broker.connect_timeout + 5)

    def status(self) -> dict:
        return {
            "broker": self.settings.broker.address,
            "connected": self.state == "up",
            "acknowledged": self.acknowledged,
            "backlog_lines": max(0, self.journal.seq - self.committed.seq),
            "backlog_bytes": self._backlog_bytes(),
            "last_error": self.last_error,
        }

    def releasable(self, path) -> bool:
        """A rotated file may be deleted once its last line is acknowledged."""
        seq = last_seq_in(path)
        return seq is None or seq <= self.committed.seq

    # -- the thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.state == "down":
                    if time.monotonic() >= self.next_attempt:
                        self._attempt()
                    else:
                        self.stopping.wait(min(0.5, self.next_attempt - time.monotonic()))
                    continue
                self._step()
            except Exception as e:  # noqa: BLE001 (the thread must outlive any one failure: the spool keeps the lines)
                self._lost(f"mqtt broker {self.settings.broker.address}: {type(e).__name__}: {e}")
        self._drain()

    def _step(self) -> None:
        if (
            self.state == "connecting"
            and time.monotonic() - self.connecting_since > self.settings.broker.connect_timeout
        ):
            self._lost(f"mqtt broker {self.settings.broker.address}: no answer to CONNECT")
            return
        rc = self.client.loop(timeout=0.05)
        if rc != 0 and self.state != "down":
            self._lost(connection_lost(self.settings.broker, _rc_text(rc)))
            return
        if self.state == "up":
            self._pump()
            self._publish_counters()
        self._commit()

    def _attempt(self) -> None:
        try:
            connect(self.client, self.settings.broker)
        except EdgeAsrError as e:
            self._lost(str(e))
            return
        self.state, self.connecting_since = "connecting", time.monotonic()

    def _lost(self, line: str) -> None:
        if line != self.last_error:  # one line per new trouble, not one per retry
            log(line + "; transcripts are spooled and retried")
        self.last_error = line
        self.state = "down"
        self._commit(force=True)  # the acknowledgements that came before the drop
        self.failures += 1
        # Exponential backoff with jitter, so a plant's devices do not all return at once after an outage.
        delay = min(self.settings.reconnect_max, self.settings.reconnect_min * 2 ** min(self.failures - 1, 16))
        self.next_attempt = time.monotonic() + delay / 2 + random.uniform(0, delay / 2)
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 (a socket already gone)
            pass

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._lost(refusal(self.settings.broker, reason_code))
            return
        self.state, self.failures = "up", 0
        backlog = self.journal.seq - self.committed.seq
        if self.last_error:
            log(f"mqtt broker {self.settings.broker.address}: connected; {backlog} spooled transcripts to send")
        self.last_error = None
        online = (
            {"state": "online", "device": self.settings.device_id}
            | self.settings.describe
            | {"since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        )
        client.publish(self.settings.topic("status"), json.dumps(online), qos=1, retain=True)
        self.next_counters = 0.0

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.state != "down" and not self.stopping.is_set():
            self._lost(connection_lost(self.settings.broker, reason_code))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        entry = self.by_mid.pop(mid, None)
        if entry is not None:
            entry[2] = True
            self._advance()

    def _advance(self) -> None:
        while self.inflight and self.inflight[0][2]:
            _, self.committed, _ = self.inflight.popleft()
            self.acknowledged += 1

    def _pump(self) -> None:
        topic, qos = self.settings.topic("transcripts"), self.settings.qos
        while len(self.inflight) < INFLIGHT:
            item = self.reader.next_line()
            self.caught_up = item is None
            if item is None:
                return
            payload, position = item
            info = self.client.publish(topic, payload, qos=qos)
            # With QoS 1 or 2 paho keeps the message and resends it after a reconnect whatever rc says.
            entry = [info.mid, position, qos == 0]
            self.inflight.append(entry)
            if qos:
                self.by_mid[info.mid] = entry
            self._advance()

    def _commit(self, force: bool = False) -> None:
        if self.committed != self.saved and (force or time.monotonic() - self.last_save >= COMMIT_EVERY_S):
            self.offset.save(self.committed)
            self.saved, self.last_save = self.committed, time.monotonic()

    def _publish_counters(self) -> None:
        if not self.counters or not self.settings.counters_interval or time.monotonic() < self.next_counters:
            return
        self.next_counters = time.monotonic() + self.settings.counters_interval
        body = {"device": self.settings.device_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.client.publish(self.settings.topic("counters"), json.dumps(body | self.counters()), qos=0, retain=True)

    def _drain(self) -> None:
        """On stop: give the broker a moment for what is unsent, say offline, and save the offset."""
        deadline = time.monotonic() + self.settings.drain_seconds
        try:
            while self.state != "down" and time.monotonic() < deadline:
                self._step()
                if self.state == "up" and not self.inflight and self.caught_up:
                    break
            if self.state == "up":
                offline = {"state": "offline", "device": self.settings.device_id} | self.settings.describe
                info = self.client.publish(self.settings.topic("status"), json.dumps(offline), qos=1, retain=True)
                end = time.monotonic() + 1.0
                while not info.is_published() and time.monotonic() < end and self.client.loop(timeout=0.05) == 0:
                    pass
                self.client.disconnect()
        except Exception as e:  # noqa: BLE001 (what was not acknowledged stays in the spool)
            log(f"mqtt broker {self.settings.broker.address}: {type(e).__name__} while stopping: {e}")
        finally:
            self._commit(force=True)
            self.reader.close()

    def _backlog_bytes(self) -> int:
        total = 0
        for p in reversed(log_files(self.journal.path)):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if st.st_ino == self.committed.inode:
                return total + max(0, st.st_size - self.committed.byte)
            total += st.st_size
        return total


def _rc_text(rc) -> str:
    import paho.mqtt.client as mqtt

    return mqtt.error_string(rc)
