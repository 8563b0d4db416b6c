"""Canonical dag-pb and UnixFS protobuf encoding (the bytes Kubo hashes).

Why hand-rolled: the dag-pb spec fixes the byte order (``PBNode.Links`` before ``PBNode.Data``,
link fields Hash, Name, Tsize) while generic protobuf serialisers write fields in number order
(Data=1 first) and so produce different CIDs. The messages are tiny, so a minimal writer and a
strict reader are simpler and faster than generated code.

Schemas (https://ipld.io/specs/codecs/dag-pb/spec/, UnixFS v1):
    PBLink { bytes Hash = 1; string Name = 2; uint64 Tsize = 3; }
    PBNode { repeated PBLink Links = 2; bytes Data = 1; }
    Data   { DataType Type = 1; bytes Data = 2; uint64 filesize = 3;
             repeated uint64 blocksizes = 4; uint64 hashType = 5; uint64 fanout = 6;
             uint32 mode = 7; UnixTime mtime = 8; }
"""

from __future__ import annotations

from dataclasses import dataclass, field

# UnixFS Data.Type values
RAW, DIRECTORY, FILE, METADATA, SYMLINK, HAMT_SHARD = 0, 1, 2, 3, 4, 5
TYPE_NAMES = {
    RAW: "raw",
    DIRECTORY: "directory",
    FILE: "file",
    METADATA: "metadata",
    SYMLINK: "symlink",
    HAMT_SHARD: "hamt-sharded-directory",
}


class DecodeError(ValueError):
    """The bytes are not a well-formed dag-pb / UnixFS message."""


def varint(n: int) -> bytes:
    """Protobuf base-128 varint (unsigned)."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = len(buf)
    while True:
        if pos >= end or shift > 63:
            raise DecodeError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes | memoryview):
    """Yield (field_number, wire_type, value) where value is int or memoryview."""
    buf = memoryview(data)
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _read_varint(buf, pos)
            yield num, wt, val
        elif wt == 2:
            n, pos = _read_varint(buf, pos)
            if pos + n > end:
                raise DecodeError("length-delimited field runs past the end")
            yield num, wt, buf[pos : pos + n]
            pos += n
        else:
            raise DecodeError(f"unsupported wire type {wt} in field {num}")


def _bytes_field(num: int, value: bytes | memoryview) -> bytes:
    return varint(num << 3 | 2) + varint(len(value)) + bytes(value)


@dataclass(frozen=True)
class PBLink:
    hash: bytes  # binary CID
    name: str | None
    tsize: int | None


@dataclass
class PBNode:
    links: list[PBLink] = field(default_factory=list)
    data: bytes | memoryview | None = None


def encode_link(link: PBLink) -> bytes:
    out = _bytes_field(1, link.hash)
    if link.name is not None:
        out += _bytes_field(2, link.name.encode("utf-8"))
    if link.tsize is not None:
        out += b"\x18" + varint(link.tsize)
    return out


def encode_node(links: list[PBLink], data: bytes | memoryview | None) -> bytes:
    """Canonical PBNode: every link (field 2) first, then Data (field 1)."""
    parts = [_bytes_field(2, encode_link(link)) for link in links]
    if data is not None:
        parts.append(_bytes_field(1, data))
    return b"".join(parts)


def decode_node(block: bytes | memoryview) -> PBNode:
    node = PBNode()
    for num, wt, val in _fields(block):
        if num == 2 and wt == 2:
            h: bytes | None = None
            name: str | None = None
            tsize: int | None = None
            for lnum, lwt, lval in _fields(val):  # type: ignore[arg-type]
                if lnum == 1 and lwt == 2:
                    h = bytes(lval)  # type: ignore[arg-type]
                elif lnum == 2 and lwt == 2:
                    try:
                        name = bytes(lval).decode("utf-8")  # type: ignore[arg-type]
                    except UnicodeDecodeError:
                        raise DecodeError("link name is not UTF-8") from None
                elif lnum == 3 and lwt == 0:
                    tsize = int(lval)  # type: ignore[arg-type]
                else:
                    raise DecodeError(f"unexpected field {lnum} in PBLink")
            if h is None:
                raise DecodeError("PBLink without Hash")
            node.links.append(PBLink(h, name, tsize))
        elif num == 1 and wt == 2:
            node.data = val  # type: ignore[assignment]  # a view: leaves are not copied
        else:
            raise DecodeError(f"unexpected field {num} in PBNode")
    return node


@dataclass
class UnixFSData:
    type: int
    data: bytes | memoryview | None = None
    filesize: int | None = None
    blocksizes: list[int] = field(default_factory=list)
    hash_type: int | None = None
    fanout: int | None = None


def encode_unixfs(u: UnixFSData) -> bytes:
    out = bytearray(b"\x08" + varint(u.type))
    if u.data is not None and len(u.data):
        out += _bytes_field(2, u.data)
    if u.filesize is not None:
        out += b"\x18" + varint(u.filesize)
    for size in u.blocksizes:  # proto2 repeated, not packed (as Kubo writes it)
        out += b"\x20" + varint(size)
    if u.hash_type is not None:
        out += b"\x28" + varint(u.hash_type)
    if u.fanout is not None:
        out += b"\x30" + varint(u.fanout)
    return bytes(out)


def decode_unixfs(data: bytes | memoryview) -> UnixFSData:
    u = UnixFSData(type=-1)
    for num, wt, val in _fields(data):
        if num == 1 and wt == 0:
            u.type = int(val)  # type: ignore[arg-type]
        elif num == 2 and wt == 2:
            u.data = val  # memoryview into the block: no copy of file data
        elif num == 3 and wt == 0:
            u.filesize = int(val)  # type: ignore[arg-type]
        elif num == 4 and wt == 0:
            u.blocksizes.append(int(val))  # type: ignore[arg-type]
        elif num == 4 and wt == 2:  # tolerate packed encoding from other writers
            pos, mv = 0, val
            while pos < len(mv):  # type: ignore[arg-type]
                size, pos = _read_varint(mv, pos)  # type: ignore[arg-type]
                u.blocksizes.append(size)
        elif num == 5 and wt == 0:
            u.hash_type = int(val)  # type: ignore[arg-type]
        elif num == 6 and wt == 0:
            u.fanout = int(val)  # type: ignore[arg-type]
        elif num in (7, 8):
            continue  # mode / mtime: metadata we do not apply
        else:
            raise DecodeError(f"unexpected field {num} in UnixFS Data")
    if u.type not in TYPE_NAMES:
        raise DecodeError(f"unknown UnixFS type {u.type}")
    return u


def file_leaf_parts(chunk_len: int) -> tuple[bytes, bytes]:
    """Header and trailer that wrap a chunk into a CIDv0 UnixFS file leaf.

    ``header + chunk + trailer`` equals ``encode_node([], encode_unixfs(FILE, chunk, len))``
    without ever concatenating the 256 KiB chunk: hashing and writing take the three pieces.
    """
    if chunk_len == 0:
        inner = b"\x08\x02\x18\x00"
        return b"\x0a" + varint(len(inner)) + inner, b""
    size = varint(chunk_len)
    inner_head = b"\x08\x02\x12" + size
    trailer = b"\x18" + size
    inner_len = len(inner_head) + chunk_len + len(trailer)
    return b"\x0a" + varint(inner_len) + inner_head, trailer


def leaf_data_span(block: bytes | memoryview) -> memoryview:
    """The file bytes inside a dag-pb UnixFS leaf, as a view into ``block`` (no copy)."""
    node = decode_node(block)
    if node.links:
        raise DecodeError("expected a leaf, found a node with links")
    if node.data is None:
        raise DecodeError("dag-pb node without UnixFS data")
    u = decode_unixfs(node.data)
    if u.type not in (FILE, RAW):
        raise DecodeError(f"expected a file leaf, found UnixFS type {TYPE_NAMES[u.type]}")
    return memoryview(u.data if u.data is not None else b"")
