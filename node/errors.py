"""The one exception hierarchy of dsi.

Every error a caller can provoke (bad arguments, unknown ids, corrupt data, refused peers)
is a ``DatasetsError``; catching that one class is enough. Subclasses also inherit from the
matching builtin where one exists (``KeyError``, ``ValueError``, ``FileNotFoundError``) so that
idiomatic ``except`` clauses keep working.
"""

from __future__ import annotations


class DatasetsError(Exception):
    """Base class of every error raised by dsi."""


class ConfigError(DatasetsError, ValueError):
    """A configuration value or environment variable is invalid."""


class InvalidArgumentError(DatasetsError, ValueError):
    """An argument is malformed (bad priority, non-JSON data, empty id, ...)."""


class InvalidCIDError(InvalidArgumentError):
    """A string or bytes value is not a valid CID."""


class NotFoundError(DatasetsError, KeyError):
    """The thing asked for does not exist here (unknown task id, CID nobody has, ...)."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class BlockNotFoundError(NotFoundError):
    """No block with this CID is stored locally, in Kubo, or at any asked peer."""


class PathNotFoundError(DatasetsError, FileNotFoundError):
    """A local file or directory given as input does not exist or cannot be read."""


class CorruptBlockError(DatasetsError):
    """A stored block does not hash to its CID: the bytes are never returned."""

    def __init__(self, cid: str, detail: str = "") -> None:
        self.cid = cid
        msg = f"block {cid} is corrupt: its bytes do not hash to its CID"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class UnsafePathError(DatasetsError, ValueError):
    """A directory entry name would write outside the destination (``..``, ``/``, separators)."""


class StorageError(DatasetsError):
    """The local store or the Kubo backend failed in a way the caller should know about."""


class KuboUnavailableError(StorageError):
    """The Kubo RPC API did not answer (not running, timed out, or returned an error)."""


class ConflictError(DatasetsError):
    """The request contradicts stored state (same task id with a different body, ...)."""


class TaskStateError(DatasetsError):
    """The task is not in a state that allows this operation (already completed, ...)."""


class AlreadyClaimedError(TaskStateError):
    """Another worker holds the task's current lease."""


class IncapableError(DatasetsError):
    """The worker's capabilities do not cover the task's ``requires`` list."""


class LeaseError(DatasetsError):
    """The caller does not hold the current lease of the task (fencing)."""


class LeaseExpiredError(LeaseError):
    """The caller's lease expired; the task may already be held by another worker."""


class ProvenanceError(DatasetsError):
    """A provenance record is invalid or a chain failed verification."""


class VerificationError(ProvenanceError):
    """A record's signature, hash or chain link does not verify; ``cid`` names the break."""

    def __init__(self, cid: str, detail: str) -> None:
        self.cid = cid
        self.detail = detail
        super().__init__(f"record {cid}: {detail}")


class EncodingError(ProvenanceError, InvalidArgumentError):
    """A value cannot be encoded in a record (NaN, unsupported type, ...)."""


class PeerError(DatasetsError):
    """A remote peer refused, failed or sent something invalid."""


class PeerDeniedError(PeerError):
    """The peer is not on this node's allow-list, or the owner refused us."""


class ProtocolViolationError(PeerError):
    """A peer sent a malformed or oversized frame, or the wrong message."""


class NodeRunningError(DatasetsError):
    """Another ``dsi-node run`` already owns this data directory."""


class DaemonNotRunningError(DatasetsError):
    """The CLI needs a running daemon and none answers on the control API."""
