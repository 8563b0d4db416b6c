"""Gossip announcements on topic ``dsi/tasks/v1``: the ``dsi.v1.Announcement`` codec and the
topic validator.

Gossip is a hint, never a delivery: an offer says "this task can be claimed from its owner
now", an update says "it left the claimable set". Receivers must handle both idempotently by
task id (late joiners get recent messages replayed) and recover missed offers with a
``ListRequest`` to the owner.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import multiaddr

from protocols.codec import check_id, check_list, parse_strict
from protocols.errors import MalformedMessageError
from protocols.pb import task_pb2 as pb

TOPIC = "dsi/tasks/v1"
# go/js gossipsub drop RPCs over 1 MiB silently; an announcement is a few hundred bytes.
MAX_ANNOUNCEMENT_SIZE = 64 * 1024
MAX_OWNER_ADDRS = 16
MAX_PRIORITY = 10

_UPDATE_STATES = frozenset(
    {
        pb.TASK_STATE_PENDING,
        pb.TASK_STATE_CLAIMED,
        pb.TASK_STATE_COMPLETED,
        pb.TASK_STATE_FAILED,
        pb.TASK_STATE_CANCELLED,
    }
)


def encode_offer(offer: pb.TaskOffer) -> bytes:
    return pb.Announcement(offer=offer).SerializeToString()


def encode_update(update: pb.TaskUpdate) -> bytes:
    return pb.Announcement(update=update).SerializeToString()


def check_offer(offer: pb.TaskOffer, origin: str | None = None) -> None:
    check_id(offer.task_id, "offer.task_id")
    check_id(offer.task_type, "offer.task_type")
    check_id(offer.owner_peer_id, "offer.owner_peer_id")
    if origin is not None and offer.owner_peer_id != origin:
        raise MalformedMessageError("offer.owner_peer_id is not the message's signed origin")
    if offer.priority > MAX_PRIORITY:
        raise MalformedMessageError(f"offer.priority {offer.priority} is over {MAX_PRIORITY}")
    check_list(offer.tags, "offer.tags")
    check_list(offer.requires, "offer.requires")
    if len(offer.owner_addrs) > MAX_OWNER_ADDRS:
        raise MalformedMessageError(f"offer.owner_addrs has more than {MAX_OWNER_ADDRS}")
    for addr in offer.owner_addrs:
        problem = _owner_addr_problem(addr, offer.owner_peer_id)
        if problem:
            raise MalformedMessageError(f"offer.owner_addrs: {addr!r} {problem}")


@functools.lru_cache(maxsize=4096)
def _owner_addr_problem(addr: str, owner: str) -> str:
    """Why ``addr`` is not a valid address of ``owner`` ("" when it is). Cached: an owner
    sends the same few addresses in every offer, and multiaddr parsing is slow."""
    if len(addr) > 1024:
        return "is too long"
    try:
        ma = multiaddr.Multiaddr(addr)
    except Exception:
        return "is not a multiaddr"
    try:
        p2p = ma.value_for_protocol("p2p")
    except Exception:
        p2p = None
    if p2p and p2p != owner:
        return "names another peer"
    return ""


def check_update(update: pb.TaskUpdate, origin: str | None = None) -> None:
    check_id(update.task_id, "update.task_id")
    check_id(update.owner_peer_id, "update.owner_peer_id")
    if origin is not None and update.owner_peer_id != origin:
        raise MalformedMessageError("update.owner_peer_id is not the message's signed origin")
    if update.state not in _UPDATE_STATES:
        raise MalformedMessageError(f"update.state {update.state} is not a task state")
    if len(update.worker_peer_id) > 128:
        raise MalformedMessageError("update.worker_peer_id is too long")


def decode_announcement(data: bytes, origin: str | None = None) -> pb.Announcement:
    """Decode and check one announcement; ``origin`` is the gossip message's signed author
    (only the owner of a task may announce it). Raises MalformedMessageError."""
    if len(data) > MAX_ANNOUNCEMENT_SIZE:
        raise MalformedMessageError(f"announcement of {len(data)} bytes is over the cap")
    ann = parse_strict(pb.Announcement, data)
    body = ann.WhichOneof("body")
    if body == "offer":
        check_offer(ann.offer, origin)
    elif body == "update":
        check_update(ann.update, origin)
    else:
        raise MalformedMessageError("announcement has no body")
    return ann


def make_topic_validator(
    is_allowed: Callable[[str], bool] | None = None,
) -> Callable[..., bool]:
    """A synchronous gossipsub topic validator: ``(forwarder: ID, msg: rpc_pb2.Message)``.

    Rejects (so it is neither delivered nor forwarded) anything that does not decode, whose
    body does not name its signed origin as owner, or - with an allow-list - whose origin or
    forwarder is not allowed.
    """
    from libp2p.peer.id import ID

    def validate(forwarder: object, msg: object) -> bool:
        try:
            origin = ID(msg.from_id).to_base58()  # type: ignore[attr-defined]
            if is_allowed is not None:
                fwd = forwarder.to_base58() if isinstance(forwarder, ID) else str(forwarder)
                if not (is_allowed(origin) and is_allowed(fwd)):
                    return False
            decode_announcement(msg.data, origin)  # type: ignore[attr-defined]
        except Exception:
            return False
        return True

    return validate
