"""The node's Ed25519 identity: one key per ``cache_dir``, shared by provenance and libp2p.

The key file holds libp2p's protobuf ``PrivateKey`` encoding (``08 01 12 20`` + 32-byte seed),
so py-libp2p (``libp2p.crypto.serialization.deserialize_private_key``) and other libp2p
implementations read the same file. The peer id is derived exactly as libp2p does: the
identity multihash of the protobuf-encoded public key, in base58btc (``12D3KooW...``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import base58
import nacl.bindings
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from node.errors import ConfigError, VerificationError

_PRIV_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])  # KeyType=Ed25519, Data=32 bytes
_PUB_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
_IDENTITY_MH = bytes([0x00, 0x24])  # identity multihash, 36 bytes follow

_lock = threading.Lock()


def peer_id_from_public_key(raw_public_key: bytes) -> str:
    return base58.b58encode(_IDENTITY_MH + _PUB_PREFIX + raw_public_key).decode("ascii")


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw 32-byte Ed25519 public key embedded in an Ed25519 peer id."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:
        raise VerificationError(peer_id, "not a base58 peer id") from None
    if len(raw) != 38 or not raw.startswith(_IDENTITY_MH + _PUB_PREFIX):
        raise VerificationError(peer_id, "not an Ed25519 peer id (no inline public key)")
    return raw[6:]


def verify_signature(peer_id: str, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` over ``message`` was made by the key of ``peer_id``."""
    key = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Identity:
    seed: bytes  # 32-byte Ed25519 seed

    @property
    def _key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @cached_property  # derived once: the daemon names its peer id in every grant
    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @cached_property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def signer(self) -> Signer:
        """A reusable signing key (cheaper than rebuilding it per signature)."""
        return Signer(self.seed)

    def sign(self, message: bytes) -> bytes:
        return Signer(self.seed).sign(message)

    def libp2p_bytes(self) -> bytes:
        """The protobuf encoding libp2p's ``deserialize_private_key`` reads."""
        return _PRIV_PREFIX + self.seed


class Signer:
    """Ed25519 signing on the hot path (one signature per provenance record).

    libsodium (PyNaCl, already required by libp2p) signs in ~32 us here against ~56 us for
    OpenSSL through ``cryptography``, and cffi releases the GIL while it does, so the
    provenance indexer thread runs meanwhile. Ed25519 is deterministic: both give the same
    bytes (tested).
    """

    __slots__ = ("_secret",)

    def __init__(self, seed: bytes) -> None:
        self._secret = nacl.bindings.crypto_sign_seed_keypair(seed)[1]

    def sign(self, message: bytes) -> bytes:
        # crypto_sign returns signature || message; the signature is the first 64 bytes.
        return nacl.bindings.crypto_sign(message, self._secret)[:64]


def load_or_create_identity(path: Path) -> Identity:
    """Load the key at ``path`` or create it atomically with mode 0600.

    Safe against several processes starting at once: creation uses O_EXCL on a temp name and
    ``os.link`` so exactly one key wins and everyone reads that one.
    """
    with _lock:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            seed = os.urandom(32)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, _PRIV_PREFIX + seed)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # fails if another process created it first
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        data = path.read_bytes()
    if len(data) != 36 or not data.startswith(_PRIV_PREFIX):
        raise ConfigError(
            f"{path} is not an Ed25519 libp2p private key (expected 36 bytes starting 08011220); "
            "move it away to create a new identity"
        )
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, 0o600)  # tighten rather than refuse: the key is ours
    return Identity(seed=data[4:])
