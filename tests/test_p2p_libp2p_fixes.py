"""The py-libp2p 0.8.1 workarounds (node.p2p._libp2p_fixes) keep the wire behaviour intact.

Real hosts on 127.0.0.1 and a real socket pair; the only instrumentation is a counter around
the library's own raw-connection write, to check the frame savings the module claims.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.abc import INotifee
from libp2p.host.exceptions import StreamFailure
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.stream_muxer.yamux.yamux import FLAG_RST, FLAG_SYN

from node.p2p import _libp2p_fixes
from protocols.task import PROTOCOL_ID as TASK_PROTOCOL
from tests.p2p_helpers import start_nodes
from tests.p2p_peer import ECHO_PROTOCOL, echo_handler, echo_once


@contextlib.contextmanager
def encrypted_frames() -> Iterator[list[int]]:
    """Counts py-libp2p's raw-connection writes (one per encrypted frame) while it is open."""
    count = [0]
    library_write = RawConnection.write

    async def counting_write(self: RawConnection, data: bytes) -> None:
        count[0] += 1
        await library_write(self, data)

    RawConnection.write = counting_write  # type: ignore[method-assign]
    try:
        yield count
    finally:
        RawConnection.write = library_write  # type: ignore[method-assign]


class StreamRecorder(INotifee):
    """Appends "opened"/"closed" to ``seen`` for each stream event of a network."""

    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    async def opened_stream(self, network: Any, stream: Any) -> None:
        self.seen.append("opened")

    async def closed_stream(self, network: Any, stream: Any) -> None:
        self.seen.append("closed")

    async def connected(self, network: Any, conn: Any) -> None:
        return None

    async def disconnected(self, network: Any, conn: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


async def test_listener_serves_plain_and_pipelined_dialers(tmp_path: Path) -> None:
    """The one-frame listener must not wait for a protocol id a plain dialer has not sent."""
    async with start_nodes(tmp_path, [[], [0]]) as (a, b):
        a.host.set_stream_handler(ECHO_PROTOCOL, echo_handler)
        assert isinstance(a.host.multiselect, _libp2p_fixes.EchoOnceMultiselect)
        peer = a.host.get_id()
        for client in (MultiselectClient(), _libp2p_fixes.PipelinedMultiselectClient()):
            b.host.multiselect_client = client
            assert await echo_once(b, peer, b"hello " + type(client).__name__.encode()) == (
                b"hello " + type(client).__name__.encode()
            )
            with trio.fail_after(10), pytest.raises(StreamFailure):
                await b.host.new_stream(peer, ["/dsi-test/nobody-speaks-this/1.0.0"])
        # and the listener keeps serving after the refusals
        assert await echo_once(b, peer, b"still here") == b"still here"


async def test_request_stream_frames(tmp_path: Path) -> None:
    """An echo stream (open, negotiate, request, response, close both ways) is 6 encrypted
    frames in all (9 with py-libp2p 0.8.1's own listener negotiation and stream opening)."""
    async with start_nodes(tmp_path, [[], [0]]) as (a, b):
        a.host.set_stream_handler(ECHO_PROTOCOL, echo_handler)
        peer = a.host.get_id()
        await echo_once(b, peer, b"warm-up")
        await trio.sleep(0.3)  # let the gossip mesh settle
        with encrypted_frames() as frames:
            for i in range(20):
                assert await echo_once(b, peer, b"x%d" % i) == b"x%d" % i
            await trio.sleep(0.2)
        assert frames[0] / 20 <= 6.5, f"{frames[0] / 20} frames per echo stream"


async def test_exchange_frames_and_no_leftover_streams(tmp_path: Path) -> None:
    """A dsi request/response (pipelined negotiation, request sent with the half-close,
    protocol echo and answer sent with the close, SYN and ACK with the first frame each way)
    is 2 encrypted frames, one each way (8 with py-libp2p's own ways), where the echo stream
    above is 6; and both sides drop the stream afterwards (nothing accumulates in either
    muxer)."""
    async with start_nodes(tmp_path, [[], [0]]) as (a, b):
        peer = a.host.get_id()
        handler = a.host.multiselect.handlers[TASK_PROTOCOL]
        assert getattr(handler, _libp2p_fixes.ANSWERS_ON_CLOSE) is True
        assert await b.client.list_offers(peer, []) == []  # warm-up: connection and mesh
        await trio.sleep(0.3)

        def open_streams() -> list[set[int]]:
            return [set(conn.muxed_conn.streams) for node in (a, b)
                    for conn in node.host.get_network().get_connections()]

        before = open_streams()  # gossipsub's long-lived streams
        with encrypted_frames() as frames:
            for _ in range(20):
                assert await b.client.list_offers(peer, ["GPU"]) == []
            await trio.sleep(0.2)
        assert frames[0] / 20 <= 2.5, f"{frames[0] / 20} frames per dsi exchange"
        assert open_streams() == before, "exchange streams left behind in a muxer"


async def test_write_and_close_falls_back_beyond_one_frame(tmp_path: Path) -> None:
    """A last write bigger than one yamux frame takes the library's two steps, same bytes."""
    payload = bytes(range(256)) * 1024  # 256 KiB: four frames' worth

    async def sink(stream: Any) -> None:
        with trio.fail_after(10):
            data = b""
            while len(data) < len(payload):
                data += await stream.read(len(payload) - len(data))
            await stream.write_and_close(len(data).to_bytes(8, "big") + data[-4:])

    async with start_nodes(tmp_path, [[], [0]]) as (a, b):
        a.host.set_stream_handler("/dsi-test/sink/1.0.0", sink)
        with trio.fail_after(10):
            stream = await b.host.new_stream(a.host.get_id(), ["/dsi-test/sink/1.0.0"])
            await stream.write_and_close_write(payload)
            answer = b""
            while len(answer) < 12:
                answer += await stream.read(12 - len(answer))
            await stream.close()
        assert answer == len(payload).to_bytes(8, "big") + payload[-4:]


async def test_streams_closed_or_reset_before_any_write(tmp_path: Path) -> None:
    """A stream's SYN waits for its first frame; a stream reset or closed before writing
    anything still reaches the peer as SYN+RST or SYN+FIN, and the connection goes on."""
    async with start_nodes(tmp_path, [[], [0]]) as (a, b):
        a.host.set_stream_handler(ECHO_PROTOCOL, echo_handler)
        peer = a.host.get_id()
        assert await echo_once(b, peer, b"before") == b"before"
        await trio.sleep(0.3)
        ours = b.host.get_network().get_connections(peer)[0].muxed_conn
        theirs = a.host.get_network().get_connections(b.host.get_id())[0].muxed_conn
        baseline = set(theirs.streams)  # gossipsub's long-lived streams
        seen: list[str] = []
        a.host.get_network().register_notifee(StreamRecorder(seen))
        with trio.fail_after(10):
            for end in ("reset", "close"):
                muxed = await ours.open_stream()
                await (muxed.reset() if end == "reset" else muxed.close())
            assert await echo_once(b, peer, b"after") == b"after"
            while seen.count("opened") < 3 or set(theirs.streams) != baseline:
                await trio.sleep(0.02)  # the peer saw all three open, and forgot them
        assert not getattr(ours, "_dsi_syn_pending", set())


async def test_a_cancelled_first_write_keeps_the_syn_for_the_next_frame(tmp_path: Path) -> None:
    async with start_nodes(tmp_path, [[], [0]]) as (a, b):
        a.host.set_stream_handler(ECHO_PROTOCOL, echo_handler)
        peer = a.host.get_id()
        assert await echo_once(b, peer, b"before") == b"before"
        ours = b.host.get_network().get_connections(peer)[0].muxed_conn
        seen: list[str] = []
        a.host.get_network().register_notifee(StreamRecorder(seen))
        with trio.fail_after(10):
            muxed = await ours.open_stream()

            async def busy_connection(task_status: Any) -> None:
                async with ours._write_lock:  # another task is writing something long
                    task_status.started()
                    await trio.sleep(0.2)

            async with trio.open_nursery() as nursery:
                await nursery.start(busy_connection)
                with trio.move_on_after(0.05):
                    await muxed.write(b"\x13/multistream/1.0.0\n")
            assert muxed.stream_id in ours._dsi_syn_pending  # not sent, so still to send
            await muxed.reset()  # SYN+RST: the peer sees the stream open and end
            while seen.count("opened") < 1:
                await trio.sleep(0.02)
            assert await echo_once(b, peer, b"after") == b"after"


async def test_held_acks_of_streams_reset_early_do_not_pile_up(tmp_path: Path) -> None:
    """A peer that resets its streams before we answered leaves ACKs we never sent; they are
    pruned, and streams opened afterwards are acknowledged and served as usual."""
    async with start_nodes(tmp_path, [[], [0]]) as (a, b):
        a.host.set_stream_handler(ECHO_PROTOCOL, echo_handler)
        peer = a.host.get_id()
        assert await echo_once(b, peer, b"before") == b"before"
        ours = b.host.get_network().get_connections(peer)[0].muxed_conn
        theirs = a.host.get_network().get_connections(b.host.get_id())[0].muxed_conn
        with trio.fail_after(20):
            for _ in range(150):  # a bare SYN (as py-libp2p sends it), then a reset
                sid = ours.next_stream_id
                ours.next_stream_id += 2
                for flag in (FLAG_SYN, FLAG_RST):
                    await ours.secured_conn.write(
                        struct.pack("!BBHII", 0, 1, flag, sid, 0)  # WINDOW_UPDATE
                    )
                await trio.sleep(0.005)
            await trio.sleep(0.3)
            assert await echo_once(b, peer, b"after") == b"after"
        # At most a prune interval's worth of ids of streams the muxer itself has dropped.
        held = getattr(theirs, "_dsi_ack_pending", set())
        assert len(held - set(theirs.streams)) < 64


async def test_buffered_tcp_read_keeps_bytes_order_and_eof() -> None:
    _libp2p_fixes.install()
    left, right = trio.socket.socketpair()
    reader = TrioTCPStream(trio.SocketStream(left))
    writer = trio.SocketStream(right)
    with trio.fail_after(5):
        await writer.send_all(b"abcdefghij")
        await trio.sleep(0.05)  # all ten bytes arrive in one recv
        assert await reader.read(3) == b"abc"
        assert await reader.read(2) == b"de"
        await writer.send_all(b"klm")
        assert await reader.read(100) == b"fghij"  # what was buffered first
        assert await reader.read() == b"klm"
        assert await reader.read(0) == b""
        await writer.aclose()
        assert await reader.read(4) == b""  # end of stream
    await reader.close()


async def test_notifee_that_handles_streams_is_still_told(tmp_path: Path) -> None:
    """Skipping the fan-out is only for notifees known to ignore stream events."""
    seen: list[str] = []
    async with start_nodes(tmp_path, [[], [0]]) as (a, b):
        a.host.set_stream_handler(ECHO_PROTOCOL, echo_handler)
        a.host.get_network().register_notifee(StreamRecorder(seen))
        assert await echo_once(b, a.host.get_id(), b"ping") == b"ping"
        with trio.fail_after(5):
            while "opened" not in seen:
                await trio.sleep(0.01)


async def _check_hot_path_lock(lock: Any, is_free: Any) -> None:
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)  # ready, but runs only when this task yields
        async with lock:
            assert ran == []
        await lock.acquire()
        assert ran == []
        lock.release()
    assert ran == ["other"]

    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await lock.acquire()
    assert is_free()

    order: list[int] = []

    async def waiter(k: int) -> None:
        async with lock:
            order.append(k)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await lock.acquire()
            for k in range(3):
                nursery.start_soon(waiter, k)
                await trio.testing.wait_all_tasks_blocked()
            lock.release()
    assert order == [0, 1, 2]
    assert is_free()


async def test_hot_path_lock_skips_only_the_needless_yield() -> None:
    """Uncontended: no trip through the scheduler (another ready task does not run), but a
    cancelled caller still gets Cancelled. Contended: waits its turn, in FIFO order."""
    lock = _libp2p_fixes.HotPathLock()
    await _check_hot_path_lock(lock, lambda: not lock.locked())
    semaphore = _libp2p_fixes.HotPathSemaphore(1)
    await _check_hot_path_lock(semaphore, lambda: semaphore.value == 1)


async def test_streams_and_connections_use_hot_path_locks(tmp_path: Path) -> None:
    """The locks every exchange takes are the non-yielding kind, and exchanges still work
    with many streams in flight at once (contended locks queue as before)."""
    async with start_nodes(tmp_path, [[], [0]]) as (a, b):
        a.host.set_stream_handler(ECHO_PROTOCOL, echo_handler)
        peer = a.host.get_id()
        with trio.fail_after(10):
            stream = await b.host.new_stream(peer, [ECHO_PROTOCOL])
            muxed = stream.muxed_stream
            hot = _libp2p_fixes.HotPathLock
            assert type(stream._state_lock) is hot
            assert type(muxed.window_lock) is hot and type(muxed.close_lock) is hot
            assert type(muxed.muxed_conn.streams_lock) is hot
            assert type(muxed.muxed_conn._write_lock) is hot
            channel = muxed.muxed_conn.new_stream_send_channel
            assert type(channel) is _libp2p_fixes.HotPathSendChannel
            await stream.write(b"x")
            assert await stream.read(1) == b"x"
            await stream.close()

            answers: list[bytes] = []

            async def one(k: int) -> None:
                answers.append(await echo_once(b, peer, b"%d" % k))

            async with trio.open_nursery() as nursery:
                for k in range(40):
                    nursery.start_soon(one, k)
        assert sorted(answers) == sorted(b"%d" % k for k in range(40))


def test_libp2p_errors_reach_the_applications_handlers(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-libp2p detaches its loggers on import, so its errors reached stderr bare; after
    quiet_libp2p_logging they go through the handlers on the root logger (as the daemon's),
    while its chatter - even from modules that set their own INFO level - and dial failures,
    which dsi reports itself, stay out."""
    import logging

    from node.p2p._host import _ToApplicationHandlers, quiet_libp2p_logging

    monkeypatch.delenv("LIBP2P_DEBUG", raising=False)
    lib = logging.getLogger("libp2p")
    tcp = logging.getLogger("libp2p.transport.tcp.tcp")
    chatty = logging.getLogger("libp2p.network.auto_connector")
    for logger in (lib, tcp, chatty):
        monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
    monkeypatch.setattr(lib, "handlers", [])
    monkeypatch.setattr(lib, "propagate", False)  # as py-libp2p leaves it
    chatty.setLevel(logging.INFO)  # as py-libp2p's auto-connector does on import
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(f"{record.name}: {record.getMessage()}")

    quiet_libp2p_logging()
    quiet_libp2p_logging()  # idempotent: one handler
    assert sum(isinstance(h, _ToApplicationHandlers) for h in lib.handlers) == 1
    catch = Catch()
    logging.getLogger().addHandler(catch)
    try:
        logging.getLogger("libp2p.network.swarm").error("swarm broke")
        logging.getLogger("libp2p.network.swarm").warning("peer churn")
        chatty.info("initiating 200 new dials")
        tcp.error("Failed to open TCP stream: refused")
    finally:
        logging.getLogger().removeHandler(catch)
    assert seen == ["libp2p.network.swarm: swarm broke"]
