"""``/dsi/task/1.0.0``: the claim protocol, server handler and client side by side (the way
go-libp2p's ``p2p/protocol/ping`` keeps both ends of a protocol in one place).

One request and one response per stream, each a varint length-prefixed protobuf
(``dsi.v1.TaskRequest`` / ``dsi.v1.TaskResponse``) of at most 4 MiB, with a timeout on every
step. The owner of a task is the only arbiter: the server hands every request to a
``TaskAuthority`` (implemented by ``node``), passing the stream's *authenticated* remote peer id
as the worker identity - never a field of the message.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from protocols._exchange import ExchangeServer, exchange
from protocols.codec import MAX_LIST_LEN, check_id, check_list, parse_strict
from protocols.errors import ErrorResponse, MalformedMessageError
from protocols.framing import MAX_FRAME_SIZE
from protocols.pb import task_pb2 as pb

if TYPE_CHECKING:
    from libp2p.abc import IHost
    from libp2p.peer.id import ID

PROTOCOL_ID = "/dsi/task/1.0.0"
DEFAULT_TIMEOUT = 10.0  # seconds for each of: open stream, write request, read response
MAX_LIST_LIMIT = 1000

logger = logging.getLogger("dsi.protocols.task")


class TaskAuthority(Protocol):
    """What the server side needs from the task owner. ``worker`` is the authenticated remote
    peer id (base58). Methods answer with the response body or raise ``ErrorResponse``;
    anything else becomes ``ERROR_CODE_INTERNAL``."""

    def is_allowed(self, peer_id: str) -> bool: ...

    async def claim(self, worker: str, req: pb.ClaimRequest) -> pb.ClaimGrant: ...

    async def complete(self, worker: str, req: pb.CompleteRequest) -> pb.Ack: ...

    async def heartbeat(self, worker: str, req: pb.HeartbeatRequest) -> pb.Ack: ...

    async def fail(self, worker: str, req: pb.FailRequest) -> pb.Ack: ...

    async def status(self, worker: str, req: pb.StatusRequest) -> pb.TaskStatus: ...

    async def list_offers(self, worker: str, req: pb.ListRequest) -> pb.TaskList: ...


def error_response(code: int, message: str) -> pb.TaskResponse:
    return pb.TaskResponse(error=pb.Error(code=code, message=message[:1024]))


def check_request(req: pb.TaskRequest) -> str:
    """The request's kind after structural checks; MalformedMessageError when invalid."""
    kind = req.WhichOneof("body")
    if kind is None:
        raise MalformedMessageError("request has no body (unknown or missing request type)")
    body = getattr(req, kind)
    if kind == "list":
        check_list(body.capabilities, "list.capabilities")
        return kind
    check_id(body.task_id, f"{kind}.task_id")
    if kind == "claim":
        check_list(body.capabilities, "claim.capabilities")
    elif kind in ("complete", "heartbeat", "fail"):
        check_id(body.lease_id, f"{kind}.lease_id")
    return kind


async def dispatch(authority: TaskAuthority, worker: str, req: pb.TaskRequest) -> pb.TaskResponse:
    """Answer one decoded request (no I/O of its own: unit-testable without a network)."""
    try:
        kind = check_request(req)
        if kind == "claim":
            return pb.TaskResponse(grant=await authority.claim(worker, req.claim))
        if kind == "complete":
            return pb.TaskResponse(ack=await authority.complete(worker, req.complete))
        if kind == "heartbeat":
            return pb.TaskResponse(ack=await authority.heartbeat(worker, req.heartbeat))
        if kind == "fail":
            return pb.TaskResponse(ack=await authority.fail(worker, req.fail))
        if kind == "status":
            return pb.TaskResponse(status=await authority.status(worker, req.status))
        return pb.TaskResponse(list=await authority.list_offers(worker, req.list))
    except ErrorResponse as exc:
        return error_response(exc.code, exc.message)
    except MalformedMessageError as exc:
        return error_response(pb.ERROR_CODE_BAD_REQUEST, str(exc))
    except Exception as exc:  # the owner failed: say so, keep serving
        logger.exception("task authority failed on a request from %s", worker)
        return error_response(pb.ERROR_CODE_INTERNAL, f"owner failed: {type(exc).__name__}")


class TaskServer(ExchangeServer[pb.TaskRequest, pb.TaskResponse]):
    """The ``/dsi/task/1.0.0`` stream handler: ``host.set_stream_handler(PROTOCOL_ID,
    TaskServer(authority).handle_stream)``."""

    protocol_id = PROTOCOL_ID

    def __init__(
        self,
        authority: TaskAuthority,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_frame: int = MAX_FRAME_SIZE,
        max_concurrent: int = 64,
    ) -> None:
        super().__init__(timeout=timeout, max_frame=max_frame, max_concurrent=max_concurrent)
        self.authority = authority

    def is_allowed(self, peer_id: str) -> bool:
        return self.authority.is_allowed(peer_id)

    def error_response(self, code: int, message: str) -> pb.TaskResponse:
        return error_response(code, message)

    def parse(self, data: bytes) -> pb.TaskRequest:
        return parse_strict(pb.TaskRequest, data)

    async def respond(self, peer_id: str, req: pb.TaskRequest) -> pb.TaskResponse:
        return await dispatch(self.authority, peer_id, req)


class TaskClient:
    """The requesting side: one stream per request, a timeout on each step.

    Raises ``ErrorResponse`` when the owner answers with an ``Error``, ``ProtocolError`` when
    the answer is malformed, ``trio.TooSlowError`` on a timeout, and libp2p's stream/swarm
    errors when the peer cannot be reached.
    """

    def __init__(
        self, host: IHost, *, timeout: float = DEFAULT_TIMEOUT, max_frame: int = MAX_FRAME_SIZE
    ) -> None:
        self.host = host
        self.timeout = timeout
        self.max_frame = max_frame

    async def request(self, peer_id: ID, req: pb.TaskRequest) -> pb.TaskResponse:
        resp = await exchange(
            self.host, peer_id, PROTOCOL_ID, req, pb.TaskResponse,
            timeout=self.timeout, max_frame=self.max_frame,
        )
        if resp.WhichOneof("body") == "error":
            raise ErrorResponse(resp.error.code, resp.error.message)
        if resp.WhichOneof("body") is None:
            raise MalformedMessageError("response has no body")
        return resp

    async def _expect(self, peer_id: ID, req: pb.TaskRequest, kind: str):
        resp = await self.request(peer_id, req)
        if resp.WhichOneof("body") != kind:
            raise MalformedMessageError(
                f"expected a {kind} response, got {resp.WhichOneof('body')}"
            )
        return getattr(resp, kind)

    async def claim(self, peer_id: ID, task_id: str, capabilities: list[str]) -> pb.ClaimGrant:
        req = pb.TaskRequest(claim=pb.ClaimRequest(task_id=task_id, capabilities=capabilities))
        return await self._expect(peer_id, req, "grant")

    async def complete(
        self, peer_id: ID, task_id: str, lease_id: str, result: bytes, result_cid: str = ""
    ) -> pb.Ack:
        req = pb.TaskRequest(
            complete=pb.CompleteRequest(
                task_id=task_id, lease_id=lease_id, result=result, result_cid=result_cid
            )
        )
        return await self._expect(peer_id, req, "ack")

    async def heartbeat(self, peer_id: ID, task_id: str, lease_id: str) -> pb.Ack:
        req = pb.TaskRequest(heartbeat=pb.HeartbeatRequest(task_id=task_id, lease_id=lease_id))
        return await self._expect(peer_id, req, "ack")

    async def fail(
        self, peer_id: ID, task_id: str, lease_id: str, error: str, retryable: bool = True
    ) -> pb.Ack:
        req = pb.TaskRequest(
            fail=pb.FailRequest(
                task_id=task_id, lease_id=lease_id, error=error, retryable=retryable
            )
        )
        return await self._expect(peer_id, req, "ack")

    async def status(self, peer_id: ID, task_id: str) -> pb.TaskStatus:
        req = pb.TaskRequest(status=pb.StatusRequest(task_id=task_id))
        return await self._expect(peer_id, req, "status")

    async def list_offers(
        self, peer_id: ID, capabilities: list[str], limit: int = 100
    ) -> list[pb.TaskOffer]:
        limit = max(1, min(limit, MAX_LIST_LIMIT))
        req = pb.TaskRequest(
            list=pb.ListRequest(capabilities=capabilities[:MAX_LIST_LEN], limit=limit)
        )
        return list((await self._expect(peer_id, req, "list")).offers)
