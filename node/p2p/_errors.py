"""Translation between the node's DatasetsError hierarchy and ``dsi.v1.ErrorCode``.

Owner side: a refused request becomes an ``Error`` response with a code a js/go peer can act
on. Worker side: an ``Error`` from an owner becomes the same exception a local queue would
raise, so callers handle local and remote tasks alike.
"""

from __future__ import annotations

from node.errors import (
    AlreadyClaimedError,
    ConflictError,
    DatasetsError,
    IncapableError,
    InvalidArgumentError,
    LeaseError,
    LeaseExpiredError,
    NotFoundError,
    PeerDeniedError,
    PeerError,
    ProtocolViolationError,
    TaskStateError,
)
from protocols.errors import ErrorResponse
from protocols.pb import task_pb2 as pb


def to_error_response(exc: DatasetsError, op: str) -> ErrorResponse:
    """The Error an owner answers for a refused ``op`` (claim, complete, ...)."""
    msg = str(exc)
    if isinstance(exc, NotFoundError):
        code = pb.ERROR_CODE_NOT_FOUND
    elif isinstance(exc, PeerDeniedError):
        code = pb.ERROR_CODE_DENIED
    elif isinstance(exc, AlreadyClaimedError):
        code = pb.ERROR_CODE_ALREADY_CLAIMED
    elif isinstance(exc, LeaseExpiredError):
        code = pb.ERROR_CODE_LEASE_EXPIRED
    elif isinstance(exc, LeaseError):
        code = pb.ERROR_CODE_NOT_LEASE_HOLDER
    elif isinstance(exc, IncapableError):
        code = pb.ERROR_CODE_INCAPABLE
    elif isinstance(exc, TaskStateError):
        # Finished or in retry backoff: not claimable now / no live lease to report on.
        code = pb.ERROR_CODE_ALREADY_CLAIMED if op == "claim" else pb.ERROR_CODE_NOT_LEASE_HOLDER
    elif isinstance(exc, (InvalidArgumentError, ConflictError)):
        code = pb.ERROR_CODE_BAD_REQUEST
    else:
        code = pb.ERROR_CODE_INTERNAL
    return ErrorResponse(code, msg)


def from_error_response(exc: ErrorResponse, owner: str) -> DatasetsError:
    """The local exception for an owner's Error answer."""
    msg = f"owner {owner} refused: {exc.message}"
    code = exc.code
    if code == pb.ERROR_CODE_NOT_FOUND:
        return NotFoundError(msg)
    if code == pb.ERROR_CODE_ALREADY_CLAIMED:
        return AlreadyClaimedError(msg)
    if code == pb.ERROR_CODE_LEASE_EXPIRED:
        return LeaseExpiredError(msg)
    if code == pb.ERROR_CODE_NOT_LEASE_HOLDER:
        return LeaseError(msg)
    if code == pb.ERROR_CODE_INCAPABLE:
        return IncapableError(msg)
    if code == pb.ERROR_CODE_DENIED:
        return PeerDeniedError(msg)
    if code == pb.ERROR_CODE_BAD_REQUEST:
        return ProtocolViolationError(msg)
    return PeerError(f"owner {owner} failed ({exc.code_name}): {exc.message}; retry later")
