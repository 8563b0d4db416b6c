"""Several real processes writing one cache_dir's chain, and a writer killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ipfs_accelerate_py.datasets_integration import ProvenanceLogger
from node.provenance import decode

ROOT = Path(__file__).resolve().parents[1]

# Each child prints the CID of every record whose call has returned, one per line, flushed.
CHILD = textwrap.dedent("""
    import sys
    from ipfs_accelerate_py.datasets_integration import ProvenanceLogger
    cache_dir, api, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with ProvenanceLogger({"cache_dir": cache_dir, "ipfs_api": api}) as lg:
        print("ready", flush=True)
        for i in range(count):
            cid = lg.log_inference(f"model-{name}", {"writer": name, "i": i,
                                                     "emb": [i / 3.0] * 400 if i % 50 == 0 else []})
            print(cid, flush=True)
""")


def _dead_api() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"/ip4/127.0.0.1/tcp/{s.getsockname()[1]}"


def _spawn(cache_dir: Path, api: str, name: str, count: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(cache_dir), api, name, str(count)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )


def _record_blocks(lg: ProvenanceLogger) -> set[str]:
    """CIDs of every provenance record in the block store (split-out values excluded)."""
    out = set()
    for cid in lg.services.local_blocks.iter_cids("dag-json"):
        value = decode(lg.services.local_blocks.get(cid))
        if isinstance(value, dict) and "sig" in value and "seq" in value:
            out.add(cid)
    return out


def _check_consistent(lg: ProvenanceLogger, acknowledged: set[str]) -> dict[str, Any]:
    report = lg.verify()  # signatures, hashes, prev links, seq 0..n-1, index == blocks
    indexed = {r["cid"] for r in lg.query_logs({}, limit=None)}
    assert acknowledged <= indexed  # every record whose call returned is there
    assert indexed == _record_blocks(lg)  # the index agrees with the blocks
    assert report["records"] == len(indexed)
    return report


@pytest.mark.slow
def test_concurrent_processes_build_one_chain(cache_dir: Path) -> None:
    api = _dead_api()
    procs = [_spawn(cache_dir, api, f"p{i}", 400) for i in range(4)]
    acknowledged: set[str] = set()
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        lines = out.split()
        assert lines[0] == "ready"
        acknowledged.update(lines[1:])
    assert len(acknowledged) == 1600
    with ProvenanceLogger({"cache_dir": str(cache_dir), "ipfs_api": api}) as lg:
        report = _check_consistent(lg, acknowledged)
        assert report["records"] == 1600
        for i in range(4):
            mine = lg.query_logs({"type": "inference", "model": f"model-p{i}"}, limit=None)
            assert [r["data"]["i"] for r in mine] == list(range(399, -1, -1))


@pytest.mark.slow
def test_sigkill_mid_burst_loses_no_acknowledged_record(cache_dir: Path) -> None:
    api = _dead_api()
    other = _spawn(cache_dir, api, "steady", 600)
    victim = _spawn(cache_dir, api, "victim", 1_000_000)
    assert victim.stdout is not None
    acknowledged: set[str] = set()
    assert victim.stdout.readline().strip() == "ready"
    while len(acknowledged) < 700:
        line = victim.stdout.readline().strip()
        assert line, victim.stderr.read() if victim.stderr else "child died"
        acknowledged.add(line)
    os.kill(victim.pid, signal.SIGKILL)  # in the middle of a burst, with a peer writing too
    rest, _ = victim.communicate(timeout=60)
    acknowledged.update(rest.split())  # lines it printed before dying
    assert victim.returncode == -signal.SIGKILL
    out, err = other.communicate(timeout=240)
    assert other.returncode == 0, err
    acknowledged.update(out.split()[1:])
    with ProvenanceLogger({"cache_dir": str(cache_dir), "ipfs_api": api}) as lg:
        _check_consistent(lg, acknowledged)
        assert len(lg.query_logs({"model": "model-steady"}, limit=None)) == 600
        # the chain goes on from the surviving head
        head = lg.services.provenance.head()
        assert head is not None
        nxt = lg.log_inference("after-crash", {})
        assert lg.get_record(nxt)["prev"] == head["cid"]
        assert lg.verify()["records"] == head["seq"] + 2
