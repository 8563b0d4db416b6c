"""One dsi P2P node as a separate OS process, for the multi-process tests and the benchmark.

    python tests/p2p_peer.py --role owner|worker|relay|watcher --cache-dir DIR [options]

Prints one JSON object per line on stdout ("ready" first, with peer_id and addrs) so a parent
process can follow it; stops on SIGTERM/SIGINT or when its job is done.

owner    submits --tasks N P2P_ELIGIBLE tasks (after --wait-peers peers joined the topic),
         prints "counts" while work is open and "all_done" once N are completed
worker   loops get_next_task -> (sleep --work-seconds) -> complete_task, --concurrency loops
relay    only relays gossip
watcher  prints "offer" with its arrival time for each offer it hears (announce latency)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from node.config import build_config
from node.errors import DatasetsError, PeerError
from node.p2p import Node, P2PSettings, open_node
from node.tasks._queue import MAX_BATCH

ECHO_PROTOCOL = "/dsi-bench/echo/1.0.0"


def emit(event: str, **fields: Any) -> None:
    """One JSON line: the event, wall time and this process's CPU seconds so far."""
    line = {"event": event, "t": time.time(), "cpu": time.process_time(), **fields}
    print(json.dumps(line), flush=True)


class TaskEvents:
    """A worker's per-task events ("claimed", "completed").

    Written at once by default. With ``batched`` (the throughput benchmark) they are
    buffered and flushed every ``FLUSH_EVERY`` seconds, without the CPU-time field: a
    flushed write and a CPU-clock syscall per event cost the harness as much CPU as a
    fifth of the task protocol itself, and that is not what the benchmark measures.
    """

    FLUSH_EVERY = 0.1

    def __init__(self, batched: bool) -> None:
        self.batched = batched
        self._lines: list[str] = []

    def emit(self, event: str, **fields: Any) -> None:
        if not self.batched:
            emit(event, **fields)
            return
        self._lines.append(json.dumps({"event": event, "t": time.time(), **fields}))

    def flush(self) -> None:
        if self._lines:
            sys.stdout.write("\n".join(self._lines) + "\n")
            sys.stdout.flush()
            self._lines.clear()

    async def flush_periodically(self) -> None:
        try:
            while True:
                await trio.sleep(self.FLUSH_EVERY)
                self.flush()
        finally:
            self.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--role", choices=["owner", "worker", "relay", "watcher"], required=True)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--allow", action="append", default=[])
    p.add_argument("--tasks", type=int, default=0)
    p.add_argument("--prefix", default="task")
    p.add_argument("--lease-seconds", type=float, default=60.0)
    p.add_argument("--wait-peers", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0, help="owner: wait before submitting")
    p.add_argument("--submit-interval", type=float, default=0.0)
    p.add_argument("--worker-id", default="worker")
    p.add_argument("--capabilities", default="")
    p.add_argument("--work-seconds", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--batch-events", action="store_true",
                   help="buffer per-task events, flushed every 0.1 s (benchmarks)")
    p.add_argument("--echo", action="store_true", help="also serve a raw echo protocol")
    p.add_argument("--reannounce", type=float, default=2.0)
    p.add_argument("--announce-rate", type=float, default=20.0)
    p.add_argument("--exit-when-done", action="store_true")
    p.add_argument("--max-seconds", type=float, default=600.0)
    return p.parse_args(argv)


def settings_for(args: argparse.Namespace) -> P2PSettings:
    return P2PSettings(
        request_timeout=5.0,
        dial_timeout=3.0,
        reap_interval=0.2,
        reannounce_interval=args.reannounce,
        reannounce_batch=16,
        max_announce_rate=args.announce_rate,
        bootstrap_backoff_initial=0.1,
        bootstrap_backoff_max=1.0,
        bootstrap_check_interval=0.2,
        list_min_interval=0.2,
        list_background_interval=1.0,
    )


async def echo_once(node: Node, peer: Any, payload: bytes, timeout: float = 10) -> bytes:
    """One round trip of the echo protocol on a new stream (the benchmark's raw reference)."""
    with trio.fail_after(timeout):
        stream = await node.host.new_stream(peer, [ECHO_PROTOCOL])
        await stream.write(payload)
        data = await stream.read(1024)
        await stream.close()
        return bytes(data)


async def echo_handler(stream: Any) -> None:
    try:
        with trio.fail_after(10):
            data = await stream.read(1024)
            await stream.write(data)
            await stream.close()
    except Exception:
        with trio.move_on_after(1):
            await stream.reset()


async def run_owner(node: Node, args: argparse.Namespace) -> None:
    if args.wait_peers:
        with trio.fail_after(60):
            while len(node.topic_peers()) < args.wait_peers:
                await trio.sleep(0.05)
    if args.delay:
        await trio.sleep(args.delay)
    n = args.tasks
    if n:
        emit("submitting", n=n)
        start = time.time()
        if args.submit_interval > 0:
            for i in range(n):
                submitted = time.time()
                await node.submit_task(
                    task_id=f"{args.prefix}-{i}", task_type="noop", data={"i": i},
                    tags=["P2P_ELIGIBLE"], lease_seconds=args.lease_seconds,
                )
                emit("submitted", task_id=f"{args.prefix}-{i}", at=submitted)
                await trio.sleep(args.submit_interval)
        else:  # all at once, in batches: one transaction each
            for first in range(0, n, MAX_BATCH):
                await node.submit_tasks(
                    {"task_id": f"{args.prefix}-{i}", "task_type": "noop", "data": {"i": i},
                     "tags": ["P2P_ELIGIBLE"], "lease_seconds": args.lease_seconds}
                    for i in range(first, min(first + MAX_BATCH, n))
                )
        emit("submitted_all", n=n, seconds=time.time() - start, start=start)
    # The queue's counts (a SQL aggregate) are read once a second, and at once when enough
    # tasks completed to finish the open work: polling them faster was a visible share of the
    # owner's CPU in the benchmark.
    completions = [0]

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "completed":
            completions[0] += 1

    node.tasks.add_listener(on_event)
    last: dict[str, int] | None = None
    seen, next_read = 0, 0.0
    while True:
        open_tasks = sum(last.values()) - last.get("completed", 0) if last else 0
        if last is None or trio.current_time() >= next_read or (
            open_tasks and completions[0] - seen >= open_tasks
        ):
            seen, next_read = completions[0], trio.current_time() + 1.0
            counts = await trio.to_thread.run_sync(node.tasks.counts)
            if counts != last:
                emit("counts", counts=counts)
                last = counts
            total = sum(counts.values())
            if total and counts.get("completed", 0) == total:
                emit("all_done", counts=counts, stats=dict(node.stats))
                if args.exit_when_done:
                    return
        await trio.sleep(0.02)


async def complete_with_retry(node: Node, task: dict[str, Any], result: Any) -> bool:
    """Report back; an unreachable owner (plain PeerError) is retried while the lease lives."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await node.complete_task(task["task_id"], result, lease_id=task["lease_id"])
            return True
        except PeerError as exc:
            if type(exc) is not PeerError or time.monotonic() > deadline:
                emit("complete_refused", task_id=task["task_id"], error=str(exc))
                return False
            emit("complete_retry", task_id=task["task_id"], error=str(exc))
            await trio.sleep(0.3)
        except DatasetsError as exc:
            emit("complete_refused", task_id=task["task_id"], error=str(exc))
            return False


async def run_worker(node: Node, args: argparse.Namespace) -> None:
    caps = [c for c in args.capabilities.split(",") if c]
    events = TaskEvents(batched=args.batch_events)

    async def loop(k: int) -> None:
        worker_id = f"{args.worker_id}-{k}"
        idle = 0.01
        while True:
            t0 = time.perf_counter()
            try:
                task = await node.get_next_task(worker_id, caps)
            except DatasetsError as exc:
                emit("get_error", error=str(exc))
                task = None
            node.stats["worker_get_ms"] += int((time.perf_counter() - t0) * 1000)
            if task is None:
                node.stats["worker_idle_polls"] += 1
                await trio.sleep(idle)
                idle = min(idle * 2, 0.2)
                continue
            idle = 0.01
            events.emit("claimed", task_id=task["task_id"], attempt=task["attempt"],
                        owner=task.get("owner"))
            if args.work_seconds:
                await trio.sleep(args.work_seconds)
            result = {"worker": worker_id, "peer": node.peer_id}
            t0 = time.perf_counter()
            ok = await complete_with_retry(node, task, result)
            node.stats["worker_complete_ms"] += int((time.perf_counter() - t0) * 1000)
            if ok:
                events.emit("completed", task_id=task["task_id"], attempt=task["attempt"])

    async with trio.open_nursery() as nursery:
        if events.batched:
            nursery.start_soon(events.flush_periodically)
        for k in range(args.concurrency):
            nursery.start_soon(loop, k)


async def run_watcher(node: Node) -> None:
    node.add_offer_listener(lambda offer: emit("offer", task_id=offer.task_id, at=time.time()))
    await trio.sleep_forever()


async def main(args: argparse.Namespace) -> None:
    cfg = build_config(
        {
            "cache_dir": args.cache_dir,
            "enable_p2p": True,
            "enable_provenance": False,
            "listen_addrs": [args.listen],
            "bootstrap_peers": args.bootstrap,
            "allowed_peers": args.allow,
        }
    )
    with trio.move_on_after(args.max_seconds):
        async with open_node(cfg, settings=settings_for(args)) as node:
            if args.echo:
                node.host.set_stream_handler(ECHO_PROTOCOL, echo_handler)
            emit("ready", peer_id=node.peer_id, addrs=node.listen_addrs())
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for _ in signals:
                            nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(stop_on_signal)
                if args.role == "owner":
                    await run_owner(node, args)
                elif args.role == "worker":
                    await run_worker(node, args)
                elif args.role == "watcher":
                    await run_watcher(node)
                else:
                    await trio.sleep_forever()
                nursery.cancel_scope.cancel()
            emit("stats", stats=dict(node.stats))
    emit("stopped")


def run(args: argparse.Namespace) -> None:
    """``DSI_PEER_PROFILE=PREFIX``: SIGUSR1 starts profiling the trio thread (cProfile), SIGUSR2
    stops it and writes PREFIX.<cache dir name>.prof - how the benchmark's CPU per task is
    analysed (the parent signals at the start and the end of the measured window)."""
    prefix = os.environ.get("DSI_PEER_PROFILE")
    if prefix:
        import cProfile

        profiler = cProfile.Profile()

        def start(*_: Any) -> None:
            profiler.enable()

        def stop(*_: Any) -> None:
            profiler.disable()
            profiler.dump_stats(f"{prefix}.{Path(args.cache_dir).name}.prof")

        signal.signal(signal.SIGUSR1, start)
        signal.signal(signal.SIGUSR2, stop)
    trio.run(main, args)


if __name__ == "__main__":
    run(parse_args())
