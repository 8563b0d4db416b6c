"""CID parsing and formatting on top of py-cid / py-multihash / py-multibase.

The store keys every block by its sha2-256 digest, so a CID here is (version, codec, digest).
CIDv0 and CIDv1 of the same multihash name the same block.

Hot path: provenance writes thousands of dag-json blocks per second and reads them back, and
py-cid's generic multibase converter formats ~7,000 CIDs/s, which would cost most of that
budget. So the two encodings this project emits (base32 for CIDv1, base58btc for CIDv0) go
through a precomputed binary prefix per codec (built once *by py-cid*) plus the standard
library's base32 codec and the ``base58`` package py-cid itself uses. Anything else (other
bases, unknown codecs) is parsed by py-cid. Tests cross-check both paths.
"""

from __future__ import annotations

import base64
import hashlib
from typing import NamedTuple

import base58
import cid as pycid
import multihash

from node.errors import InvalidCIDError

CODECS: dict[str, int] = {"raw": 0x55, "dag-pb": 0x70, "dag-json": 0x0129}
SHA2_256 = "sha2-256"
DIGEST_LEN = 32

_ZERO_MH = multihash.encode(bytes(DIGEST_LEN), SHA2_256)
# Multihash header of sha2-256 (code 0x12, length 32), taken from py-multihash.
MH_PREFIX: bytes = _ZERO_MH[: len(_ZERO_MH) - DIGEST_LEN]
# Binary CIDv1 prefix (version + codec + multihash header) per codec, taken from py-cid.
_V1_PREFIX: dict[str, bytes] = {
    name: pycid.CIDv1(name, _ZERO_MH).buffer[: -DIGEST_LEN] for name in CODECS
}
_V1_BY_PREFIX: dict[bytes, str] = {p: name for name, p in _V1_PREFIX.items()}


class CID(NamedTuple):
    """A parsed sha2-256 CID. ``str(cid)`` gives the canonical string of its version."""

    version: int
    codec: str
    digest: bytes

    def __str__(self) -> str:
        return format_cid(self.version, self.codec, self.digest)

    @property
    def multihash(self) -> bytes:
        return MH_PREFIX + self.digest

    def to_v1(self) -> CID:
        return CID(1, self.codec, self.digest)

    def binary(self) -> bytes:
        """The CID's binary form, as dag-pb links and CARs carry it."""
        if self.version == 0:
            return MH_PREFIX + self.digest
        return _V1_PREFIX[self.codec] + self.digest


def format_cid(version: int, codec: str, digest: bytes) -> str:
    """CIDv0 (base58btc, dag-pb only) or CIDv1 in base32, as Kubo prints them."""
    if version == 0:
        if codec != "dag-pb":
            raise InvalidCIDError(f"CIDv0 can only name dag-pb blocks, not {codec}")
        return base58.b58encode(MH_PREFIX + digest).decode("ascii")
    prefix = _V1_PREFIX.get(codec)
    if prefix is None:
        raise InvalidCIDError(f"unsupported codec {codec!r}; known: {', '.join(CODECS)}")
    return "b" + base64.b32encode(prefix + digest).decode("ascii").lower().rstrip("=")


def cid_of(data: bytes | memoryview, codec: str = "raw", version: int = 1) -> CID:
    return CID(version, codec, hashlib.sha256(data).digest())


def _from_binary_v1(raw: bytes) -> CID | None:
    prefix, digest = raw[: -DIGEST_LEN], raw[-DIGEST_LEN:]
    codec = _V1_BY_PREFIX.get(prefix)
    if codec is None or len(digest) != DIGEST_LEN:
        return None
    return CID(1, codec, digest)


def _slow_parse(text: str) -> CID:
    try:
        parsed = pycid.from_string(text)
    except Exception as exc:  # py-cid raises ValueError, KeyError, multibase errors ...
        raise InvalidCIDError(f"{text!r} is not a valid CID ({exc})") from None
    try:
        decoded = multihash.decode(parsed.multihash)
    except Exception as exc:
        raise InvalidCIDError(f"{text!r} has an invalid multihash ({exc})") from None
    if decoded.name != SHA2_256 or len(decoded.digest) != DIGEST_LEN:
        raise InvalidCIDError(
            f"{text!r} uses the {decoded.name} hash; this store holds sha2-256 CIDs only"
        )
    codec = parsed.codec
    if codec not in CODECS:
        raise InvalidCIDError(
            f"{text!r} has codec {codec!r}; supported codecs: {', '.join(CODECS)}"
        )
    return CID(parsed.version, codec, decoded.digest)


def parse_cid(value: str | CID) -> CID:
    """Parse a CID string in any base/version. Raises InvalidCIDError with the reason."""
    if isinstance(value, CID):
        return value
    if not isinstance(value, str):
        raise InvalidCIDError(f"a CID must be a string, got {type(value).__name__}")
    text = value.strip()
    if len(text) == 46 and text.startswith("Qm"):
        try:
            raw = base58.b58decode(text)
        except ValueError:
            raw = b""
        if len(raw) == 34 and raw.startswith(MH_PREFIX):
            return CID(0, "dag-pb", raw[2:])
        raise InvalidCIDError(f"{text!r} is not a valid CIDv0 (base58btc sha2-256 multihash)")
    if text.startswith("b") and text[1:].isalnum() and text[1:].islower():
        body = text[1:].upper()
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except ValueError:
            raw = b""
        fast = _from_binary_v1(raw) if raw else None
        if fast is not None:
            return fast
    return _slow_parse(text)


def is_cid(value: object) -> bool:
    try:
        parse_cid(value)  # type: ignore[arg-type]
    except InvalidCIDError:
        return False
    return True


def cid_from_binary(raw: bytes) -> CID:
    """Parse a binary CID (as carried in dag-pb links). Raises InvalidCIDError."""
    if len(raw) == 34 and raw.startswith(MH_PREFIX):
        return CID(0, "dag-pb", raw[2:])
    fast = _from_binary_v1(raw)
    if fast is not None:
        return fast
    try:
        text = pycid.from_bytes(raw).encode("base32").decode("ascii")
    except Exception as exc:
        raise InvalidCIDError(f"invalid binary CID {raw.hex()} ({exc})") from None
    return _slow_parse(text)
