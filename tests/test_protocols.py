"""Unit tests of the wire protocols: framing, strict codecs, announcements, dispatch.

Byte streams here are a real in-memory stream (``_Pipe``) rather than libp2p: the network
paths are covered in tests/test_protocols_stream.py and tests/test_p2p*.py.
"""

from __future__ import annotations

import pytest
import trio

from protocols import announce, codec, framing, task
from protocols.errors import ErrorResponse, FrameError, FrameTooLargeError, MalformedMessageError
from protocols.pb import task_pb2 as pb

PEER_A = "12D3KooWKReMnh2PGSES5nW1F5aUvADYiBUpMerPvwYc3KnCP3Ba"
PEER_B = "12D3KooWKZ8yQybEtwqepcfoL5gkzhVhCrY4eggjUyx5iMqFPnr8"


class _Pipe:
    """An in-memory byte stream returning at most ``chunk`` bytes per read, then EOF."""

    def __init__(self, data: bytes, chunk: int = 1 << 20) -> None:
        self.data = bytearray(data)
        self.chunk = chunk
        self.reads = 0
        self.written = bytearray()

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        self.reads += 1
        n = len(self.data) if n is None or n < 0 else n
        out = bytes(self.data[: min(n, self.chunk)])
        del self.data[: len(out)]
        return out

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.written += data


# ---- framing ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 65_536, framing.MAX_FRAME_SIZE])
async def test_frame_roundtrip_in_small_chunks(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    pipe = _Pipe(framing.encode_frame(payload), chunk=7919)
    assert await framing.read_frame(pipe) == payload
    assert pipe.data == b""  # the frame was consumed exactly, nothing past it


async def test_frame_larger_than_library_reader_limit() -> None:
    """libp2p's read_exactly gives up after 100 short reads; ours keeps going to the cap."""
    payload = b"x" * 300_000
    pipe = _Pipe(framing.encode_frame(payload), chunk=1000)
    assert await framing.read_frame(pipe) == payload
    assert pipe.reads > 300


async def test_oversized_prefix_rejected_without_reading_the_body() -> None:
    body = b"y" * (framing.MAX_FRAME_SIZE + 10)
    pipe = _Pipe(framing.encode_uvarint(len(body)) + body)
    with pytest.raises(FrameTooLargeError):
        await framing.read_frame(pipe)
    assert pipe.reads == 1 and len(pipe.data) >= len(body) - 65536  # one bounded read


async def test_huge_varint_rejected_early() -> None:
    pipe = _Pipe(b"\xff" * 9 + b"\x01" + b"rest", chunk=1)
    with pytest.raises(FrameTooLargeError):
        await framing.read_frame(pipe)
    assert pipe.reads <= 4  # stops as soon as the value passes the cap


async def test_small_frame_costs_one_read() -> None:
    pipe = _Pipe(framing.encode_frame(b"hello"))
    assert await framing.read_frame(pipe) == b"hello" and pipe.reads == 1


async def test_bytes_after_the_frame_are_refused() -> None:
    with pytest.raises(FrameError, match="unexpected bytes"):
        await framing.read_frame(_Pipe(framing.encode_frame(b"abc") + b"extra"))


@pytest.mark.parametrize(
    "data",
    [b"", b"\x80", b"\x05abc", b"\x80\x80\x80"],
    ids=["empty", "cut-varint", "cut-body", "cut-long-varint"],
)
async def test_truncated_frames(data: bytes) -> None:
    with pytest.raises(FrameError):
        await framing.read_frame(_Pipe(data))


def test_encode_frame_refuses_over_cap() -> None:
    with pytest.raises(FrameTooLargeError):
        framing.encode_frame(b"z" * (framing.MAX_FRAME_SIZE + 1))
    assert framing.encode_uvarint(300) == b"\xac\x02"


async def test_write_frame() -> None:
    pipe = _Pipe(b"")
    await framing.write_frame(pipe, b"hello")
    assert bytes(pipe.written) == b"\x05hello"


# ---- strict codec -------------------------------------------------------------------------


def test_strict_parse_refuses_wrong_messages() -> None:
    offer = pb.Announcement(offer=pb.TaskOffer(task_id="t1", task_type="x", priority=3))
    with pytest.raises(MalformedMessageError, match="does not define"):
        codec.parse_strict(pb.TaskRequest, offer.SerializeToString())
    grant = pb.TaskResponse(grant=pb.ClaimGrant(task_id="t", lease_id="l", lease_expires_at_ms=9))
    with pytest.raises(MalformedMessageError):
        codec.parse_strict(pb.TaskRequest, grant.SerializeToString())
    with pytest.raises(MalformedMessageError):
        codec.parse_strict(pb.TaskRequest, b"\xff\xfe garbage")
    req = pb.TaskRequest(claim=pb.ClaimRequest(task_id="t1", capabilities=["GPU"]))
    assert codec.parse_strict(pb.TaskRequest, req.SerializeToString()) == req


def test_json_payloads() -> None:
    assert codec.decode_json(codec.encode_json({"a": [1, "é"]}), "x") == {"a": [1, "é"]}
    assert codec.encode_json(None) == b"" and codec.decode_json(b"", "x") is None
    with pytest.raises(MalformedMessageError, match="not UTF-8 JSON"):
        codec.decode_json(b"{nope", "result")
    with pytest.raises(MalformedMessageError):
        codec.decode_json(b"\xff", "result")
    with pytest.raises(MalformedMessageError, match="nested too deeply"):
        codec.decode_json(b"[" * 100_000 + b"]" * 100_000, "result")  # fits in one frame
    limit = codec.MAX_JSON_DEPTH
    at_limit = b"[" * limit + b"]" * limit
    assert codec.decode_json(at_limit, "result") is not None
    with pytest.raises(MalformedMessageError, match=f"more than {limit} levels"):
        codec.decode_json(b"[" + at_limit + b"]", "result")  # json.loads copes; we refuse


def test_json_depth_walk() -> None:
    """The check is iterative and exact, counts dicts and tuples too, and stops on cycles."""
    assert not codec.json_too_deep(5) and not codec.json_too_deep("[[[[")
    value: object = 0
    for i in range(codec.MAX_JSON_DEPTH):
        value = {"k": value} if i % 2 else (value,)
    assert not codec.json_too_deep(value)
    assert codec.json_too_deep([value])
    assert codec.json_too_deep([[1]], limit=1) and not codec.json_too_deep([1], limit=1)
    loop: list[object] = []
    loop.append(loop)
    assert codec.json_too_deep(loop)
    wide = [[0] * 1000 for _ in range(1000)]
    assert not codec.json_too_deep(wide)


def test_check_request() -> None:
    assert task.check_request(pb.TaskRequest(list=pb.ListRequest(limit=5))) == "list"
    with pytest.raises(MalformedMessageError, match="no body"):
        task.check_request(pb.TaskRequest())
    with pytest.raises(MalformedMessageError, match="task_id is empty"):
        task.check_request(pb.TaskRequest(claim=pb.ClaimRequest()))
    with pytest.raises(MalformedMessageError, match="lease_id is empty"):
        task.check_request(pb.TaskRequest(complete=pb.CompleteRequest(task_id="t")))
    with pytest.raises(MalformedMessageError, match="longer than"):
        task.check_request(pb.TaskRequest(status=pb.StatusRequest(task_id="t" * 600)))
    with pytest.raises(MalformedMessageError, match="more than"):
        task.check_request(
            pb.TaskRequest(claim=pb.ClaimRequest(task_id="t", capabilities=["c"] * 100))
        )


# ---- announcements ------------------------------------------------------------------------


def _offer(**kw: object) -> pb.TaskOffer:
    fields: dict[str, object] = {
        "task_id": "t1",
        "task_type": "inference",
        "priority": 8,
        "tags": ["P2P_ELIGIBLE", "GPU_PREFERRED"],
        "requires": ["GPU"],
        "owner_peer_id": PEER_A,
        "owner_addrs": [f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER_A}"],
        "submitted_at_ms": 1_700_000_000_000,
        "attempt": 0,
    }
    fields.update(kw)
    return pb.TaskOffer(**fields)  # type: ignore[arg-type]


def test_announcement_roundtrip() -> None:
    ann = announce.decode_announcement(announce.encode_offer(_offer()), PEER_A)
    assert ann.WhichOneof("body") == "offer" and ann.offer == _offer()
    upd = pb.TaskUpdate(
        task_id="t1", state=pb.TASK_STATE_CLAIMED, owner_peer_id=PEER_A, worker_peer_id=PEER_B
    )
    ann = announce.decode_announcement(announce.encode_update(upd), PEER_A)
    assert ann.update == upd


@pytest.mark.parametrize(
    ("offer", "reason"),
    [
        (_offer(owner_peer_id=PEER_B, owner_addrs=[]), "signed origin"),
        (_offer(priority=11), "priority"),
        (_offer(task_id=""), "task_id is empty"),
        (_offer(owner_addrs=["not a multiaddr"]), "not a multiaddr"),
        (_offer(owner_addrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_B}"]), "another peer"),
        (_offer(tags=["x" * 300]), "over-long"),
    ],
)
def test_invalid_offers_rejected(offer: pb.TaskOffer, reason: str) -> None:
    with pytest.raises(MalformedMessageError, match=reason):
        announce.decode_announcement(announce.encode_offer(offer), PEER_A)


def test_invalid_announcements_rejected() -> None:
    with pytest.raises(MalformedMessageError, match="no body"):
        announce.decode_announcement(b"", PEER_A)
    with pytest.raises(MalformedMessageError, match="not a task state"):
        announce.decode_announcement(
            announce.encode_update(pb.TaskUpdate(task_id="t", owner_peer_id=PEER_A)), PEER_A
        )
    req = pb.TaskRequest(claim=pb.ClaimRequest(task_id="t", capabilities=["x"]))
    with pytest.raises(MalformedMessageError):
        announce.decode_announcement(req.SerializeToString() + b"\x50\x01", PEER_A)
    big = _offer(tags=["t" * 200] * 60, requires=["r" * 200] * 60, task_type="y" * 256)
    big.owner_addrs[:] = []
    data = announce.encode_offer(big) * 2
    with pytest.raises(MalformedMessageError):
        announce.decode_announcement(data, PEER_A)


def test_topic_validator_checks_origin_and_allow_list() -> None:
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2

    a, b = ID.from_base58(PEER_A), ID.from_base58(PEER_B)

    def message(origin: ID, data: bytes) -> rpc_pb2.Message:
        return rpc_pb2.Message(from_id=origin.to_bytes(), data=data, topicIDs=[announce.TOPIC])

    good = message(a, announce.encode_offer(_offer()))
    open_validator = announce.make_topic_validator()
    assert open_validator(b, good) is True
    assert open_validator(b, message(b, announce.encode_offer(_offer()))) is False  # forged owner
    assert open_validator(a, message(a, b"garbage")) is False
    only_b = announce.make_topic_validator(lambda p: p == PEER_B)
    assert only_b(b, good) is False  # origin A is not allowed, even relayed by B
    only_a = announce.make_topic_validator(lambda p: p == PEER_A)
    assert only_a(a, good) is True
    assert only_a(b, good) is False  # forwarded by a peer outside the allow-list


# ---- dispatch against a small in-memory authority -----------------------------------------


class _DictAuthority:
    """A minimal owner over a dict, enough to exercise dispatch and the server's rules."""

    def __init__(self, allowed: set[str] | None = None) -> None:
        self.tasks: dict[str, dict[str, object]] = {}
        self.allowed = allowed
        self.lock = trio.Lock()

    def is_allowed(self, peer_id: str) -> bool:
        return self.allowed is None or peer_id in self.allowed

    def _get(self, task_id: str) -> dict[str, object]:
        if task_id not in self.tasks:
            raise ErrorResponse(pb.ERROR_CODE_NOT_FOUND, f"no task {task_id}")
        return self.tasks[task_id]

    async def claim(self, worker: str, req: pb.ClaimRequest) -> pb.ClaimGrant:
        async with self.lock:
            t = self._get(req.task_id)
            await trio.sleep(0)  # let concurrent claims interleave
            if t["state"] != "pending":
                raise ErrorResponse(pb.ERROR_CODE_ALREADY_CLAIMED, "taken")
            t.update(state="claimed", worker=worker, lease=f"lease-{worker}")
            return pb.ClaimGrant(task_id=req.task_id, lease_id=str(t["lease"]), task_type="x")

    def _check_lease(self, worker: str, task_id: str, lease_id: str) -> dict[str, object]:
        t = self._get(task_id)
        if t.get("lease") != lease_id or t.get("worker") != worker:
            raise ErrorResponse(pb.ERROR_CODE_NOT_LEASE_HOLDER, "not your lease")
        return t

    async def complete(self, worker: str, req: pb.CompleteRequest) -> pb.Ack:
        t = self._check_lease(worker, req.task_id, req.lease_id)
        t.update(state="completed", result=codec.decode_json(req.result, "result"))
        return pb.Ack(task_id=req.task_id, state=pb.TASK_STATE_COMPLETED)

    async def heartbeat(self, worker: str, req: pb.HeartbeatRequest) -> pb.Ack:
        self._check_lease(worker, req.task_id, req.lease_id)
        return pb.Ack(task_id=req.task_id, state=pb.TASK_STATE_CLAIMED)

    async def fail(self, worker: str, req: pb.FailRequest) -> pb.Ack:
        t = self._check_lease(worker, req.task_id, req.lease_id)
        t.update(state="failed")
        return pb.Ack(task_id=req.task_id, state=pb.TASK_STATE_FAILED)

    async def status(self, worker: str, req: pb.StatusRequest) -> pb.TaskStatus:
        t = self._get(req.task_id)
        return pb.TaskStatus(task_id=req.task_id, worker_peer_id=str(t.get("worker", "")))

    async def list_offers(self, worker: str, req: pb.ListRequest) -> pb.TaskList:
        if req.limit == 999:
            raise RuntimeError("boom")
        return pb.TaskList(
            offers=[
                pb.TaskOffer(task_id=k, task_type="x", owner_peer_id=PEER_A)
                for k, v in self.tasks.items()
                if v["state"] == "pending"
            ]
        )


async def test_dispatch_one_winner_among_concurrent_claims() -> None:
    auth = _DictAuthority()
    auth.tasks["t1"] = {"state": "pending"}
    results: list[pb.TaskResponse] = []

    async def claim(worker: str) -> None:
        req = pb.TaskRequest(claim=pb.ClaimRequest(task_id="t1"))
        results.append(await task.dispatch(auth, worker, req))

    async with trio.open_nursery() as n:
        for i in range(10):
            n.start_soon(claim, f"peer-{i}")
    kinds = [r.WhichOneof("body") for r in results]
    assert kinds.count("grant") == 1
    assert [r.error.code for r in results if r.WhichOneof("body") == "error"] == [
        pb.ERROR_CODE_ALREADY_CLAIMED
    ] * 9


async def test_dispatch_maps_errors() -> None:
    auth = _DictAuthority()
    auth.tasks["t1"] = {"state": "claimed", "worker": PEER_A, "lease": "L"}
    r = await task.dispatch(auth, PEER_B, pb.TaskRequest(claim=pb.ClaimRequest(task_id="nope")))
    assert r.error.code == pb.ERROR_CODE_NOT_FOUND
    wrong = pb.CompleteRequest(task_id="t1", lease_id="L", result=b"{}")
    r = await task.dispatch(auth, PEER_B, pb.TaskRequest(complete=wrong))  # right lease, wrong peer
    assert r.error.code == pb.ERROR_CODE_NOT_LEASE_HOLDER
    bad_json = pb.CompleteRequest(task_id="t1", lease_id="L", result=b"{")
    r = await task.dispatch(auth, PEER_A, pb.TaskRequest(complete=bad_json))
    assert r.error.code == pb.ERROR_CODE_BAD_REQUEST
    assert auth.tasks["t1"]["state"] == "claimed"
    r = await task.dispatch(auth, PEER_A, pb.TaskRequest(list=pb.ListRequest(limit=999)))
    assert r.error.code == pb.ERROR_CODE_INTERNAL and "RuntimeError" in r.error.message
    r = await task.dispatch(auth, PEER_A, pb.TaskRequest(complete=wrong))
    assert r.ack.state == pb.TASK_STATE_COMPLETED and auth.tasks["t1"]["result"] == {}


def test_error_response_names_its_code() -> None:
    err = ErrorResponse(pb.ERROR_CODE_LEASE_EXPIRED, "too late")
    assert str(err) == "ERROR_CODE_LEASE_EXPIRED: too late"
    assert ErrorResponse(99, "x").code_name == "ERROR_CODE_99"
