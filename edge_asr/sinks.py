"""Where finals go: a JSONL file that survives crashes and rotates by size, or standard output."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class JsonlSink:
    """One JSON object per line. Each line is appended, flushed and fsynced before the next is taken,
    so a crash or power cut loses at most the utterance in flight, and never leaves half a line.
    At `max_bytes` the file rotates to .1, .2 … (`backups` kept); `reopen()` serves log rotation by
    another tool (SIGHUP)."""

    def __init__(self, path: str | Path, max_bytes: int = 10_000_000, backups: int = 5):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.backups = max_bytes, backups
        self.file = self._open()

    def _open(self):
        return open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self.max_bytes and self.file.tell() and self.file.tell() + len(line.encode()) > self.max_bytes:
            self._rotate()
        self.file.write(line)
        self.file.flush()
        os.fsync(self.file.fileno())

    def _rotate(self) -> None:
        self.file.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink()
        self.file = self._open()

    def reopen(self) -> None:
        self.file.close()
        self.file = self._open()

    def close(self) -> None:
        self.file.close()


class StdoutSink:
    def write(self, record: dict) -> None:
        print(json.dumps(record, ensure_ascii=False), flush=True, file=sys.stdout)

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass
