"""The append-only journal in front of the provenance index.

Why: a record must be durable (against a process crash) before ``append`` returns, and one
SQLite transaction per record -- record row, unique indexes, postings -- measured 150-250 us
here, most of the 5,000 records/s budget. One ``write()`` of the record to an ``O_APPEND``
file costs a few microseconds and is just as safe against SIGKILL: once ``write`` returns, the
bytes are in the kernel's page cache and a killed process cannot take them back (the same
guarantee as SQLite's WAL with ``synchronous=NORMAL``; neither survives a power loss without
fsync, and a torn tail after one is detected by the CRC and cut off).

Format: a 16-byte header (``DSIPJNL1`` + generation, u64 big-endian), then entries
``u32 length | u32 crc32 | record bytes``. Entries are moved into SQLite in batches
(``ProvenanceStore.catch_up``), after which the journal is emptied and its generation bumped;
the index remembers ``(generation, offset)`` of what it has absorbed (see ``_store``). All
writes happen under the store's writer ``flock``.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from pathlib import Path

MAGIC = b"DSIPJNL1"
HEADER = 16
_ENTRY = struct.Struct(">II")


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        # O_APPEND for entries (atomic append from several processes); a second descriptor
        # without it for the header, because Linux pwrite() on O_APPEND ignores the offset.
        self._afd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._fd = os.open(path, os.O_RDWR)

    def ensure_header(self) -> None:
        """Write the header of a new (empty) journal. Call under the writer lock."""
        if self.size() < HEADER:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, MAGIC + struct.pack(">Q", 1), 0)

    def generation(self) -> int:
        head = os.pread(self._fd, HEADER, 0)
        if len(head) < HEADER or head[:8] != MAGIC:
            return 0
        return int(struct.unpack(">Q", head[8:])[0])

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def append(self, body: bytes, size: int) -> int:
        """Append one entry with a single ``write`` to a journal of ``size`` bytes (the caller
        holds the writer lock, so nobody else appends); returns the size after it."""
        entry = _ENTRY.pack(len(body), zlib.crc32(body)) + body
        written = os.write(self._afd, entry)
        if written != len(entry):  # pragma: no cover - regular files do not short-write
            raise OSError(f"short write to {self.path}: {written} of {len(entry)} bytes")
        return size + written

    def read(self, start: int, end: int) -> tuple[list[tuple[int, bytes]], int]:
        """Entries in ``[start, end)`` as ``(offset after entry, body)`` and the offset where
        valid data ends (< ``end`` when the tail is torn or corrupt)."""
        data = os.pread(self._fd, end - start, start) if end > start else b""
        out: list[tuple[int, bytes]] = []
        pos = 0
        while pos + _ENTRY.size <= len(data):
            length, crc = _ENTRY.unpack_from(data, pos)
            body_end = pos + _ENTRY.size + length
            if body_end > len(data):
                break
            body = data[pos + _ENTRY.size : body_end]
            if zlib.crc32(body) != crc:
                break
            pos = body_end
            out.append((start + pos, body))
        return out, start + pos

    def truncate(self, at: int) -> None:
        os.ftruncate(self._fd, at)

    def rotate(self, generation: int) -> None:
        """Empty the journal and start ``generation`` (after the index absorbed it all).

        Truncate first, then bump: a crash in between leaves a short file with the old
        generation, which ``ProvenanceStore`` recognises (size below the absorbed offset).
        """
        os.ftruncate(self._fd, HEADER)
        os.pwrite(self._fd, MAGIC + struct.pack(">Q", generation), 0)

    def close(self) -> None:
        for fd in (self._afd, self._fd):
            with contextlib.suppress(OSError):
                os.close(fd)
