"""Workarounds for py-libp2p 0.8.1, each measured here, each with a switch to turn it off.

None changes what a peer sees except fewer frames and control messages, so go-, js- and
py-libp2p peers interoperate as before (``tests/test_p2p_interop_js.py`` negotiates both ways).
Process-wide ones are installed by ``install()`` (idempotent); per-host ones by ``fit_host``.

==========================================  ==============================================
what py-libp2p 0.8.1 does                     what we do instead (switch to turn it off)
==========================================  ==============================================
a yamux WINDOW_UPDATE after every read        go-yamux credit: after half the window is read
                                              (``DSI_YAMUX_PER_READ_UPDATES=1``)
two ``recv`` calls per Noise frame            64 KiB per ``recv``, reads served from it
                                              (``DSI_TCP_UNBUFFERED=1``)
a nursery + task per notifee on every         nothing when every notifee ignores streams
stream open/close                             (``DSI_NOTIFY_EVERY_STREAM=1``)
IDONTWANT for every message, own included     only for received messages >= 1 KiB, as go
signed peer record rebuilt for, and checked   built once a second, checked once per peer a
on, every pubsub RPC                          minute (``DSI_PUBSUB_RECORD_EVERY_RPC=1``)
dialer: header, wait, protocol, wait          header and protocol in one frame
listener: header and echo in two frames       one frame when the dialer pipelined
                                              (``DSI_MULTISELECT_TWO_FRAMES=1``), sent
                                              with the answer when the request came too
                                              and the handler answers on close
                                              (``DSI_ECHO_AT_ONCE=1``)
SYN sent alone when a stream opens            with the stream's first frame
                                              (``DSI_SYN_AT_OPEN=1``)
ACK sent alone when a stream arrives          with the stream's first frame
                                              (``DSI_ACK_AT_ONCE=1``)
a debug line formatted for every frame        only when debug logging is on
every lock acquire yields to the scheduler,   an uncontended acquire of a stream's, a
even when nobody holds the lock               muxer's or a socket's lock goes straight on
                                              (``DSI_LOCKS_YIELD=1``)
last data and FIN: two encrypted frames       one (``NetStream.write_and_close[_write]``:
                                              two yamux frames, one Noise message;
                                              ``DSI_FIN_APART=1``)
==========================================  ==============================================
"""

from __future__ import annotations

import contextvars
import logging
import os
import struct
import time
from collections.abc import Sequence
from typing import Any

import trio
from libp2p.abc import IHost, IMultiselectCommunicator
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import _IdentifyNotifee
from libp2p.io.exceptions import ConnectionClosedError, IOException
from libp2p.io.trio import TrioTCPStream
from libp2p.network.stream.net_stream import NetStream, StreamState
from libp2p.network.swarm import Swarm
from libp2p.network.tag_store import TagStoreNotifee
from libp2p.protocol_muxer.exceptions import (
    MultiselectClientError,
    MultiselectCommunicatorError,
    MultiselectError,
    ProtocolNotSupportedError,
)
from libp2p.protocol_muxer.multiselect import Multiselect
from libp2p.protocol_muxer.multiselect_client import (
    DEFAULT_NEGOTIATE_TIMEOUT,
    MULTISELECT_PROTOCOL_ID,
    PROTOCOL_NOT_FOUND_MSG,
    MultiselectClient,
)
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.pubsub import gossipsub as gossipsub_module
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub_notifee import PubsubNotifee
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_SYN,
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    TYPE_DATA,
    TYPE_WINDOW_UPDATE,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
)
from libp2p.utils.varint import encode_delim

_yamux_log = yamux_module.logger

# py-libp2p's yamux sends a WINDOW_UPDATE after *every* read by default; gossipsub reads its
# varint prefixes one byte at a time, so each message cost dozens of extra frames (measured:
# 70 -> 28 frames and -25% CPU per gossip message). "0" restores go-yamux semantics (credit
# returned once half the window is consumed), which every yamux peer expects anyway.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")


async def _go_yamux_window_update(self: Any, *, bytes_read: int = 0) -> None:
    """go-yamux receive-window credit: return consumed bytes to the sender once they reach
    half the window, not after every read.

    py-libp2p 0.8.1 sends a WINDOW_UPDATE frame after *every* read that consumed bytes (its
    "partial slack" branch ignores every knob), and multistream-select and gossipsub read
    varint prefixes one byte at a time: a request/response stream cost ~6 extra encrypted
    frames and syscalls per side. Credit is the same protocol either way, so every yamux
    peer (go, js, rust, py) interoperates; only the batching changes.
    """
    total = 0
    async with self.window_lock:
        if bytes_read > 0:
            self._pending_recv_release += bytes_read
        if self._pending_recv_release >= max(self._grow_threshold(), 1):
            total = self._pending_recv_release
            self._pending_recv_release = 0
            self.recv_window += total
    if total > 0:
        await self.send_window_update(total, skip_lock=True)


_TCP_READ_SIZE = 65536


async def _buffered_tcp_read(self: Any, n: int | None = None) -> bytes:
    """``TrioTCPStream.read`` that receives up to 64 KiB per syscall and serves reads from it.

    py-libp2p 0.8.1 asks the socket for exactly what each layer wants next: the 2-byte Noise
    length, then the frame, so every encrypted frame cost two ``recv`` calls and two trips
    through trio's scheduler, and frames that arrived together were still read one by one.
    Same bytes, same order, same end-of-stream and error behaviour; only fewer syscalls.
    """
    async with self.read_lock:
        if n == 0:
            return b""
        pending: memoryview | None = getattr(self, "_dsi_pending", None)
        if not pending:
            try:
                data = await self.stream.receive_some(_TCP_READ_SIZE)
            except trio.BrokenResourceError as error:
                raise ConnectionClosedError(
                    f"TCP connection reset by remote peer: {error}", transport="tcp"
                ) from error
            except trio.ClosedResourceError:
                return b""  # closed locally: EOF, as the library does
            if n is None or len(data) <= n:
                return data
            pending = memoryview(data)
        take = len(pending) if n is None else min(n, len(pending))
        out = bytes(pending[:take])
        self._dsi_pending = pending[take:]
        return out


# Stream callbacks known to do nothing (py-libp2p 0.8.1's own notifees, and ours in node.py).
NOOP_STREAM_CALLBACKS: set[Any] = {
    TagStoreNotifee.opened_stream,
    TagStoreNotifee.closed_stream,
    _IdentifyNotifee.opened_stream,
    _IdentifyNotifee.closed_stream,
    PubsubNotifee.opened_stream,
    PubsubNotifee.closed_stream,
}
_library_notify = Swarm._notify


async def _notify_skipping_noops(self: Any, method: str, *args: Any) -> None:
    """``Swarm._notify`` without the fan-out when every callback is a known no-op.

    py-libp2p 0.8.1 opens a nursery and starts one task per notifee for *every* stream opened
    and closed, on both sides; all four notifees a dsi host has ignore stream events, so a
    request/response stream paid ~16 task spawns for nothing. Connection events, and any
    notifee that does handle streams, still go through the library's own fan-out.
    """
    if method in ("opened_stream", "closed_stream") and all(
        getattr(type(n), method, None) in NOOP_STREAM_CALLBACKS for n in self.notifees
    ):
        return
    await _library_notify(self, method, *args)


# Gossip: go-libp2p sends IDONTWANT only for received messages of at least 1 KiB.
IDONTWANT_MIN_BYTES = 1024
_idontwant_wanted: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dsi_idontwant_wanted", default=True
)


class DsiGossipSub(GossipSub):
    """GossipSub that sends IDONTWANT the way go-libp2p does.

    py-libp2p 0.8.1 sends an IDONTWANT control RPC to every v1.2 mesh peer for *every*
    message it publishes or forwards, its own included (telling the peers it is about to send
    the message to that it does not want it). go-libp2p sends one only for a message it
    received from someone else that is at least 1 KiB, where skipping a duplicate pays for
    the control message. Announcements are a few hundred bytes, so py-libp2p doubled the RPCs
    per announcement. IDONTWANT is an optional hint in gossipsub v1.2; nothing else changes.
    """

    async def publish(self, msg_forwarder: Any, pubsub_msg: Any) -> None:
        own = self.pubsub is not None and msg_forwarder == self.pubsub.my_id
        token = _idontwant_wanted.set(not own and pubsub_msg.ByteSize() >= IDONTWANT_MIN_BYTES)
        try:
            await super().publish(msg_forwarder, pubsub_msg)
        finally:
            _idontwant_wanted.reset(token)

    async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids: Any) -> None:
        if _idontwant_wanted.get():
            await super()._emit_idontwant_for_message(msg_id, topic_ids)


SIGNED_RECORD_REUSE = 1.0  # seconds the host's own signed peer record is reused as is
SIGNED_RECORD_RECHECK = 60.0  # seconds before an unchanged record from a peer is consumed again
_library_env_to_send = pubsub_module.env_to_send_in_RPC
_library_consume_record = pubsub_module.maybe_consume_signed_record


def _env_to_send_cached(host: Any) -> tuple[bytes, bool]:
    """py-libp2p attaches the host's signed peer record to every pubsub RPC and rebuilds the
    host's address list to check it each time; reuse it for ``SIGNED_RECORD_REUSE``."""
    now = time.monotonic()
    cached = getattr(host, "_dsi_sender_record", None)
    if cached is not None and now - cached[0] < SIGNED_RECORD_REUSE:
        return cached[1], False
    envelope, fresh = _library_env_to_send(host)
    host._dsi_sender_record = (now, envelope)
    return envelope, fresh


def _consume_record_once(msg: Any, host: Any, peer_id: Any) -> bool:
    """... and the receiver parses and signature-checks that record on every RPC. The same
    bytes from the same peer were checked and stored already: skip them (re-checked every
    ``SIGNED_RECORD_RECHECK`` s, which also refreshes the peerstore entry's TTL)."""
    if not msg.HasField("senderRecord"):
        return True
    seen: dict[Any, tuple[float, bytes]] | None = getattr(host, "_dsi_peer_records", None)
    if seen is None:
        seen = host._dsi_peer_records = {}
    now = time.monotonic()
    last = seen.get(peer_id)
    if last is not None and last[1] == msg.senderRecord and now - last[0] < SIGNED_RECORD_RECHECK:
        return True
    ok = _library_consume_record(msg, host, peer_id)
    if ok:
        if len(seen) >= 4096:  # bounded: forget everyone, re-check on their next RPC
            seen.clear()
        seen[peer_id] = (now, msg.senderRecord)
    return bool(ok)


class PipelinedMultiselectClient(MultiselectClient):
    """multistream-select that sends the header and the one protocol id together.

    py-libp2p 0.8.1 writes ``/multistream/1.0.0``, waits for the echo, then writes the
    protocol id and waits again: two round trips and two encrypted frames before a stream
    carries a byte. go-libp2p and js-libp2p send both messages at once (the spec allows it:
    the listener reads them in order), which saves one round trip and one frame per stream.
    The bytes on the wire are the same two varint-delimited messages. Several protocol
    choices (or a communicator of another kind) go through the library's own negotiation.
    """

    async def select_one_of(
        self,
        protocols: Sequence[TProtocol],
        communicator: IMultiselectCommunicator,
        negotiate_timeout: int = DEFAULT_NEGOTIATE_TIMEOUT,
    ) -> TProtocol:
        if len(protocols) != 1 or not isinstance(communicator, MultiselectCommunicator):
            return await super().select_one_of(protocols, communicator, negotiate_timeout)
        protocol = protocols[0]
        with trio.move_on_after(negotiate_timeout):
            try:
                await communicator.read_writer.write(
                    encode_delim(MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(protocol.encode())
                )
            except (IOException, AssertionError, ValueError) as exc:
                raise MultiselectClientError(f"protocol write failed: {exc}") from exc
            try:
                header = await communicator.read()
                response = await communicator.read()
            except MultiselectCommunicatorError as exc:
                raise MultiselectClientError(f"protocol read failed: {exc}") from exc
            if header != MULTISELECT_PROTOCOL_ID:
                raise MultiselectClientError(f"multiselect header mismatch: got {header!r}")
            if response == protocol:
                return protocol
            if response == PROTOCOL_NOT_FOUND_MSG:
                raise ProtocolNotSupportedError(f"protocol not supported: {protocol}")
            raise MultiselectClientError(f"unexpected answer {response!r} to {protocol}")
        raise MultiselectClientError(f"negotiating {protocol} timed out after {negotiate_timeout}s")


def _stream_buffer(stream: Any) -> bytearray | None:
    """What the yamux stream under ``stream`` has received and nobody has read yet."""
    muxed = getattr(stream, "muxed_stream", None)
    buffers = getattr(getattr(muxed, "conn", None), "stream_buffers", None)
    return buffers.get(getattr(muxed, "stream_id", None)) if isinstance(buffers, dict) else None


def _buffered_bytes(stream: Any) -> int:
    return len(_stream_buffer(stream) or b"")


_MAX_LINE = 1024  # longer multistream lines are left to the library's reader


async def _read_buffered_lines(stream: Any, count: int) -> list[str] | None:
    """The next ``count`` multistream-select lines, when all are already buffered in the
    yamux stream under ``stream``: parsed in place and consumed with one read. None (and
    nothing consumed) otherwise.

    The library reads each line's varint a byte at a time, and every read passes through
    the stream's locks, each a trip through trio's scheduler: under load each trip waits
    behind every other ready task.
    """
    buf = _stream_buffer(stream)
    if not buf:
        return None
    lines: list[str] = []
    pos = 0
    for _ in range(count):
        length, shift, start = 0, 0, pos
        while True:  # unsigned varint, at most two bytes for lines up to _MAX_LINE
            if pos >= len(buf) or pos - start >= 2:
                return None
            byte = buf[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if not 0 < length <= _MAX_LINE or pos + length > len(buf) or buf[pos + length - 1] != 10:
            return None
        lines.append(bytes(buf[pos : pos + length - 1]).decode())
        pos += length
    if len(await stream.read(pos)) != pos:  # they are buffered: one read takes them all
        raise MultiselectError("stream buffer changed while reading the negotiation")
    return lines


class EchoOnceMultiselect(Multiselect):
    """The listener side of multistream-select, answering a pipelined dialer in one frame.

    py-libp2p 0.8.1 writes its ``/multistream/1.0.0`` line before reading anything, then the
    protocol echo: two encrypted frames per inbound stream. When the dialer sent its header
    and protocol id together (go, js and dsi dialers do), both are already buffered once the
    header is read, so the header and the protocol echo go out in one frame. A dialer that
    waits for our header first finds nothing buffered and gets it at once, as before; "ls",
    "na" and unknown protocols take the library's path. Same bytes on the wire either way.

    When the request itself is buffered too and the protocol's handler declares that it
    answers with ``write_and_close`` (or resets) -- the ``ANSWERS_ON_CLOSE`` attribute, set
    by dsi's request/response servers -- the echo is held back and goes out in front of the
    answer: that dialer is not waiting for it, so the stream costs one frame less.
    """

    def __init__(
        self, default_handlers: dict[TProtocol | None, Any] | None = None, *,
        echo_with_answer: bool = True,
    ) -> None:
        super().__init__(default_handlers)
        self.echo_with_answer = echo_with_answer

    async def negotiate(
        self,
        communicator: IMultiselectCommunicator,
        negotiate_timeout: int = DEFAULT_NEGOTIATE_TIMEOUT,
    ) -> tuple[TProtocol | None, Any]:
        if not isinstance(communicator, MultiselectCommunicator):
            return await super().negotiate(communicator, negotiate_timeout)
        try:
            with trio.fail_after(negotiate_timeout):
                try:
                    lines = await _read_buffered_lines(communicator.read_writer, 2)
                    header = lines[0] if lines else await communicator.read()
                    if header != MULTISELECT_PROTOCOL_ID:
                        raise MultiselectError(f"multiselect header mismatch: got {header!r}")
                    if lines or _buffered_bytes(communicator.read_writer):
                        command = lines[1] if lines else await communicator.read()
                        protocol = TProtocol(command) if command else None
                        if command != "ls" and protocol in self.handlers:
                            handler = self.handlers[protocol]
                            echo = (encode_delim(MULTISELECT_PROTOCOL_ID.encode())
                                    + encode_delim(command.encode()))
                            stream = communicator.read_writer
                            if (self.echo_with_answer
                                    and getattr(handler, ANSWERS_ON_CLOSE, False)
                                    and _buffered_bytes(stream)):
                                # The dialer sent its request without waiting for us, and
                                # the handler's answer ends the stream: the echo goes with
                                # the answer (write_and_close), one frame instead of two.
                                stream.__dict__[_UNSENT] = echo
                            else:
                                await stream.write(echo)
                            return protocol, handler
                        await communicator.write(MULTISELECT_PROTOCOL_ID)
                        return await self._after_handshake(communicator, command)
                    await communicator.write(MULTISELECT_PROTOCOL_ID)
                    return await self._after_handshake(communicator, None)
                except MultiselectCommunicatorError as error:
                    raise MultiselectError() from error
                except (IOException, AssertionError, ValueError) as error:
                    raise MultiselectError() from error
        except trio.TooSlowError:
            raise MultiselectError("handshake read timeout") from None

    async def _after_handshake(
        self, communicator: MultiselectCommunicator, command: str | None
    ) -> tuple[TProtocol | None, Any]:
        """The library's command loop, starting with an already read ``command``."""
        while True:
            if command is None:
                command = await communicator.read()
            if command == "ls":
                listed = [p for p in self.handlers if p is not None]
                await communicator.write("\n".join(listed) + "\n")
            else:
                protocol = TProtocol(command) if command else None
                if protocol in self.handlers:
                    await communicator.write(command)
                    return protocol, self.handlers[protocol]
                await communicator.write(PROTOCOL_NOT_FOUND_MSG)
            command = None


# Yamux attributes: ids of streams whose SYN (opened by us) or ACK (opened by the peer) goes
# out in front of the stream's first frame.
_SYN_PENDING = "_dsi_syn_pending"
_ACK_PENDING = "_dsi_ack_pending"
_LIBRARY_WRITE_FRAME = Yamux._write_frame
_HEADER = struct.Struct(YAMUX_HEADER_FORMAT)
_PENDING_PRUNE_AT = 64
_defer_ack = True  # set by install()
_locks_yield = False  # set by install()


async def _write_frame(self: Yamux, data: bytes) -> None:
    """``Yamux._write_frame`` that sends a stream's SYN or ACK with its first frame.

    * SYN: see ``_open_stream_lazy_syn``.
    * ACK: py-libp2p acknowledges a new inbound stream with a frame of its own the moment
      the SYN arrives; the stream's first frame follows a moment later anyway, because the
      listener's multistream-select always writes (header, echo, "na") or resets. Held
      here and put in front of that frame, the peer reads the same yamux frames, in the
      same order, from one Noise message instead of two (``DSI_ACK_AT_ONCE=1``: at once).

    Also: the library formats a debug line (header unpacked, flag names, an f-string) for
    every frame even when debug logging is off; here only when it is on.
    """
    if len(data) == HEADER_SIZE and _defer_ack:
        _, typ, flags, sid, length = _HEADER.unpack(data)
        if typ == TYPE_WINDOW_UPDATE and flags == FLAG_ACK and length == 0:
            pending = self.__dict__.setdefault(_ACK_PENDING, set())
            if len(pending) >= _PENDING_PRUNE_AT:  # streams the peer reset before we wrote
                pending.intersection_update(self.streams)
            pending.add(sid)
            return
    taken: list[tuple[set[int], int]] = []
    for attribute, flag in ((_SYN_PENDING, FLAG_SYN), (_ACK_PENDING, FLAG_ACK)):
        pending = self.__dict__.get(attribute)
        if pending and len(data) >= HEADER_SIZE:
            sid = int.from_bytes(data[4:8], "big")
            if sid in pending:
                pending.discard(sid)
                taken.append((pending, sid))
                data = _HEADER.pack(0, TYPE_WINDOW_UPDATE, flag, sid, 0) + data
    try:
        if _yamux_log.isEnabledFor(logging.DEBUG):
            await _LIBRARY_WRITE_FRAME(self, data)
            return
        async with self._write_lock:
            await self.secured_conn.write(data)
    except BaseException:
        for pending, sid in taken:  # not sent (e.g. cancelled waiting for the lock)
            pending.add(sid)
        raise
    if _locks_yield:
        # The library yields once more after every frame; the socket send above already
        # was a schedule point (trio's send_all always is), so only with DSI_LOCKS_YIELD=1.
        await trio.lowlevel.checkpoint()


async def _open_stream_lazy_syn(self: Yamux) -> YamuxStream:
    """``Yamux.open_stream`` whose SYN goes out with the stream's first frame.

    py-libp2p sends the SYN at once, as its own encrypted frame, although the dialer's
    first action on a libp2p stream is always a write (multistream-select) a moment later.
    The peer reads the same two yamux frames, in the same order, from one Noise message
    (a stream that is reset or closed before any write sends SYN with its RST or FIN).
    """
    await self.stream_backlog_semaphore.acquire()
    async with self.streams_lock:
        if self.event_shutting_down.is_set():
            self.stream_backlog_semaphore.release()
            raise MuxedStreamError("Connection is shutting down")
        stream_id = self.next_stream_id
        self.next_stream_id += 2
        stream = YamuxStream(stream_id, self, True)
        stream._owns_backlog_slot = True
        self.streams[stream_id] = stream
        self.stream_buffers[stream_id] = bytearray()
        self.stream_events[stream_id] = trio.Event()
        pending = self.__dict__.setdefault(_SYN_PENDING, set())
        if len(pending) >= _PENDING_PRUNE_AT:  # streams dropped without a write
            pending.intersection_update(self.streams)
        pending.add(stream_id)
    return stream


# A stream handler with this attribute set ends every stream it answers with
# ``write_and_close`` (or a reset); see EchoOnceMultiselect.
ANSWERS_ON_CLOSE = "dsi_answers_on_close"
# NetStream attribute: negotiation bytes held back to go out with the answer.
_UNSENT = "_dsi_unsent"


async def _yamux_write_and_close(stream: YamuxStream, data: bytes) -> bool:
    """``write(data)`` then ``close()`` with both yamux frames in one secured write.

    False, having sent nothing, when that is not a plain case (too big for one frame, not
    enough send window, already closed): the caller then writes and closes as usual.
    The state changes are those of ``YamuxStream.write`` and ``YamuxStream.close``.
    """
    if len(data) > MAX_MESSAGE_SIZE - HEADER_SIZE:
        return False
    async with stream.close_lock:
        if stream.send_closed:
            return False
        async with stream.rw_lock.write_lock():
            async with stream.window_lock:
                if stream.closed or stream.send_window < len(data):
                    return False
                stream.send_window -= len(data)
            sid = stream.stream_id
            frames = (
                _HEADER.pack(0, TYPE_DATA, 0, sid, len(data))
                + data
                + _HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_FIN, sid, 0)
            )
            try:
                await stream.conn._write_frame(frames)
            finally:
                stream.send_closed = True
        stream.closed = stream.recv_closed
        await stream.conn._finalize_stream(stream, fully_closed=stream.recv_closed)
    return True


async def _in_one_message(self: NetStream, data: bytes, states: tuple[StreamState, ...]) -> bool:
    """``data`` and the FIN in one Noise message when the stream is yamux and in ``states``;
    False, having sent nothing, otherwise."""
    async with self._state_lock:
        plain = self._state in states
    muxed = self.muxed_stream
    return plain and isinstance(muxed, YamuxStream) and await _yamux_write_and_close(muxed, data)


async def _net_stream_write_and_close(self: NetStream, data: bytes) -> None:
    """Send the last bytes of a stream and close it (``write`` then ``close``).

    py-libp2p sends the data and the FIN as two encrypted frames, each its own encryption,
    ``send`` and trip through the scheduler. Here, over yamux, both frames go in one Noise
    message: the peer's yamux reads the same frames in the same order (it parses a byte
    stream, whatever the message boundaries). Another muxer, or an unusual state, takes
    the library's two steps.
    """
    data = self.__dict__.pop(_UNSENT, b"") + data
    if await _in_one_message(self, data, (StreamState.OPEN, StreamState.CLOSE_READ)):
        await self.set_state(StreamState.CLOSE_BOTH)
        await self.remove()
        return
    await self.write(data)
    await self.close()


async def _net_stream_write_and_close_write(self: NetStream, data: bytes) -> None:
    """``write`` then ``close_write``: the request of a request/response stream, whose
    reply is still to be read. Over yamux, in one Noise message (see above)."""
    data = self.__dict__.pop(_UNSENT, b"") + data
    if await _in_one_message(self, data, (StreamState.OPEN,)):
        async with self._state_lock:  # what NetStream.close_write does after the FIN
            if self._state == StreamState.OPEN:
                self._state = StreamState.CLOSE_WRITE
            elif self._state == StreamState.CLOSE_READ:
                self._state = StreamState.CLOSE_BOTH
                await self.remove()
        return
    await self.write(data)
    await self.close_write()


async def _net_stream_write_then_close(self: NetStream, data: bytes) -> None:
    """The library's way, for comparison (``DSI_FIN_APART=1``)."""
    await self.write(self.__dict__.pop(_UNSENT, b"") + data)
    await self.close()


async def _net_stream_write_then_close_write(self: NetStream, data: bytes) -> None:
    """The library's way, for comparison (``DSI_FIN_APART=1``)."""
    await self.write(self.__dict__.pop(_UNSENT, b"") + data)
    await self.close_write()


class _FreeWithoutYield:
    """Wraps a trio lock or semaphore (``_inner``) so that taking it when it is free does
    not yield to the scheduler; see ``HotPathLock``. A wrapper, not a subclass: trio's lock
    classes are final."""

    __slots__ = ("_inner",)
    _inner: Any

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # raises when cancelled; never yields
        try:
            self._inner.acquire_nowait()
        except trio.WouldBlock:
            await self._inner.acquire()  # contended: the primitive's own fair queue

    def acquire_nowait(self) -> None:
        self._inner.acquire_nowait()

    def release(self) -> None:
        self._inner.release()

    def statistics(self) -> Any:
        return self._inner.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._inner.release()


class HotPathLock(_FreeWithoutYield):
    """A ``trio.Lock`` whose uncontended ``acquire`` does not yield to the scheduler.

    trio makes every ``acquire`` a schedule point: even when nobody holds the lock, the task
    goes to the back of the run queue and waits for every other ready task to take a step.
    py-libp2p takes about twenty such locks per stream (stream state, muxer table, window,
    socket), so under load an exchange spent most of its latency queueing behind itself:
    these yields were 54% of the owner's task steps in ``scripts/bench_p2p.py``. Here an
    uncontended acquire only checks for cancellation (a cancelled task still gets
    ``Cancelled``); a contended one waits in the lock's fair queue exactly as before. Every
    path that holds one of these locks reaches a real schedule point soon after (a socket
    send or receive, a channel, an event), so no loop can run without yielding.
    """

    __slots__ = ()

    def __init__(self) -> None:
        self._inner = trio.Lock()

    def locked(self) -> bool:
        return bool(self._inner.locked())


class HotPathSemaphore(_FreeWithoutYield):
    """``trio.Semaphore`` with ``HotPathLock``'s acquire (no yield when a slot is free)."""

    __slots__ = ()

    def __init__(self, initial_value: int, *, max_value: int | None = None) -> None:
        self._inner = trio.Semaphore(initial_value, max_value=max_value)

    @property
    def value(self) -> int:
        return int(self._inner.value)

    @property
    def max_value(self) -> int | None:
        max_value: int | None = self._inner.max_value
        return max_value


class HotPathSendChannel:
    """A trio memory send channel whose ``send`` does not yield while the buffer has room
    (like ``HotPathLock``); everything else goes to the channel itself. Yamux's reader hands
    every new inbound stream over one of these, a yield per stream otherwise."""

    __slots__ = ("_channel",)

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    async def send(self, value: Any) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._channel.send_nowait(value)
        except trio.WouldBlock:
            await self._channel.send(value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


def _hot_path(obj: Any, names: Sequence[str]) -> None:
    """Swap ``obj``'s trio locks and semaphores named ``names`` (still unused: called right
    after the constructor) for the hot-path kind."""
    for name in names:
        current = getattr(obj, name, None)
        if type(current) is trio.Lock:
            setattr(obj, name, HotPathLock())
        elif type(current) is trio.MemorySendChannel:
            setattr(obj, name, HotPathSendChannel(current))
        elif type(current) is trio.Semaphore:
            setattr(obj, name, HotPathSemaphore(current.value, max_value=current.max_value))


# Constructors whose locks (and channel) every stream takes: (class, attributes, attributes
# holding a py-libp2p ReadWriteLock, whose own lock and semaphore are swapped too).
_HOT_PATH_LOCKS: tuple[tuple[type, tuple[str, ...], tuple[str, ...]], ...] = (
    (TrioTCPStream, ("read_lock", "write_lock"), ()),
    (NetStream, ("_state_lock",), ()),
    (Yamux, ("streams_lock", "_write_lock", "stream_backlog_semaphore",
             "new_stream_send_channel"), ()),
    (YamuxStream, ("window_lock", "close_lock"), ("rw_lock",)),
)


def _with_hot_path_locks(cls: type, names: tuple[str, ...], rw_locks: tuple[str, ...]) -> None:
    init = cls.__init__
    if getattr(init, "_dsi_hot_path", False):
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        _hot_path(self, names)
        for name in rw_locks:
            rw = getattr(self, name, None)
            if rw is not None:
                _hot_path(rw, ("_readers_lock", "_writer_lock"))

    __init__._dsi_hot_path = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]


def _set_resource_manager_hot(self: Swarm, *args: Any, **kwargs: Any) -> None:
    _LIBRARY_SET_RESOURCE_MANAGER(self, *args, **kwargs)
    _hot_path(self, ("_stream_semaphore",))


_LIBRARY_SET_RESOURCE_MANAGER = Swarm.set_resource_manager


# The process-wide workarounds: (switch that turns it off, py-libp2p object, attribute, ours).
_REPLACEMENTS: tuple[tuple[str, Any, str, Any], ...] = (
    ("DSI_YAMUX_PER_READ_UPDATES", YamuxStream, "_auto_tune_and_send_window_update",
     _go_yamux_window_update),
    ("DSI_TCP_UNBUFFERED", TrioTCPStream, "read", _buffered_tcp_read),
    ("DSI_SYN_AT_OPEN", Yamux, "open_stream", _open_stream_lazy_syn),
    ("DSI_NOTIFY_EVERY_STREAM", Swarm, "_notify", _notify_skipping_noops),
    ("DSI_PUBSUB_RECORD_EVERY_RPC", pubsub_module, "env_to_send_in_RPC", _env_to_send_cached),
    ("DSI_PUBSUB_RECORD_EVERY_RPC", gossipsub_module, "env_to_send_in_RPC", _env_to_send_cached),
    ("DSI_PUBSUB_RECORD_EVERY_RPC", pubsub_module, "maybe_consume_signed_record",
     _consume_record_once),
    ("DSI_PUBSUB_RECORD_EVERY_RPC", gossipsub_module, "maybe_consume_signed_record",
     _consume_record_once),
)


def install() -> None:
    """The process-wide workarounds (class and module attributes of py-libp2p); idempotent.
    A switch set to ``1`` leaves the library's own behaviour in place, for comparison.

    Also gives ``NetStream`` ``write_and_close(data)`` and ``write_and_close_write(data)``,
    which dsi's protocols use for the last bytes they send on a stream."""
    for switch, owner, attribute, replacement in _REPLACEMENTS:
        if os.environ.get(switch) != "1":
            setattr(owner, attribute, replacement)
    global _defer_ack, _locks_yield
    _locks_yield = os.environ.get("DSI_LOCKS_YIELD") == "1"
    if not _locks_yield:
        for cls, names, rw_locks in _HOT_PATH_LOCKS:
            _with_hot_path_locks(cls, names, rw_locks)
        Swarm.set_resource_manager = _set_resource_manager_hot  # type: ignore[method-assign]
    _defer_ack = os.environ.get("DSI_ACK_AT_ONCE") != "1"
    Yamux._write_frame = _write_frame  # type: ignore[method-assign]
    apart = os.environ.get("DSI_FIN_APART") == "1"
    NetStream.write_and_close = (  # type: ignore[attr-defined]
        _net_stream_write_then_close if apart else _net_stream_write_and_close
    )
    NetStream.write_and_close_write = (  # type: ignore[attr-defined]
        _net_stream_write_then_close_write if apart else _net_stream_write_and_close_write
    )


def fit_host(host: IHost) -> None:
    """The per-host workarounds: multistream-select on both sides of our streams."""
    host.multiselect_client = PipelinedMultiselectClient()  # type: ignore[attr-defined]
    if os.environ.get("DSI_MULTISELECT_TWO_FRAMES") != "1":
        host.multiselect = EchoOnceMultiselect(  # type: ignore[attr-defined]
            dict(host.multiselect.handlers),  # type: ignore[attr-defined]
            echo_with_answer=os.environ.get("DSI_ECHO_AT_ONCE") != "1",
        )
