"""Unsigned-varint length-prefixed frames with a hard size cap.

Why not libp2p's ``read_varint_prefixed_bytes``: it trusts the peer's length prefix and its
``read_exactly`` gives up after 100 short reads (about 6.5 MB over yamux), so a hostile or large
frame either allocates what the peer asks for or breaks mid-read. Here the prefix is checked
against the cap as soon as it is decoded, every read is bounded by what the frame may still
need, and the body is read in a loop until it is complete. Timeouts are the caller's
(``trio.fail_after`` around the call): every read here can block.
"""

from __future__ import annotations

from typing import Protocol

from protocols.errors import FrameError, FrameTooLargeError

MAX_FRAME_SIZE = 4 * 1024 * 1024  # 4 MiB: bigger payloads travel by CID
_MAX_VARINT_BYTES = 10
_FIRST_READ = 64 * 1024


class Reader(Protocol):
    async def read(self, n: int | None = None) -> bytes: ...


class Writer(Protocol):
    async def write(self, data: bytes) -> None: ...


def encode_uvarint(value: int) -> bytes:
    if value < 0:
        raise ValueError("uvarint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_frame(payload: bytes, max_size: int = MAX_FRAME_SIZE) -> bytes:
    """``payload`` with its varint length prefix; refuses to build a frame over the cap."""
    if len(payload) > max_size:
        raise FrameTooLargeError(len(payload), max_size)
    return encode_uvarint(len(payload)) + payload


async def _read_some(reader: Reader, n: int) -> bytes:
    try:
        return await reader.read(n)
    except EOFError:  # libp2p's StreamEOF is an EOFError
        return b""


def _parse_prefix(buf: bytes | bytearray, max_size: int) -> tuple[int, int] | None:
    """(header length, body length) once the varint prefix in ``buf`` is complete, None
    while it is not; FrameTooLargeError as soon as the value exceeds ``max_size``."""
    value = 0
    for i, b in enumerate(buf[:_MAX_VARINT_BYTES]):
        value |= (b & 0x7F) << (7 * i)
        if value > max_size:
            raise FrameTooLargeError(value, max_size)
        if not b & 0x80:
            return i + 1, value
    if len(buf) >= _MAX_VARINT_BYTES:
        raise FrameError("frame length prefix is not a valid varint")
    return None


async def read_frame(
    reader: Reader, max_size: int = MAX_FRAME_SIZE, buffered: bytes | bytearray = b""
) -> bytes:
    """Read the one frame of a one-frame stream (at most ``max_size`` bytes of body);
    ``buffered`` is what an earlier read already took off the stream.

    The first read takes whatever is already there (up to 64 KiB), so a small request costs
    one read - over yamux every read sends a window update frame back, so byte-at-a-time
    prefix reads are expensive. Never reads more than prefix + ``max_size`` bytes; bytes after
    the frame are a protocol violation (one request, one response per stream).
    """
    buf = bytearray(buffered)
    parsed: tuple[int, int] | None = None
    while True:
        if parsed is None:
            parsed = _parse_prefix(buf, max_size)
        if parsed is not None:
            header, length = parsed
            have = len(buf) - header
            if have > length:
                raise FrameError(f"{have - length} unexpected bytes after the frame")
            if have == length:
                return bytes(buf[header:])
            want = length - have
        else:
            want = min(_FIRST_READ, max_size + _MAX_VARINT_BYTES - len(buf))
        chunk = await _read_some(reader, want)
        if not chunk:
            if not buf:
                raise FrameError("stream ended before a frame started")
            if parsed is None:
                raise FrameError("stream ended inside a frame's length prefix")
            raise FrameError(f"stream ended after {len(buf) - parsed[0]} of {parsed[1]} bytes")
        buf += chunk


async def read_line(
    reader: Reader, buf: bytearray, max_size: int = 1024
) -> tuple[str, bytearray]:
    """One multistream-select message (varint length, text, ``\\n``) from ``buf`` topped up
    from ``reader``; returns it without the newline, and the bytes after it."""
    while True:
        parsed = _parse_prefix(buf, max_size)
        if parsed is not None and len(buf) >= parsed[0] + parsed[1]:
            header, length = parsed
            body = bytes(buf[header : header + length])
            if not body.endswith(b"\n"):
                raise FrameError("multistream message does not end with a newline")
            return body[:-1].decode("utf-8", "replace"), buf[header + length :]
        chunk = await _read_some(reader, _FIRST_READ)
        if not chunk:
            raise FrameError("stream ended during protocol negotiation")
        buf += chunk


def encode_line(text: str) -> bytes:
    """A multistream-select message: varint length, ``text``, newline."""
    body = text.encode() + b"\n"
    return encode_uvarint(len(body)) + body


async def write_frame(writer: Writer, payload: bytes, max_size: int = MAX_FRAME_SIZE) -> None:
    await writer.write(encode_frame(payload, max_size))
