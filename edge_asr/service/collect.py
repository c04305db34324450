"""`edge-asr collect`: the plant side. Subscribes to every device's transcripts and stores them in SQLite,
one row per `id`, so the duplicates that at-least-once delivery allows are counted, not stored.

The subscription is durable: a fixed client id, clean_session=False and QoS 1, so a broker with persistence
keeps what arrives while `collect` is down and hands it over when it returns. A message is acknowledged only
after its row is committed (paho sends PUBACK once on_message has returned).
"""

from __future__ import annotations

import csv
import json
import signal
import sqlite3
import sys
import time
from pathlib import Path

from ..errors import EdgeAsrError
from .broker import BrokerSettings, connect, connection_lost, log, make_client, refusal

SCHEMA = """
CREATE TABLE IF NOT EXISTS transcripts (
    id TEXT PRIMARY KEY,          -- "<device>:<seq>", stable across the device's restarts
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time TEXT,                    -- when the device made the final (ISO 8601, UTC)
    clock_synced INTEGER,         -- whether the device's clock was NTP-synced then (NULL: unknown)
    start_s REAL,
    end_s REAL,
    text TEXT NOT NULL,
    received REAL NOT NULL,       -- when this row was stored (Unix time)
    duplicates INTEGER NOT NULL DEFAULT 0,
    record TEXT NOT NULL          -- the whole JSON object, as published
)"""
CSV_COLUMNS = [
    "id",
    "device",
    "seq",
    "time",
    "clock_synced",
    "start_s",
    "end_s",
    "text",
    "received",
    "duplicates",
    "rule",
    "confidence",
]
# Columns read from the stored record itself: command mode's, empty for free transcription.
_RECORD_COLUMNS = {"rule": "json_extract(record, '$.rule')", "confidence": "json_extract(record, '$.confidence')"}


class TranscriptStore:
    def __init__(self, path: str | Path):
        try:
            self.db = sqlite3.connect(str(path))
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a row is on disk before its PUBACK goes out
            self.db.execute(SCHEMA)
            self.db.commit()
        except sqlite3.Error as e:
            raise EdgeAsrError(f"{path}: cannot open as SQLite ({e})") from None
        self.stored = self.duplicates = self.rejected = 0

    def add(self, payload: bytes) -> bool:
        """Store one message; False for one that is not a transcript record (it is logged and dropped)."""
        try:
            r = json.loads(payload)
            row = (
                str(r["id"]),
                str(r["device"]),
                int(r["seq"]),
                r.get("time"),
                None if r.get("clock_synced") is None else int(bool(r["clock_synced"])),
                r.get("start_s"),
                r.get("end_s"),
                str(r["text"]),
                time.time(),
                payload.decode("utf-8"),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self.rejected += 1
            return False
        cursor = self.db.execute(
            "INSERT INTO transcripts (id, device, seq, time, clock_synced, start_s, end_s, text, received, record) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET duplicates = duplicates + 1 "
            "RETURNING duplicates",
            row,
        )
        duplicates = cursor.fetchone()[0]
        self.db.commit()
        if duplicates:
            self.duplicates += 1
        else:
            self.stored += 1
        return True

    def export_csv(self, out) -> int:
        columns = ", ".join(_RECORD_COLUMNS.get(c, c) for c in CSV_COLUMNS)
        rows = self.db.execute(f"SELECT {columns} FROM transcripts ORDER BY device, seq").fetchall()
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
        return len(rows)

    def close(self) -> None:
        self.db.close()


def export(db: str, csv_path: str) -> int:
    if not Path(db).is_file():
        raise EdgeAsrError(f"{db}: no such database")
    store = TranscriptStore(db)
    try:
        if csv_path == "-":
            n = store.export_csv(sys.stdout)
        else:
            with open(csv_path, "w", newline="", encoding="utf-8") as f:
                n = store.export_csv(f)
    finally:
        store.close()
    print(f"{n} transcripts written to {csv_path}", file=sys.stderr)
    return 0


def run_collect(
    settings: BrokerSettings,
    db: str,
    prefix: str = "edge-asr",
    client_id: str = "edge-asr-collect",
    duration: float | None = None,
    reconnect_max: float = 30.0,
) -> int:
    """Subscribe and store until SIGINT/SIGTERM (or `duration` seconds). The first connection must succeed:
    an unreachable broker or a refusal exits 1 with one line. Later drops are retried with backoff."""
    store = TranscriptStore(db)
    client = make_client(settings, client_id, clean_session=False)
    topic = f"{prefix}/+/transcripts"
    state = {"up": False, "refused": None, "failures": 0, "stop": False}

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            state["refused"] = refusal(settings, reason_code)
            return
        state["up"], state["failures"] = True, 0
        client.subscribe(topic, qos=1)

    def on_disconnect(client, userdata, flags, reason_code, properties):
        if state["up"] and not state["stop"]:
            log(f"{connection_lost(settings, reason_code)}; reconnecting")
        state["up"] = False

    def on_message(client, userdata, message):
        if not store.add(message.payload):
            log(f"collect: dropped a message on {message.topic} that is not a transcript record")

    client.on_connect, client.on_disconnect, client.on_message = on_connect, on_disconnect, on_message

    def stop(signum, frame):
        state["stop"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        _first_connection(client, settings, state)
    except EdgeAsrError:
        store.close()
        raise
    print(f"collecting {topic} from {settings.address} into {db}; Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        end = time.monotonic() + duration if duration else float("inf")
        while not state["stop"] and time.monotonic() < end:
            if state["up"]:
                client.loop(timeout=0.2)
                continue
            state["failures"] += 1
            delay = min(reconnect_max, 2 ** min(state["failures"] - 1, 16))
            time.sleep(min(delay, max(0.0, end - time.monotonic())))
            try:
                connect(client, settings)
                while not state["up"] and client.loop(timeout=0.1) == 0 and not state["stop"]:
                    pass
            except EdgeAsrError as e:
                if state["failures"] == 1:
                    log(f"{e}; retrying")
        client.disconnect()
    finally:
        print(
            f"{store.stored} transcripts stored, {store.duplicates} duplicates dropped"
            + (f", {store.rejected} malformed" if store.rejected else ""),
            file=sys.stderr,
            flush=True,
        )
        store.close()
    return 0


def _first_connection(client, settings: BrokerSettings, state: dict) -> None:
    """Connect and wait for the broker's answer: an unreachable broker or a refusal is the user's to fix."""
    connect(client, settings)
    deadline = time.monotonic() + settings.connect_timeout
    while not state["up"] and state["refused"] is None and time.monotonic() < deadline:
        if client.loop(timeout=0.1) != 0 and state["refused"] is None:
            raise EdgeAsrError(f"mqtt broker {settings.address}: closed the connection before accepting it")
    if state["refused"]:
        raise EdgeAsrError(state["refused"])
    if not state["up"]:
        raise EdgeAsrError(f"mqtt broker {settings.address}: no answer to CONNECT")
