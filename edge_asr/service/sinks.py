"""Where finals go: a JSONL file that survives crashes and rotates by size, or standard output.

The JSONL file is also the spool the MQTT publisher follows (spool.py, publisher.py): every line gets a
stable `id` here, when it is appended, and rotation keeps any file that still holds unacknowledged lines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import socket
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from .spool import drop_torn_tail, last_seq_in, log_files, write_atomically

SCHEMA = 1  # the record's layout; receivers check it before reading further fields


def default_device_id() -> str:
    return socket.gethostname().split(".")[0] or "edge-asr"


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def clock_synced() -> bool | None:
    """Whether the kernel's clock is disciplined by NTP (adjtimex says TIME_ERROR, 5, when it is not).
    A Raspberry Pi has no real-time clock: until it syncs, its times may be off by days. None where the
    call is unavailable."""
    try:
        timex = ctypes.create_string_buffer(512)  # struct timex with modes = 0: read only, larger than any ABI's
        state = _libc().adjtimex(timex)
    except (OSError, AttributeError, TypeError):
        return None
    return None if state < 0 else state != 5


def timestamped(record: dict) -> dict:
    """A final as the sinks take it: when it was made and whether that clock can be trusted, then its fields."""
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "clock_synced": clock_synced(),
    } | record


class JsonlSink:
    """One JSON object per line. Each line is appended, flushed and fsynced before the next is taken,
    so a crash or power cut loses at most the utterance in flight, and never leaves half a line.

    Each line gets `id` = "<device>:<seq>", where `seq` grows by one per line and continues after a
    restart from the last line written (or `<log>.seq`, which rotation keeps, when no file remains).

    At `max_bytes` the file rotates to .1, .2 … (`backups` kept). A backup beyond `backups` is deleted only
    when `releasable(path)` says so: the MQTT publisher keeps files with unacknowledged lines. `reopen()`
    serves log rotation by another tool (SIGHUP)."""

    def __init__(self, path: str | Path, max_bytes: int = 10_000_000, backups: int = 5, device_id: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.backups = max_bytes, backups
        self.device_id = device_id or default_device_id()
        self.releasable = lambda path: True
        self.lock = threading.RLock()  # taken by the publisher's reader while it looks for rotated files
        self.seq_path = self.path.with_name(self.path.name + ".seq")
        drop_torn_tail(self.path)
        self.seq = self._last_seq()
        self.file = self._open()

    def _last_seq(self) -> int:
        try:
            floor = int(self.seq_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            floor = 0
        for p in reversed(log_files(self.path)):
            seq = last_seq_in(p)
            if seq is not None:
                return max(seq, floor)
        return floor

    def _open(self):
        return open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> dict:
        with self.lock:
            self.seq += 1
            record = {
                "schema": SCHEMA,
                "id": f"{self.device_id}:{self.seq}",
                "device": self.device_id,
                "seq": self.seq,
            } | record
            line = json.dumps(record, ensure_ascii=False) + "\n"
            if self.max_bytes and self.file.tell() and self.file.tell() + len(line.encode()) > self.max_bytes:
                self._rotate()
            self.file.write(line)
            self.file.flush()
            os.fsync(self.file.fileno())
        return record

    def _rotate(self) -> None:
        self.file.close()
        # The sequence outlives the files: with every line acknowledged, all of them may go.
        write_atomically(self.seq_path, f"{self.seq - 1}\n")
        for old in log_files(self.path)[:-1]:  # oldest first, so no rename overwrites a file
            i = int(old.name.rsplit(".", 1)[1])
            old.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        for old in log_files(self.path):
            i = int(old.name.rsplit(".", 1)[1])
            if i > self.backups and self.releasable(old):
                old.unlink()
        self.file = self._open()

    def reopen(self) -> None:
        with self.lock:
            self.file.close()
            drop_torn_tail(self.path)
            self.file = self._open()

    def close(self) -> None:
        with self.lock:
            self.file.close()


class StdoutSink:
    def write(self, record: dict) -> dict:
        print(json.dumps(record, ensure_ascii=False), flush=True, file=sys.stdout)
        return record

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass
