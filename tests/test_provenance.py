"""ProvenanceLogger / DatasetsManager: the seed's calls, queries, lineage, verify, PROV export.

Everything runs on real SQLite files in tmp_path and, where marked, the real Kubo-compatible
daemon. "No Kubo" means ``ipfs_api`` points at a loopback port nobody listens on.
"""

from __future__ import annotations

import datetime as dt
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ipfs_accelerate_py.datasets_integration import DatasetsManager, ProvenanceLogger
from node.config import datasets_enabled_mode
from node.errors import (
    EncodingError,
    InvalidArgumentError,
    InvalidCIDError,
    NotFoundError,
)
from node.provenance import Link, decode
from node.provenance._dagjson import decode_canonical
from node.provenance._records import SIGNING_DOMAIN
from node.storage import KuboClient


def _dead_api() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}"


@pytest.fixture
def offline(cache_dir: Path) -> dict[str, Any]:
    return {"cache_dir": str(cache_dir), "ipfs_api": _dead_api(), "enable_p2p": False}


@pytest.fixture
def logger(offline: dict[str, Any]) -> Any:
    with ProvenanceLogger(offline) as lg:
        yield lg


def _content_cids(lg: ProvenanceLogger, n: int) -> list[str]:
    """Real CIDs of real content (stored in the node's block store)."""
    return [lg.services.local_blocks.put(f"content {i}".encode(), "raw") for i in range(n)]


def _seed_calls(manager: DatasetsManager, logger: ProvenanceLogger) -> dict[str, Any]:
    """The seed document's calls exactly, with real CIDs for its "Qm..." placeholders."""
    src, dst = _content_cids(logger, 2)
    out: dict[str, Any] = {}
    out["event"] = manager.log_event("model_loaded", {"model": "bert-base", "size_mb": 420})
    out["tracked"] = manager.track_provenance(
        "inference", {"model": "bert-base", "input_cid": src, "output_cid": dst}
    )
    out["status"] = manager.get_status()
    out["inference"] = logger.log_inference("bert-base", {
        "input": "Hello world", "output_embedding": [0.1, 0.2], "duration_ms": 150,
        "hardware": "CUDA"})
    out["transformation"] = logger.log_transformation(
        "tokenization", {"tokenizer": "bert-tokenizer", "max_length": 512},
        input_cid=src, output_cid=dst)
    out["worker"] = logger.log_worker_execution(
        "worker-001", "task-123", {"status": "completed", "duration_ms": 5000})
    out["pr"] = logger.log_pr_activity(123, "copilot_suggestion", {
        "file": "model.py", "suggestion": "Add error handling", "accepted": True})
    out["logs"] = logger.query_logs({"type": "inference", "model": "bert-base"})
    out["pr_logs"] = logger.query_logs({"type": "pr_activity", "pr_number": 123})
    out["src"], out["dst"] = src, dst
    return out


def _check_seed(out: dict[str, Any], logger: ProvenanceLogger) -> None:
    for key in ("tracked", "inference", "transformation", "worker", "pr"):
        assert isinstance(out[key], str) and out[key].startswith("bagu"), key
    assert [r["cid"] for r in out["logs"]] == [out["inference"]]
    rec = out["logs"][0]
    assert rec["data"] == {"input": "Hello world", "output_embedding": [0.1, 0.2],
                           "duration_ms": 150, "hardware": "CUDA"}
    assert rec["node"] == logger.services.peer_id
    assert [r["cid"] for r in out["pr_logs"]] == [out["pr"]]
    assert out["pr_logs"][0]["activity"] == "copilot_suggestion"
    assert out["pr_logs"][0]["data"]["accepted"] is True
    status = out["status"]
    assert status["enabled"] is (datasets_enabled_mode() != "off")
    assert status["peer_id"] == logger.services.peer_id
    assert status["services"] == {"audit": True, "provenance": True, "p2p": False}
    assert status["counts"]["records"] == 2  # the event and the tracked step, so far
    tracked = logger.get_record(out["tracked"])
    assert tracked["type"] == "provenance" and tracked["operation"] == "inference"
    assert tracked["input_cid"] == out["src"] and tracked["output_cid"] == out["dst"]
    assert tracked["data"] == {"model": "bert-base"}
    events = logger.query_logs({"type": "event", "event": "model_loaded"})
    assert len(events) == 1 and events[0]["data"] == {"model": "bert-base", "size_mb": 420}
    assert logger.verify()["records"] == 6


def test_seed_calls_without_kubo(offline: dict[str, Any]) -> None:
    with DatasetsManager({**offline, "enable_audit": True, "enable_provenance": True}) as m, \
            ProvenanceLogger(offline) as lg:
        out = _seed_calls(m, lg)
        assert out["event"] is False  # kept locally (Pattern 2), but stored and queryable
        assert out["status"]["available"] is False
        assert out["status"]["storage_backend"] == "local"
        _check_seed(out, lg)


@pytest.mark.kubo
def test_seed_calls_with_kubo(kubo: Any, cache_dir: Path) -> None:
    cfg = {"cache_dir": str(cache_dir), "ipfs_api": kubo.api, "enable_p2p": False}
    with DatasetsManager({**cfg, "enable_audit": True, "enable_provenance": True}) as m, \
            ProvenanceLogger(cfg) as lg:
        out = _seed_calls(m, lg)
        assert out["event"] is True  # reached IPFS
        assert out["status"]["available"] is True
        assert out["status"]["storage_backend"] == "kubo+local"
        _check_seed(out, lg)
        # The daemon holds the very same record bytes under the same CID.
        client = KuboClient(kubo.api, 30.0)
        try:
            for key in ("inference", "pr", "tracked"):
                data = client.block_get(out[key], timeout=10)
                assert decode_canonical(data)["seq"] == lg.get_record(out[key])["seq"]
        finally:
            client.close()


@pytest.mark.kubo
def test_records_written_while_kubo_is_down_are_pushed_when_it_returns(
    kubo_private: Any, cache_dir: Path
) -> None:
    cfg = {"cache_dir": str(cache_dir), "ipfs_api": kubo_private.api}
    with ProvenanceLogger(cfg) as lg:
        store = lg.services.provenance
        _first, reached = store.append("inference", {"model": "m", "data": {"i": 0}})
        assert reached is True
        kubo_private.stop()
        lg.services.blocks._mark_down()  # do not wait for the 2 s probe cache to expire
        offline = [store.append("inference", {"model": "m", "data": {"i": i}}) for i in range(5)]
        assert all(r is False for _, r in offline)
        assert len(lg.query_logs({"model": "m"})) == 6  # nothing dropped
        kubo_private.start_again()
        lg.services.blocks._mark_down()
        deadline = time.monotonic() + 30
        while not lg.services.blocks.kubo_available() and time.monotonic() < deadline:
            time.sleep(0.2)
        result = store.sync()
        assert result["kubo_available"] is True and result["remaining"] == 0
        client = KuboClient(kubo_private.api, 30.0)
        try:
            for cid, _ in offline:
                assert client.block_get(cid, timeout=10) == lg.services.local_blocks.get(cid)
        finally:
            client.close()


def test_queries_filters_time_ranges_order_and_limit(logger: ProvenanceLogger) -> None:
    t0 = time.time()
    cids = [logger.log_inference(f"model-{i % 3}", {"hardware": "CUDA" if i % 2 else "CPU",
                                                    "batch": i}) for i in range(30)]
    newest_first = list(reversed(cids))
    assert [r["cid"] for r in logger.query_logs({"type": "inference"}, limit=100)] == newest_first
    assert [r["cid"] for r in logger.query_logs({}, limit=5)] == newest_first[:5]
    m1 = logger.query_logs({"type": "inference", "model": "model-1"})
    assert [r["cid"] for r in m1] == [c for i, c in enumerate(cids) if i % 3 == 1][::-1]
    # fields inside data: explicit and bare names, ints vs integral floats
    assert len(logger.query_logs({"data.hardware": "CUDA"})) == 15
    assert len(logger.query_logs({"hardware": "CPU", "model": "model-0"})) == 5
    assert [r["cid"] for r in logger.query_logs({"batch": 7.0})] == [cids[7]]
    assert logger.query_logs({"batch": "7"}) == []  # types are exact otherwise
    assert logger.query_logs({"no_such_field": 1}) == []
    # time ranges (inclusive), unix seconds or aware datetimes
    ts = [r["ts"] for r in logger.query_logs({}, limit=None)]
    mid = sorted(ts)[15]
    since = logger.query_logs({}, since=mid / 1000, limit=None)
    assert since and all(r["ts"] >= mid for r in since)
    until = logger.query_logs({}, until=dt.datetime.fromtimestamp(mid / 1000, dt.timezone.utc),
                              limit=None)
    assert until and all(r["ts"] <= mid for r in until)
    assert len(since) + len(until) >= 30
    assert logger.query_logs({}, since=t0 + 3600) == []
    with pytest.raises(InvalidArgumentError):
        logger.query_logs({}, since=dt.datetime(2024, 1, 1))  # naive
    with pytest.raises(InvalidArgumentError):
        logger.query_logs({"data.a.b": 1})
    with pytest.raises(InvalidArgumentError):
        logger.query_logs({}, limit=0)


def test_filter_on_the_whole_data_value(logger: ProvenanceLogger) -> None:
    """A data map is matched exactly: same members, same values, no extra members."""
    big = [0.5] * 400  # split out into its own block: matched by content all the same
    a = logger.log_inference("m", {"x": 1, "y": "two"})
    b = logger.log_inference("m", {"x": 1, "y": "two", "z": None})
    c = logger.log_inference("m", {"x": 1, "emb": big})
    empty = logger.log_inference("m", {})
    got = lambda f: [r["cid"] for r in logger.query_logs(f, limit=None)]  # noqa: E731
    assert got({"data": {"y": "two", "x": 1}}) == [a]
    assert got({"data": {"x": 1, "y": "two", "z": None}}) == [b]
    assert got({"data": {"x": 1, "emb": big}}) == [c]
    assert got({"data": {}}) == [empty]
    assert got({"data": {"x": 1}}) == []
    assert got({"data": {"x": 1.0, "y": "two"}}) == [a]  # numbers compare like Python
    assert got({"data": "x"}) == []


def test_an_index_of_an_older_schema_is_rebuilt(offline: dict[str, Any]) -> None:
    with ProvenanceLogger(offline) as lg:
        cids = [lg.log_inference("m", {"i": i}) for i in range(5)]
        db = lg.config.provenance_db
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value='1' WHERE key='schema'")
    with ProvenanceLogger(offline) as lg:
        assert [r["cid"] for r in lg.query_logs({"data": {"i": 3}})] == [cids[3]]
        assert lg.verify()["records"] == 5
    assert list(db.parent.glob(db.name + ".old-*")), "the old file is kept beside the new one"


def test_cid_filters_accept_v0_and_v1(logger: ProvenanceLogger) -> None:
    v0 = logger.services.blocks.add_bytes(b"a file", pin=True)  # CIDv0 Qm...
    assert v0.startswith("Qm")
    cid = logger.log_transformation("resize", {"w": 1}, input_cid=v0)
    from cid import make_cid

    v1 = make_cid(v0).to_v1().encode("base32").decode()
    assert [r["cid"] for r in logger.query_logs({"input_cid": v0})] == [cid]
    assert [r["cid"] for r in logger.query_logs({"input_cid": v1})] == [cid]
    assert logger.get_record(cid)["input_cid"] == v0  # the record keeps the caller's form
    with pytest.raises(InvalidCIDError):
        logger.log_transformation("x", {}, input_cid="Qm...")
    with pytest.raises(InvalidCIDError):
        logger.query_logs({"input_cid": "not-a-cid"})


def test_lineage_upstream_and_downstream(logger: ProvenanceLogger) -> None:
    raw, tokens, model, embeddings, report = _content_cids(logger, 5)
    t1 = logger.log_transformation("tokenize", {}, input_cid=raw, output_cid=tokens)
    t2 = logger.log_inference("bert-base", {"input_cid": [tokens, model],
                                            "output_cid": embeddings})
    t3 = logger.log_transformation("summarise", {}, input_cid=embeddings, output_cid=report)
    up = logger.get_lineage(report, "upstream")
    assert [(r["cid"], r["depth"]) for r in up] == [(t3, 1), (t2, 2), (t1, 3)]
    assert [r["cid"] for r in logger.get_lineage(report, "upstream", depth=2)] == [t3, t2]
    down = logger.get_lineage(raw, direction="downstream")
    assert [(r["cid"], r["depth"]) for r in down] == [(t1, 1), (t2, 2), (t3, 3)]
    assert [r["cid"] for r in logger.get_lineage(model, "downstream")] == [t2, t3]
    # starting from a record CID: the record itself at depth 0
    assert [(r["cid"], r["depth"]) for r in logger.get_lineage(t2, "upstream")] == [
        (t2, 0), (t1, 1)]
    assert logger.get_lineage(raw, "upstream") == []
    with pytest.raises(InvalidArgumentError):
        logger.get_lineage(raw, "sideways")
    # a cycle (output fed back as input) terminates
    logger.log_transformation("loop", {}, input_cid=report, output_cid=raw)
    assert len(logger.get_lineage(raw, "downstream")) == 4


def test_large_values_are_blocks_and_values_json_cannot_hold(logger: ProvenanceLogger) -> None:
    embedding = [i / 768 for i in range(768)]
    cid = logger.log_inference("bert-base", {"output_embedding": embedding, "note": b"\x00\x01",
                                             "at": dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)})
    logger.services.provenance.catch_up()  # blocks are written in batches (or within 0.5 s)
    raw = logger.services.local_blocks.get(cid)
    assert len(raw) < 1024  # the record stays small
    stored = logger.query_logs({"type": "inference"})[0]
    assert isinstance(stored["data"]["output_embedding"], Link)
    assert stored["data"]["note"] == b"\x00\x01"
    assert stored["data"]["at"] == "2024-05-01T00:00:00.000000Z"
    full = logger.query_logs({"type": "inference"}, resolve=True)[0]
    assert full["data"]["output_embedding"] == embedding
    assert logger.get_record(cid)["data"]["output_embedding"] == embedding
    # equality on the large value finds it (matched by content)
    assert [r["cid"] for r in logger.query_logs({"output_embedding": embedding})] == [cid]
    with pytest.raises(EncodingError, match="not a finite number"):
        logger.log_inference("bert-base", {"score": float("nan")})
    with pytest.raises(EncodingError, match="type set"):
        logger.log_inference("bert-base", {"labels": {"a", "b"}})
    assert logger.verify()["records"] == 1  # refused calls left nothing behind


def test_disabled_services_record_nothing_and_never_raise(offline: dict[str, Any]) -> None:
    with DatasetsManager({**offline, "enable_audit": False, "enable_provenance": False}) as m:
        assert m.log_event("model_loaded", {"model": "x"}) is False
        assert m.track_provenance("inference", {"model": "x"}) is None
        status = m.get_status()
        assert status["services"]["audit"] is False
        assert status["counts"]["records"] == 0
    with ProvenanceLogger({**offline, "enable_provenance": False}) as lg:
        assert lg.log_inference("bert-base", {"x": 1}) is None
        assert lg.log_pr_activity(1, "review", {}) is None
        assert lg.query_logs({}) == []
        assert lg.verify()["records"] == 0


def test_record_names_must_be_non_empty_strings(offline: dict[str, Any]) -> None:
    """A bad name is refused whether or not recording is on (it is the caller's bug)."""
    for enabled in (True, False):
        cfg = {**offline, "enable_audit": enabled, "enable_provenance": enabled}
        with DatasetsManager(cfg) as m, ProvenanceLogger(cfg) as lg:
            calls = [
                lambda: m.log_event(None, {}),
                lambda: m.track_provenance("", {}),
                lambda: lg.log_inference(None, {}),
                lambda: lg.log_transformation("  ", {}),
                lambda: lg.log_worker_execution("w", 7, {}),
                lambda: lg.log_pr_activity(1, None, {}),
            ]
            for call in calls:
                with pytest.raises(InvalidArgumentError, match="non-empty string"):
                    call()
            assert lg.verify()["records"] == 0


def test_get_unknown_record(logger: ProvenanceLogger) -> None:
    from node.provenance import cid_for

    with pytest.raises(NotFoundError):
        logger.get_record(cid_for(b'{"never":"stored"}'))


def test_threads_share_one_chain(logger: ProvenanceLogger) -> None:
    got: list[str] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(150):
            cid = logger.log_worker_execution(f"w{t}", f"task-{t}-{i}", {"i": i})
            with lock:
                got.append(cid)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    report = logger.verify()
    assert report["records"] == len(got) == len(set(got)) == 1200
    found = {r["cid"] for r in logger.query_logs({"type": "worker_execution"}, limit=None)}
    assert found == set(got)
    seqs = sorted(r["seq"] for r in logger.query_logs({}, limit=None))
    assert seqs == list(range(1200))


def test_index_is_rebuilt_from_blocks_when_lost(offline: dict[str, Any]) -> None:
    with ProvenanceLogger(offline) as lg:
        src, dst = _content_cids(lg, 2)
        cids = [lg.log_inference("m", {"i": i, "emb": [i / 3] * 300}) for i in range(600)]
        t = lg.log_transformation("t", {"k": "v"}, input_cid=src, output_cid=dst)
        before = lg.query_logs({"type": "inference"}, limit=None)
        db = lg.config.provenance_db
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    with ProvenanceLogger(offline) as lg:
        assert lg.query_logs({"type": "inference"}, limit=None) == before
        assert [r["cid"] for r in lg.query_logs({"i": 599})] == [cids[-1]]
        assert [r["cid"] for r in lg.get_lineage(dst)] == [t]
        assert lg.verify()["records"] == 601
        nxt = lg.log_inference("m", {"i": 600})
        assert lg.get_record(nxt)["seq"] == 601 and lg.get_record(nxt)["prev"] == t


def test_export_prov_is_structurally_valid_prov_json(logger: ProvenanceLogger) -> None:
    raw, tokens, out = _content_cids(logger, 3)
    t1 = logger.log_transformation("tokenize", {"max_length": 512}, input_cid=raw,
                                   output_cid=tokens)
    t2 = logger.log_inference("bert-base", {"input_cid": tokens, "output_cid": out,
                                            "hardware": "CUDA"})
    w = logger.log_worker_execution("worker-001", "task-1", {"output_cid": out})
    doc = logger.export_prov(out, direction="upstream")
    assert set(doc) <= {"prefix", "entity", "activity", "agent", "used", "wasGeneratedBy",
                        "wasAssociatedWith", "actedOnBehalfOf", "wasInformedBy"}
    prefixes = doc["prefix"]

    def qname_ok(q: str) -> bool:
        pre, _, local = q.partition(":")
        return bool(local) and (pre in prefixes or pre == "prov")

    for kind in ("entity", "activity", "agent"):
        assert all(qname_ok(k) for k in doc[kind]), kind
    assert set(doc["activity"]) == {f"rec:{c}" for c in (t1, t2, w)}
    assert f"ipfs:{raw}" in doc["entity"] and "model:bert-base" in doc["entity"]
    assert f"peer:{logger.services.peer_id}" in doc["agent"]
    assert "worker:worker-001" in doc["agent"]
    required = {"used": ("prov:activity", "prov:entity"),
                "wasGeneratedBy": ("prov:entity", "prov:activity"),
                "wasAssociatedWith": ("prov:activity", "prov:agent"),
                "actedOnBehalfOf": ("prov:delegate", "prov:responsible"),
                "wasInformedBy": ("prov:informed", "prov:informant")}
    ids = set(doc["entity"]) | set(doc["activity"]) | set(doc["agent"])
    for rel, keys in required.items():
        for rel_id, attrs in doc.get(rel, {}).items():
            assert rel_id.startswith("_:")
            for key in keys:
                assert attrs[key] in ids, (rel, key)
    generated = {(a["prov:entity"], a["prov:activity"]) for a in doc["wasGeneratedBy"].values()}
    assert (f"ipfs:{out}", f"rec:{t2}") in generated
    used = {(a["prov:activity"], a["prov:entity"]) for a in doc["used"].values()}
    assert (f"rec:{t1}", f"ipfs:{raw}") in used
    start = doc["activity"][f"rec:{t2}"]["prov:startTime"]
    assert dt.datetime.fromisoformat(start.replace("Z", "+00:00")).tzinfo is not None
    assert doc["activity"][f"rec:{t2}"]["dsi:data.hardware"] == "CUDA"
    import json

    json.dumps(doc)  # plain JSON, as PROV-JSON tools expect
    whole = logger.export_prov(filters={"type": "transformation"})
    assert set(whole["activity"]) == {f"rec:{t1}"}


def test_signatures_use_a_domain_prefix_and_the_peer_id_key(logger: ProvenanceLogger) -> None:
    from node.identity import verify_signature
    from node.provenance._records import signing_message

    cid = logger.log_inference("m", {"x": 1})
    logger.services.provenance.catch_up()
    record = decode(logger.services.local_blocks.get(cid))
    msg = signing_message(record)
    assert msg.startswith(SIGNING_DOMAIN)
    assert verify_signature(logger.services.peer_id, msg, record["sig"])
    assert not verify_signature(logger.services.peer_id, msg[len(SIGNING_DOMAIN):],
                                record["sig"])


def test_records_are_signed_with_the_node_key_kept_0600(logger: ProvenanceLogger) -> None:
    cid = logger.log_inference("m", {"x": 1})
    key_file = logger.config.identity_path
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert logger.get_record(cid)["node"] == logger.services.identity.peer_id
    assert logger.services.peer_id.startswith("12D3KooW")


def test_appenders_wait_for_a_lagging_indexer_so_pending_records_stay_bounded(
    offline: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Backpressure: records waiting for the background indexer are held in memory, so an
    appender that gets MAX_BEHIND ahead waits until the indexer takes them. Nothing is lost."""
    import node.provenance._store as store_module

    monkeypatch.setattr(store_module, "BATCH", 4)
    monkeypatch.setattr(store_module, "MAX_BEHIND", 16)
    waits = []
    wait = store_module.ProvenanceStore._wait_for_indexer
    monkeypatch.setattr(store_module.ProvenanceStore, "_wait_for_indexer",
                        lambda self: (waits.append(1), wait(self))[1])
    absorb = store_module.ProvenanceStore._absorb

    def slow_absorb(self: Any, *args: Any) -> int:
        time.sleep(0.005)  # an indexer slower than the appender, on any machine
        return absorb(self, *args)

    monkeypatch.setattr(store_module.ProvenanceStore, "_absorb", slow_absorb)
    with ProvenanceLogger(offline) as lg:
        store = lg.services.provenance
        held = []
        cids = []
        for i in range(400):
            cids.append(lg.log_inference("m", {"i": i}))
            held.append(len(store._fresh))
        # At most one batch being indexed plus one accumulating, each capped at MAX_BEHIND.
        assert max(held) <= 2 * 16 + 1
        assert waits  # the appender did get MAX_BEHIND ahead
        assert lg.verify()["records"] == 400
        assert [r["cid"] for r in lg.query_logs({"model": "m"}, limit=None)] == cids[::-1]


def test_appender_indexes_itself_when_the_indexer_does_not_take_records(
    offline: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the background indexer does not take a full backlog within TAKE_TIMEOUT (stuck, or
    gone), the appender catches up itself instead of waiting forever."""
    import node.provenance._store as store_module

    monkeypatch.setattr(store_module, "BATCH", 4)
    monkeypatch.setattr(store_module, "MAX_BEHIND", 8)
    monkeypatch.setattr(store_module, "TAKE_TIMEOUT", 0.05)
    monkeypatch.setattr(store_module.ProvenanceStore, "_flush_loop", lambda self: None)
    with ProvenanceLogger(offline) as lg:
        store = lg.services.provenance
        for i in range(7):
            lg.log_inference("m", {"i": i})
        assert store._unindexed == 7  # nobody indexed them: the flusher is gone
        started = time.monotonic()
        lg.log_inference("m", {"i": 7})  # the 8th: waits TAKE_TIMEOUT, then indexes itself
        assert time.monotonic() - started < 5
        assert store._unindexed == 0 and not store._fresh
        with sqlite3.connect(store._db_path) as db:
            assert db.execute("SELECT count(*) FROM records").fetchone()[0] == 8


def test_postings_without_sqlite_json_functions_index_the_same(
    offline: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite before 3.38 has no json_each: postings then go in with executemany, from the
    same per-record JSON text. Both paths must give the same filters."""
    import node.provenance._store as store_module

    monkeypatch.setattr(store_module, "_JSON_BATCH", False)
    with ProvenanceLogger(offline) as lg:
        cids = [lg.log_inference(f"m{i % 3}", {"i": i, "hw": "CUDA" if i % 2 else "CPU"})
                for i in range(30)]
        lg.services.provenance.catch_up()
        found = lg.query_logs({"model": "m1", "data": {"i": 4, "hw": "CPU"}}, limit=None)
        assert [r["cid"] for r in found] == [cids[4]]
        assert len(lg.query_logs({"type": "inference"}, limit=None)) == 30
