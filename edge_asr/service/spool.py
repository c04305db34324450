"""The JSONL log read as a spool: its files in order, the sequence numbers in its lines, the acknowledged
offset, and a reader that follows the log through rotation.

The log is `transcripts.jsonl` and its rotated backups `transcripts.jsonl.1`, `.2`, … (higher is older).
Every line carries `seq`, a number that grows by one per final and survives restarts, so "every line up to
sequence N is acknowledged" is exact even after files were renamed, and (inode, byte) only finds the place
quickly.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

TAIL_BYTES = 65536  # more than any one line


def log_files(path: Path) -> list[Path]:
    """The log's files, oldest first: the numbered backups from the highest down, then the live file."""
    numbered = []
    for p in path.parent.glob(path.name + ".*"):
        suffix = p.name[len(path.name) + 1 :]
        if suffix.isdigit():
            numbered.append((int(suffix), p))
    live = [path] if path.exists() else []
    return [p for _, p in sorted(numbered, reverse=True)] + live


def line_seq(line: bytes) -> int | None:
    """The `seq` of one complete log line; None for a line that is not one of ours (or not whole)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
        return None
    seq = record.get("seq") if isinstance(record, dict) else None
    return seq if type(seq) is int else None


def _tail(f, end: int | None = None) -> bytes:
    """The last TAIL_BYTES of an open binary file before `end` (default: its end)."""
    if end is None:
        end = f.seek(0, os.SEEK_END)
    start = max(0, end - TAIL_BYTES)
    f.seek(start)
    return f.read(end - start)


def last_seq_in(path: Path) -> int | None:
    """The sequence of the last complete line of one file."""
    try:
        with open(path, "rb") as f:
            tail = _tail(f)
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")[:-1]):  # [:-1]: what follows the last newline is not whole
        seq = line_seq(line)
        if seq is not None:
            return seq
    return None


def drop_torn_tail(path: Path) -> None:
    """A power cut can leave half a line at the end of the live file. Cut it off, or the next line would be
    appended to it and both would be lost."""
    try:
        with open(path, "r+b") as f:
            tail = _tail(f)
            size = f.tell()
            if not size or tail.endswith(b"\n"):
                return
            cut = tail.rfind(b"\n")
            f.truncate(size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= TAIL_BYTES else size))
            f.flush()
            os.fsync(f.fileno())
    except FileNotFoundError:
        pass


def write_atomically(path: Path, text: str) -> None:
    """Replace a small file so that a crash leaves the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some systems cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Position:
    """The end of one line of the log: the file (by inode, which rotation's renames keep), the byte after the
    line's newline, and the line's sequence. seq 0 with inode 0 is the beginning of the log."""

    inode: int = 0
    byte: int = 0
    seq: int = 0


class OffsetFile:
    """`<log>.offset`: the position up to which every line is acknowledged by the broker."""

    def __init__(self, log_path: Path):
        self.path = log_path.with_name(log_path.name + ".offset")

    def load(self) -> Position:
        try:
            position = Position(**json.loads(self.path.read_text(encoding="utf-8")))
            if not all(type(v) is int for v in asdict(position).values()):
                raise TypeError("not three integers")
            return position
        except FileNotFoundError:
            return Position()
        except (ValueError, TypeError, RecursionError) as e:  # hand-edited or foreign: start over, duplicates marked
            print(
                f"edge-asr: {self.path}: unreadable offset ({e}); publishing the whole log again",
                file=sys.stderr,
                flush=True,
            )
            return Position()

    def save(self, position: Position) -> None:
        write_atomically(self.path, json.dumps(asdict(position)) + "\n")


class SpoolReader:
    """Reads whole lines after a position, in order, across rotation. Rotation renames files under
    `lock`; the reader keeps its file open, so a rename never loses its place."""

    def __init__(self, log_path: Path, lock, after: Position):
        self.path, self.lock = Path(log_path), lock
        self.after_seq = after.seq
        self.file = None
        self.inode = 0
        with self.lock:
            self._open_at(after)

    def _open(self, path: Path, byte: int = 0) -> bool:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return False
        if self.file:
            self.file.close()
        self.file, self.inode = f, os.fstat(f.fileno()).st_ino
        f.seek(byte)
        return True

    def _open_at(self, after: Position) -> None:
        files = log_files(self.path)
        for p in files:
            # The inode finds the file, and the line before the byte must be the acknowledged one: an inode can
            # be reused by a newer file once the old one is deleted.
            if after.inode and _inode(p) == after.inode and self._seq_before(p, after.byte) == after.seq:
                self._open(p, after.byte)
                return
        # Not found: read from the oldest file; lines up to after.seq are skipped by their sequence.
        if files:
            self._open(files[0])

    @staticmethod
    def _seq_before(path: Path, byte: int) -> int | None:
        try:
            with open(path, "rb") as f:
                chunk = _tail(f, byte)
        except OSError:
            return None
        if not chunk.endswith(b"\n"):
            return None
        return line_seq(chunk[:-1].rsplit(b"\n", 1)[-1])

    def next_line(self) -> tuple[bytes, Position] | None:
        """The next whole line (without its newline) and the position after it; None when there is none yet."""
        while True:
            if self.file is None:
                with self.lock:
                    files = log_files(self.path)
                    if not files or not self._open(files[0]):
                        return None
            start = self.file.tell()
            line = self.file.readline()
            if line.endswith(b"\n"):
                seq = line_seq(line)
                if seq is None:
                    print(
                        f"edge-asr: {self.path}: skipped a line that is not a transcript record",
                        file=sys.stderr,
                        flush=True,
                    )
                    continue
                if seq <= self.after_seq:
                    continue
                self.after_seq = seq
                return line[:-1], Position(self.inode, self.file.tell(), seq)
            self.file.seek(start)  # half a line, or the end: read it again once it is whole
            if not self._advance():
                return None

    def _advance(self) -> bool:
        """At the end of the current file: move to the next newer one if the log has rotated past it."""
        if _inode(self.path) == self.inode:
            return False  # the live file, not rotated: the common case of every idle poll, one stat
        with self.lock:  # no line is written and no file renamed meanwhile
            files = log_files(self.path)
            inodes = [_inode(p) for p in files]
            if self.inode not in inodes:  # deleted under us (by hand): continue at the oldest file
                return bool(files) and self._open(files[0])
            i = inodes.index(self.inode)
            if i == len(files) - 1:
                return False  # the live file: wait for more
            if os.fstat(self.file.fileno()).st_size > self.file.tell():
                return True  # lines written before the rotation are still to be read
            return self._open(files[i + 1])

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None


def _inode(path: Path) -> int:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return -1
