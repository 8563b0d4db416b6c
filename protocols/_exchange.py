"""One request, one response per stream: the exchange both dsi stream protocols share.

``ExchangeServer`` is the server half (allow-list, a concurrency bound, a bounded and timed read,
strict decoding, the answer, and a reset for anything a peer gets wrong); each protocol supplies
only how to decode and answer its own messages. ``exchange`` is the client half. Both sides put a
timeout on every step, so a silent or slow peer costs at most ``timeout`` per step.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Generic, TypeVar

import trio
from google.protobuf.message import Message

from protocols.codec import parse_strict
from protocols.errors import FrameError, FrameTooLargeError, MalformedMessageError
from protocols.framing import (
    MAX_FRAME_SIZE,
    encode_frame,
    encode_line,
    read_frame,
    read_line,
)
from protocols.pb import task_pb2 as pb

if TYPE_CHECKING:
    from libp2p.abc import IHost, INetStream
    from libp2p.peer.id import ID

Req = TypeVar("Req")
Resp = TypeVar("Resp", bound=Message)
M = TypeVar("M", bound=Message)

logger = logging.getLogger("dsi.protocols")

MULTISTREAM_ID = "/multistream/1.0.0"
_NEGOTIATION_HEADER = encode_line(MULTISTREAM_ID)
# A request up to this size goes out with the negotiation, before the server accepted the
# protocol (a server that refuses it resets the stream; nothing is lost but the bytes).
_PIPELINE_MAX = 64 * 1024


def remote_peer(stream: INetStream) -> str:
    """The stream's authenticated remote peer id (base58): the only identity we trust."""
    return stream.muxed_conn.peer_id.to_base58()


async def send_and_close(stream: INetStream, data: bytes) -> None:
    """Write the last bytes of a stream and close it. A stream that can do both in one step
    (dsi's libp2p fixes give py-libp2p's ``NetStream`` a ``write_and_close``) does."""
    await _send_last(stream, data, "write_and_close", "close")


async def send_and_close_write(stream: INetStream, data: bytes) -> None:
    """Write our last bytes and half-close (the reply is still to come), in one step where
    the stream can (``write_and_close_write``, as for ``send_and_close``)."""
    await _send_last(stream, data, "write_and_close_write", "close_write")


async def _send_last(stream: INetStream, data: bytes, in_one_step: str, close: str) -> None:
    combined = getattr(stream, in_one_step, None)
    if combined is not None:
        await combined(data)
        return
    await stream.write(data)
    await getattr(stream, close)()


async def reset_stream(stream: INetStream) -> None:
    with trio.move_on_after(1):
        with contextlib.suppress(Exception):
            await stream.reset()


class ExchangeServer(ABC, Generic[Req, Resp]):
    """A stream handler: ``host.set_stream_handler(server.protocol_id, server.handle_stream)``."""

    protocol_id: str

    def __init__(
        self,
        *,
        timeout: float,
        max_frame: int = MAX_FRAME_SIZE,
        max_request_frame: int | None = None,
        max_concurrent: int = 64,
    ) -> None:
        self.timeout = timeout
        self.max_frame = max_frame
        self.max_request_frame = min(max_request_frame or max_frame, max_frame)
        self._slots = trio.Semaphore(max_concurrent)
        self.served = 0
        self.rejected = 0

    @abstractmethod
    def is_allowed(self, peer_id: str) -> bool: ...

    @abstractmethod
    def error_response(self, code: int, message: str) -> Resp: ...

    @abstractmethod
    def parse(self, data: bytes) -> Req:
        """Decode and check one request; MalformedMessageError when it is not acceptable."""

    @abstractmethod
    async def respond(self, peer_id: str, req: Req) -> Resp:
        """The answer to a decoded request (errors are answers too, not exceptions)."""

    async def _answer(self, stream: INetStream, resp: Resp) -> None:
        with trio.fail_after(self.timeout):
            await send_and_close(stream, encode_frame(resp.SerializeToString(), self.max_frame))

    async def handle_stream(self, stream: INetStream) -> None:
        try:
            peer = remote_peer(stream)
            if not self.is_allowed(peer):
                self.rejected += 1
                logger.info("refusing %s from %s: not on the allow-list", self.protocol_id, peer)
                await self._answer(
                    stream,
                    self.error_response(pb.ERROR_CODE_DENIED, "peer is not on the allow-list"),
                )
                return
            try:
                self._slots.acquire_nowait()  # a free slot needs no trip through trio's scheduler
            except trio.WouldBlock:
                await self._slots.acquire()
            try:
                try:
                    with trio.fail_after(self.timeout):
                        data = await read_frame(stream, self.max_request_frame)
                    req = self.parse(data)
                except (FrameTooLargeError, MalformedMessageError) as exc:
                    self.rejected += 1
                    logger.info("bad %s request from %s: %s", self.protocol_id, peer, exc)
                    # Answer, then reset: an oversized body is still unread on the stream.
                    await self._answer(
                        stream, self.error_response(pb.ERROR_CODE_BAD_REQUEST, str(exc))
                    )
                    await reset_stream(stream)
                    return
                resp = await self.respond(peer, req)
                self.served += 1
                await self._answer(stream, resp)
            finally:
                self._slots.release()
        except (FrameError, trio.TooSlowError) as exc:
            self.rejected += 1
            logger.debug("resetting %s stream: %s", self.protocol_id, exc)
            await reset_stream(stream)
        except Exception as exc:  # a peer's misbehaviour must never stop the node serving
            logger.debug("resetting %s stream after %r", self.protocol_id, exc)
            await reset_stream(stream)

    # Every stream handle_stream takes ends in send_and_close or a reset. Declared so that
    # dsi's multistream listener (node.p2p._libp2p_fixes.EchoOnceMultiselect) may send its
    # protocol echo together with the answer when the dialer did not wait for the echo.
    handle_stream.dsi_answers_on_close = True  # type: ignore[attr-defined]


async def exchange(
    host: IHost,
    peer_id: ID,
    protocol_id: str,
    request: Message,
    response_type: type[M],
    *,
    timeout: float,
    max_frame: int = MAX_FRAME_SIZE,
) -> M:
    """Send ``request`` on a new stream and return the strictly decoded response.

    The stream's multistream-select negotiation is pipelined: the multistream header, the
    protocol id and (when small) the request frame go out in one write, the way go-libp2p's
    lazy client does, instead of py-libp2p's ``host.new_stream`` (header, wait for the echo,
    protocol, wait for the echo, then the request: two extra round trips, and three frames,
    encryptions and syscalls on each side instead of one). The bytes on the wire are those of
    a plain negotiation, so any multistream-select 1.0 server (py, go, js, rust) answers it.

    Raises ``ProtocolError`` subclasses for a malformed answer, ``trio.TooSlowError`` when a
    step times out, and libp2p's stream/swarm errors when the peer cannot be reached or does
    not speak ``protocol_id`` (``StreamFailure``, as ``host.new_stream`` raises).
    """
    from libp2p.host.exceptions import StreamFailure
    from libp2p.network.stream.exceptions import StreamError

    frame = encode_frame(request.SerializeToString(), max_frame)
    early = len(frame) <= _PIPELINE_MAX
    with trio.fail_after(timeout):
        stream = await host.get_network().new_stream(peer_id)
    try:
        with trio.fail_after(timeout):
            # The request is all we send: it goes with our half-close (FIN), which any
            # libp2p server reads as the end of the request, in the same encrypted message.
            negotiation = _NEGOTIATION_HEADER + encode_line(protocol_id)
            if early:
                await send_and_close_write(stream, negotiation + frame)
            else:
                await stream.write(negotiation)
            try:
                header, buf = await read_line(stream, bytearray())
                answer, buf = await read_line(stream, buf)
            except StreamError as exc:
                # A listener that does not speak the protocol answers "na" and may reset the
                # stream at once (our request follows where it expects another proposal);
                # yamux drops unread data on a reset, so the "na" can be lost. Either way
                # the negotiation failed, which host.new_stream reports as StreamFailure.
                raise StreamFailure(
                    f"peer {peer_id} ended the stream before accepting {protocol_id}: {exc!r}"
                ) from exc
            if header != MULTISTREAM_ID or answer != protocol_id:
                raise StreamFailure(
                    f"peer {peer_id} does not speak {protocol_id} (answered {answer!r})"
                )
            stream.set_protocol(protocol_id)  # type: ignore[arg-type]
            if not early:
                await send_and_close_write(stream, frame)
            data = await read_frame(stream, max_frame, buf)
        resp = parse_strict(response_type, data)
    except BaseException:
        await reset_stream(stream)
        raise
    with trio.move_on_after(timeout):
        with contextlib.suppress(Exception):
            await stream.close()
    return resp
