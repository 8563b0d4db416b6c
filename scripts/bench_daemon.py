#!/usr/bin/env python
"""Control API benchmark: workers that go through ``dsi-node run``, next to the queue itself.

    .venv/bin/python scripts/bench_daemon.py [--tasks 2000] [--workers 4] [--rounds 2]

1. Requests per second of ``GET /v1/health`` from one client thread: a new connection per
   request (what ``ControlClient`` does) and one kept-alive connection (what Go's
   ``http.Client`` or ``requests.Session`` do), interleaved, against the same daemon process.
2. Zero-work tasks drained by real ``dsi-node worker`` processes (``--max-tasks``, the echo
   handler, provenance off) through a real daemon: 1 worker, then ``--workers``, interleaved
   rounds, each on a fresh daemon. Throughput is tasks / (last completion - first claim) from
   the daemon's own timestamps, so process start-up does not count. Printed with the daemon's
   CPU per task (from /proc) and next to the reference measured in the same run: the same
   claim -> complete drain by one process on the queue directly (``TaskQueue``), which is what
   the daemon wraps in HTTP.

The machine's other jobs move the absolute numbers; the ratios are the comparable part.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.daemon.client import ControlClient  # noqa: E402
from node.daemon.testing import PACKAGE_ROOT, NodeProcess, child_env, cli_command  # noqa: E402
from node.tasks import TaskQueue  # noqa: E402

ENV = {"IPFS_DATASETS_ENABLED": "0"}  # no Kubo probes: the control plane alone


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def health_rates(client: ControlClient, n: int, rounds: int) -> tuple[float, float]:
    headers = {"Authorization": f"Bearer {client.token}"}
    url = urlsplit(client.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    fresh, kept = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.request("GET", "/v1/health", headers=headers)
            conn.getresponse().read()
            conn.close()
        fresh.append(n / (time.perf_counter() - t0))
        conn = http.client.HTTPConnection(host, port, timeout=30)
        t0 = time.perf_counter()
        for _ in range(n):
            conn.request("GET", "/v1/health", headers=headers)
            conn.getresponse().read()
        kept.append(n / (time.perf_counter() - t0))
        conn.close()
    return statistics.median(fresh), statistics.median(kept)


def daemon_drain(base: Path, tag: str, n_tasks: int, n_workers: int) -> tuple[float, float]:
    """(tasks/s, daemon CPU us per task) of ``n_workers`` worker processes on a fresh daemon."""
    daemon = NodeProcess(base / f"node-{tag}", env=ENV).start().wait_ready()
    try:
        client = daemon.client()
        client.submit_batch([{"task_id": f"{tag}-{i:06d}", "task_type": "echo", "data": {"i": i}}
                             for i in range(n_tasks)])
        per = n_tasks // n_workers
        cpu0 = cpu_seconds(daemon.pid)
        workers = [
            subprocess.Popen(
                cli_command("--cache-dir", str(daemon.cache_dir), "worker", "--handler",
                            "examples.echo_worker:handle", "--max-tasks", str(per),
                            "--no-provenance", "--worker-id", f"{tag}-w{k}"),
                env=child_env(ENV), cwd=PACKAGE_ROOT,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for k in range(n_workers)
        ]
        for w in workers:
            if w.wait(600) != 0:
                raise SystemExit(f"a worker exited with {w.returncode}; see {daemon.log_path}")
        cpu = cpu_seconds(daemon.pid) - cpu0
        done = client.tasks(state="completed", limit=n_tasks)["tasks"]
        if len(done) != per * n_workers:
            raise SystemExit(f"{len(done)} of {per * n_workers} tasks completed")
        first = min(t["claimed_at"] for t in done)
        last = max(t["completed_at"] for t in done)
        return len(done) / (last - first), cpu / len(done) * 1e6
    finally:
        daemon.stop()


def queue_drain(base: Path, tag: str, n_tasks: int) -> float:
    q = TaskQueue(base / f"queue-{tag}.sqlite")
    for i in range(n_tasks):
        q.submit(f"{tag}-{i:06d}", "echo", {"i": i})
    t0 = time.perf_counter()
    while (grant := q.claim_next("w", [])) is not None:
        q.complete(grant["task_id"], grant["lease_id"], {"ok": True})
    rate = n_tasks / (time.perf_counter() - t0)
    q.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dsi-bench-daemon-"))
    try:
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        daemon = NodeProcess(base / "node-health", env=ENV).start().wait_ready()
        try:
            fresh, kept = health_rates(daemon.client(), args.requests, args.rounds)
        finally:
            daemon.stop()
        print(f"GET /v1/health, one client thread: {fresh:,.0f} req/s with a connection per "
              f"request, {kept:,.0f} req/s on one kept-alive connection ({kept / fresh:.2f}x)")

        one, many, direct, cpu1, cpun = [], [], [], [], []
        for r in range(args.rounds):
            direct.append(queue_drain(base, f"q{r}", args.tasks))
            rate, cpu = daemon_drain(base, f"one{r}", args.tasks, 1)
            one.append(rate)
            cpu1.append(cpu)
            rate, cpu = daemon_drain(base, f"many{r}", args.tasks, args.workers)
            many.append(rate)
            cpun.append(cpu)
        q, o, m = (statistics.median(x) for x in (direct, one, many))
        print(f"claim -> complete of {args.tasks:,} zero-work tasks (medians of {args.rounds}):")
        print(f"  the queue directly, 1 process:     {q:7,.0f} tasks/s  <- reference")
        print(f"  1 dsi-node worker via the daemon:  {o:7,.0f} tasks/s  {o / q:.2f}x the queue; "
              f"daemon CPU {statistics.median(cpu1):,.0f} us/task")
        print(f"  {args.workers} dsi-node workers via the daemon: {m:7,.0f} tasks/s  "
              f"{m / q:.2f}x the queue, {m / o:.2f}x one worker; "
              f"daemon CPU {statistics.median(cpun):,.0f} us/task")
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
