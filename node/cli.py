"""``dsi-node``: run a node, and talk to it.

Commands go through the running daemon's control API when one runs on the data directory;
when none does, the ones that need only local state (storage, provenance, the local task
queue: all multi-process safe) run in this process on the same directory, and the ones that
need the running host (``peers``) say that no daemon runs and how to start one.
``--json`` makes every command print machine-readable JSON (``logs``: one record per line).

Exit codes: 0 ok, 1 error, 2 usage error, 3 a daemon is needed and none runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from node.errors import DaemonNotRunningError, DatasetsError, InvalidArgumentError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3
_VERSION = "0.1.0"


# =========================================================================== parser
def _add_common(p: argparse.ArgumentParser, top: bool) -> None:
    """Options every command takes, before or after the command name."""
    d = None if top else argparse.SUPPRESS
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="machine-readable JSON output")
    p.add_argument("--cache-dir", metavar="PATH", default=d,
                   help="data directory (env DSI_CACHE_DIR; default ~/.cache/ipfs_accelerate)")
    p.add_argument("--config", metavar="FILE", default=d,
                   help="config file (env DSI_CONFIG; default <cache_dir>/config.toml)")
    p.add_argument("--ipfs-api", metavar="ADDR", default=d,
                   help="Kubo RPC API multiaddr or URL (env IPFS_API)")


def _add_node_flags(p: argparse.ArgumentParser, top: bool) -> None:
    """Flags for every other setting (run, init, config show, worker)."""
    d = None if top else argparse.SUPPRESS
    g = p.add_argument_group("node settings (override the config file and environment)")
    g.add_argument("--enable-p2p", dest="enable_p2p", action="store_const", const=True,
                   default=d, help="start the libp2p host")
    g.add_argument("--disable-p2p", dest="enable_p2p", action="store_const", const=False,
                   default=d, help="do not start the libp2p host")
    g.add_argument("--listen", dest="listen_addrs", action="append", metavar="MULTIADDR",
                   default=d, help="libp2p listen address (repeatable)")
    g.add_argument("--bootstrap", dest="bootstrap_peers", action="append",
                   metavar="MULTIADDR", default=d,
                   help="bootstrap peer, full multiaddr with /p2p/<id> (repeatable)")
    g.add_argument("--allow-peer", dest="allowed_peers", action="append", metavar="PEER_ID",
                   default=d, help="allow only these peers (repeatable)")
    g.add_argument("--capabilities", metavar="LIST", default=d,
                   help="comma-separated worker capabilities, e.g. GPU,CUDA")
    g.add_argument("--kubo-timeout", type=float, metavar="SECONDS", default=d)
    g.add_argument("--enable-audit", dest="enable_audit", action="store_const", const=True,
                   default=d)
    g.add_argument("--disable-audit", dest="enable_audit", action="store_const", const=False,
                   default=d)
    g.add_argument("--enable-provenance", dest="enable_provenance", action="store_const",
                   const=True, default=d)
    g.add_argument("--disable-provenance", dest="enable_provenance", action="store_const",
                   const=False, default=d)
    g.add_argument("--control-addr", metavar="HOST:PORT", default=d,
                   help="control API address, loopback only (0 as port: any free port)")
    g.add_argument("--shutdown-grace", type=float, metavar="SECONDS", default=d)
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=d)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsi-node",
        description="Run a dsi node (content-addressed storage, signed provenance, P2P task "
                    "queue) and talk to it.",
        epilog="Config precedence: TOML file < environment < flags; "
               "`dsi-node config show` prints each value's source.")
    parser.add_argument("--version", action="version", version=f"dsi-node {_VERSION}")
    _add_common(parser, top=True)
    _add_node_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def cmd(name: str, help: str, *, node_flags: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        _add_common(p, top=False)
        if node_flags:
            _add_node_flags(p, top=False)
        return p

    p = cmd("init", "create the identity key and a commented config file; print the "
            "addresses to give other machines", node_flags=True)
    p.add_argument("--force", action="store_true", help="rewrite an existing config file")
    cmd("run", "run the node until SIGINT/SIGTERM", node_flags=True)
    p = cmd("config", "show the effective configuration", node_flags=True)
    p.add_argument("action", choices=("show",))
    cmd("id", "this node's peer id and addresses")
    cmd("status", "node, storage, P2P and queue status (works with nothing running)")
    cmd("peers", "connected peers (needs the daemon with P2P on)")

    p = cmd("add", "add a file or directory to content-addressed storage")
    p.add_argument("path")
    p.add_argument("--cid-version", type=int, choices=(0, 1), default=0,
                   help="0: Qm... (default), 1: raw leaves, base32 bafy...")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the CID")
    _progress_flags(p)
    p = cmd("get", "write a file or directory CID to DEST (- for stdout)")
    p.add_argument("cid")
    p.add_argument("dest")
    _progress_flags(p)
    p = cmd("ls", "list a directory CID")
    p.add_argument("cid")
    p = cmd("pin", "pin, unpin, list pins")
    p.add_argument("action", choices=("add", "rm", "ls"))
    p.add_argument("cid", nargs="?")

    p = cmd("submit", "submit a task (from flags or a JSON file)")
    p.add_argument("--file", metavar="TASK.json",
                   help="JSON object with task_id, task_type, data, priority, tags, requires, "
                        "max_attempts, lease_seconds (flags override it)")
    p.add_argument("--id", dest="task_id", help="task id (default: a new random id)")
    p.add_argument("--type", dest="task_type", help="task type, e.g. inference")
    p.add_argument("--data", help="task data as JSON")
    p.add_argument("--data-file", metavar="FILE", help="task data from a JSON file")
    p.add_argument("--priority", type=int, help="0-10, higher first (default 5)")
    p.add_argument("--tag", dest="tags", action="append", metavar="TAG",
                   help="P2P_ELIGIBLE, GPU_PREFERRED, ... (repeatable)")
    p.add_argument("--requires", action="append", metavar="CAPABILITY",
                   help="hard requirement matched against worker capabilities (repeatable)")
    p.add_argument("--max-attempts", type=int)
    p.add_argument("--lease-seconds", type=float)
    p = cmd("tasks", "list tasks")
    p.add_argument("--state", choices=("pending", "claimed", "completed", "failed",
                                       "cancelled"))
    p.add_argument("--limit", type=int, default=100)
    p = cmd("task", "one task's status (remote tasks are asked from their owner)")
    p.add_argument("task_id")
    p.add_argument("--owner", metavar="PEER_ID",
                   help="ask this peer (the task's owner); needs the daemon with P2P on")
    p = cmd("cancel", "cancel a task")
    p.add_argument("task_id")

    p = cmd("logs", "query provenance records (newest first)")
    p.add_argument("--type", dest="record_type", help="record type, e.g. worker_execution")
    p.add_argument("--where", action="append", metavar="KEY=VALUE", default=[],
                   help="equality filter on a field (data.<name> or <name>); value parsed "
                        "as JSON when it can be (repeatable)")
    p.add_argument("--task-id", help="shortcut for --where task_id=ID")
    p.add_argument("--since", help="unix seconds or ISO 8601 time")
    p.add_argument("--until", help="unix seconds or ISO 8601 time")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--cid", help="show this one record (fetched from IPFS if not local)")
    p = cmd("verify", "verify one record, or this node's whole provenance chain")
    p.add_argument("cid", nargs="?")

    p = cmd("worker", "run tasks with a Python handler (claim -> execute -> complete)",
            node_flags=True)
    p.add_argument("--handler", required=True, metavar="MODULE:FUNCTION")
    p.add_argument("--app-dir", default=".", help="put this folder on sys.path (default .)")
    p.add_argument("--concurrency", "-n", type=int, default=1, help="tasks run at once")
    p.add_argument("--worker-id", help="default: <hostname>-<pid>")
    p.add_argument("--poll", type=float, default=1.0, metavar="SECONDS",
                   help="long-poll length of one claim")
    p.add_argument("--max-tasks", type=int, help="exit after claiming this many tasks")
    p.add_argument("--no-provenance", action="store_true",
                   help="do not record worker_execution provenance")
    return parser


def _progress_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", dest="progress", action="store_const", const=True,
                   default=None, help="always show a progress bar on stderr")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   help="never show one (default: on a terminal, for large transfers)")


# =========================================================================== context
class Ctx:
    """Parsed arguments, resolved settings and the node to talk to (lazily chosen)."""

    def __init__(self, args: argparse.Namespace) -> None:
        from node.daemon.settings import KEYS, load_settings

        self.args = args
        self.json: bool = bool(getattr(args, "json", False))
        # Each setting's flag stores into the dest named like the key (argparse dest).
        flags = {k.name: getattr(args, k.name, None) for k in KEYS}
        self.settings = load_settings(flags, config_path=getattr(args, "config", None))
        self.cfg = self.settings.node
        self._client: Any = None
        self._client_checked = False

    def client(self) -> Any | None:
        if not self._client_checked:
            from node.daemon.client import ControlClient

            self._client = ControlClient.connect(self.cfg)
            self._client_checked = True
        return self._client

    def ops(self, *, need_daemon: str | None = None) -> Any:
        """The daemon's client, else an in-process NodeAPI (or an error if ``need_daemon``)."""
        client = self.client()
        if client is not None:
            return client
        if need_daemon:
            from node.daemon.client import no_daemon_error

            raise no_daemon_error(self.cfg, need_daemon)
        from node.daemon.api import NodeAPI
        from node.services import acquire_services

        return NodeAPI(acquire_services(self.cfg), settings=self.settings)

    def out(self, value: Any, human: str | Callable[[], str]) -> None:
        if self.json:
            print(json.dumps(value, indent=2, default=str))
        else:
            text = human() if callable(human) else human
            if text:
                print(text)


# =========================================================================== formatting
def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r]
                                           for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    return "\n".join(lines)


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return _dt.datetime.fromtimestamp(float(ts)).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _short(text: Any, n: int = 60) -> str:
    s = text if isinstance(text, str) else json.dumps(text, separators=(",", ":"), default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return ""
    from node.daemon.progress import _fmt_bytes

    return _fmt_bytes(n)


def _parse_time(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgumentError(
            f"--{name} must be unix seconds or an ISO 8601 time (2025-01-31T12:00), "
            f"got {text!r}") from None
    if when.tzinfo is None:
        when = when.astimezone()  # a naive time means this machine's local time
    return when.timestamp()


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


# =========================================================================== commands
def cmd_init(ctx: Ctx) -> int:
    from node.daemon.runner import init_node

    info = init_node(ctx.settings, force=ctx.args.force)

    def human() -> str:
        lines = [
            f"peer id      {info['peer_id']}",
            f"data dir     {info['cache_dir']}"
            + ("" if info["identity_created"] else "  (existing identity kept)"),
            f"config file  {info['config_file']}"
            + ("" if info["config_written"] else "  (exists, kept; --force rewrites it)"),
            "",
            "Give other machines one of these as a bootstrap peer "
            "(bootstrap_peers in their config):",
        ]
        lines += [f"  {a}" for a in info["bootstrap_addrs"]]
        if info["port_chosen_at_start"]:
            lines.append("  (the port is chosen at start: run `dsi-node id` while the "
                         "daemon runs for the real one)")
        lines += ["", "Start the node with: dsi-node"
                  + (f" --cache-dir {info['cache_dir']}" if ctx.args.cache_dir else "")
                  + " run" + ("" if ctx.cfg.enable_p2p else " --enable-p2p")]
        return "\n".join(lines)

    ctx.out(info, human)
    return 0


def cmd_run(ctx: Ctx) -> int:
    from node.daemon.runner import run_daemon

    return run_daemon(ctx.settings)


def cmd_config(ctx: Ctx) -> int:
    rows = ctx.settings.describe()
    doc = {"config_file": str(ctx.settings.config_file) if ctx.settings.config_file else None,
           "settings": {r["key"]: {"value": r["value"], "source": r["source"]} for r in rows}}

    def human() -> str:
        head = (f"config file: {ctx.settings.config_file}" if ctx.settings.config_file
                else f"config file: none (looked for {ctx.cfg.cache_dir / 'config.toml'})")
        table = _table([(r["key"], _short(r["value"], 70), r["source"]) for r in rows],
                       ("KEY", "VALUE", "SOURCE"))
        return f"{head}\n{table}"

    ctx.out(doc, human)
    return 0


def cmd_id(ctx: Ctx) -> int:
    client = ctx.client()
    if client is not None:
        info = client.id()
        from node.daemon.runner import dialable_addrs

        info["addrs"] = dialable_addrs(info.get("addrs", []), info["peer_id"]) \
            if info.get("addrs") else []
        info["daemon"] = True
    else:
        if not ctx.cfg.identity_path.exists():
            raise DatasetsError(
                f"no identity in {ctx.cfg.cache_dir} yet; create one with `dsi-node init`")
        from node.identity import load_or_create_identity

        peer_id = load_or_create_identity(ctx.cfg.identity_path).peer_id
        info = {"peer_id": peer_id, "addrs": [], "p2p": False, "daemon": False}

    def human() -> str:
        lines = [info["peer_id"]]
        lines += [f"  {a}" for a in info["addrs"]]
        if not info["daemon"]:
            lines.append("(no daemon running: addresses are known once `dsi-node run "
                         "--enable-p2p` runs)")
        elif not info.get("p2p"):
            lines.append("(P2P is off on the running daemon: no addresses)")
        return "\n".join(lines)

    ctx.out(info, human)
    return 0


def cmd_status(ctx: Ctx) -> int:
    client = ctx.client()
    if client is not None:
        st = client.status()
    else:
        from node.daemon.api import node_status
        from node.services import acquire_services

        st = node_status(acquire_services(ctx.cfg), settings=ctx.settings, create=False)

    def human() -> str:
        d = st.get("daemon") or {}
        if d.get("running"):
            up = time.time() - float(d.get("started_at") or time.time())
            daemon = f"running (pid {d.get('pid')}, control {d.get('control_url')}, " \
                     f"up {int(up)} s)"
        else:
            daemon = "not running (start it with `dsi-node run`)"
        s = st.get("storage") or {}
        if s.get("kubo_available"):
            storage = f"local + Kubo at {s.get('ipfs_api')} ({s.get('kubo_agent') or '?'})"
        else:
            storage = f"local only (no Kubo RPC API answers at {s.get('ipfs_api')})"
        if s.get("error"):
            storage += f"\n             error: {s['error']}"
        p = st.get("p2p") or {}
        if p.get("running"):
            peers = p.get("connected_peers") or []
            p2p = f"on, {len(peers)} connected peer(s), {len(p.get('mesh_peers') or [])} in " \
                  "the task mesh"
            for addr in p.get("listen_addrs") or []:
                p2p += f"\n             {addr}"
        else:
            p2p = "enabled in config, daemon not running" if p.get("enabled") else "off"
        counts = st.get("tasks") or {}
        tasks = ", ".join(f"{k} {v}" for k, v in counts.items()) or "none yet"
        prov = st.get("provenance") or {}
        return "\n".join([
            f"dsi-node     {st.get('version')}",
            f"peer id      {st.get('peer_id') or 'none yet (run `dsi-node init`)'}",
            f"data dir     {st.get('cache_dir')}",
            f"daemon       {daemon}",
            f"storage      {storage}",
            f"p2p          {p2p}",
            f"tasks        {tasks}",
            f"provenance   {prov.get('records', prov.get('error', '?'))} record(s)",
        ])

    ctx.out(st, human)
    return 0


def cmd_peers(ctx: Ctx) -> int:
    info = ctx.ops(need_daemon="`dsi-node peers`").peers()

    def human() -> str:
        peers = info.get("peers") or []
        if not peers:
            return "no connected peers"
        rows = [(p.get("peer_id"), "yes" if p.get("mesh") else "no", p.get("bootstrap") or "")
                for p in peers]
        return _table(rows, ("PEER ID", "TASK MESH", "BOOTSTRAP ADDRESS"))

    ctx.out(info, human)
    return 0


def cmd_add(ctx: Ctx) -> int:
    from node.daemon.progress import Progress
    from node.errors import PathNotFoundError

    args = ctx.args
    src = Path(args.path).expanduser().resolve()
    if not src.exists():
        raise PathNotFoundError(f"{args.path} does not exist")
    client = ctx.client()
    if client is not None and src.is_dir():
        # The daemon reads the folder itself (same machine); no byte count comes back.
        info = client.add(str(src), cid_version=args.cid_version, pin=args.pin)
    else:
        total = src.stat().st_size if src.is_file() else _tree_size(src)
        with Progress.for_transfer(total, f"add {src.name}", args.progress) as bar:
            if client is not None:  # stream the file's bytes to the daemon
                with src.open("rb") as fh:
                    info = client.add_stream(fh, total, cid_version=args.cid_version,
                                             pin=args.pin, name=src.name,
                                             progress=bar.update)
            else:
                info = ctx.ops().add_local(src, cid_version=args.cid_version, pin=args.pin,
                                           progress=bar.update)

    def human() -> str:
        if args.quiet:
            return str(info["cid"])
        note = "" if info.get("kubo") else "  (stored locally; Kubo not reachable, " \
                                           "pushed when it answers)"
        return f"added {info['cid']} {info.get('name') or src.name}{note}"

    ctx.out(info, human)
    return 0


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def cmd_get(ctx: Ctx) -> int:
    from node.daemon.progress import Progress

    args = ctx.args
    ops = ctx.ops()
    info = ops.stat(args.cid)
    size = info.get("size") if isinstance(info.get("size"), int) else None
    is_dir = info.get("type") == "directory"
    label = f"get {args.cid[:16]}"
    if args.dest == "-":
        if is_dir:
            raise InvalidArgumentError(f"{args.cid} is a directory; give a DEST path, not -")
        with _opened(ops, args.cid) as (length, chunks), \
                Progress.for_transfer(length or size, label, args.progress) as bar:
            out = sys.stdout.buffer
            for chunk in chunks:
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
        return 0
    dest = Path(args.dest).expanduser().resolve()
    # Like the storage layer: a file goes into a folder that exists or is named "out/".
    if not is_dir and (args.dest.endswith(("/", os.sep)) or dest.is_dir()):
        dest = dest / args.cid
    if ctx.client() is None:  # in-process: the storage layer reports bytes written
        with Progress.for_transfer(None if is_dir else size, label, args.progress) as bar:
            result = ops.get_local(args.cid, dest, progress=bar.update)
    elif is_dir:
        result = ops.get(args.cid, str(dest))
    else:
        with _opened(ops, args.cid) as (length, chunks), \
                Progress.for_transfer(length or size, label, args.progress) as bar:
            _write_atomic(dest, chunks, bar.update)
        result = {"cid": args.cid, "dest": str(dest)}
    ctx.out(result, f"saved {args.cid} to {result['dest']}")
    return 0


@contextlib.contextmanager
def _opened(ops: Any, cid: str) -> Iterator[tuple[int | None, Iterator[bytes]]]:
    """Uniform streaming over the daemon client and the in-process API."""
    from node.daemon.api import NodeAPI

    if isinstance(ops, NodeAPI):
        size, chunks = ops.open_file(cid)
        try:
            yield size, chunks
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        return
    with ops.open_file(cid) as (size, resp):
        def gen() -> Iterator[bytes]:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    return
                yield chunk
        yield size, gen()


def _write_atomic(dest: Path, chunks: Any, progress: Callable[[int], None]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                progress(len(chunk))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_ls(ctx: Ctx) -> int:
    info = ctx.ops().ls(ctx.args.cid)
    entries = info.get("entries") or []
    ctx.out(info, lambda: _table(
        [(e.get("name"), e.get("type"), _size(e.get("size")), e.get("cid")) for e in entries],
        ("NAME", "TYPE", "SIZE", "CID")) if entries else "(empty directory)")
    return 0


def cmd_pin(ctx: Ctx) -> int:
    ops = ctx.ops()
    action, cid = ctx.args.action, ctx.args.cid
    if action in ("add", "rm") and not cid:
        raise InvalidArgumentError(f"`dsi-node pin {action}` needs a CID")
    if action == "add":
        info = ops.pin_add(cid)
        ctx.out(info, f"pinned {cid}")
    elif action == "rm":
        info = ops.pin_rm(cid)
        ctx.out(info, f"unpinned {cid}")
    else:
        info = ops.pin_ls()
        ctx.out(info, lambda: "\n".join(f"{p['cid']} {p.get('type', '')}".rstrip()
                                        for p in info["pins"]) or "(no pins)")
    return 0


_TASK_KEYS = ("task_id", "task_type", "data", "priority", "tags", "requires", "max_attempts",
              "lease_seconds")


def cmd_submit(ctx: Ctx) -> int:
    args = ctx.args
    body: dict[str, Any] = {}
    if args.file:
        try:
            body = json.loads(Path(args.file).read_text("utf-8"))
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read {args.file}: {exc}") from None
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InvalidArgumentError(f"{args.file} is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise InvalidArgumentError(f"{args.file} must hold a JSON object")
        if "type" in body and "task_type" not in body:
            body["task_type"] = body.pop("type")
        if "id" in body and "task_id" not in body:
            body["task_id"] = body.pop("id")
        unknown = sorted(set(body) - set(_TASK_KEYS))
        if unknown:
            raise InvalidArgumentError(
                f"{args.file}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_TASK_KEYS)}")
    if args.data is not None and args.data_file is not None:
        raise InvalidArgumentError("give --data or --data-file, not both")
    if args.data is not None:
        try:
            body["data"] = json.loads(args.data)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InvalidArgumentError(f"--data is not valid JSON: {exc}") from None
    if args.data_file is not None:
        try:
            body["data"] = json.loads(Path(args.data_file).read_text("utf-8"))
        except (OSError, json.JSONDecodeError, RecursionError) as exc:
            raise InvalidArgumentError(f"--data-file {args.data_file}: {exc}") from None
    for key in ("task_id", "task_type", "priority", "tags", "requires", "max_attempts",
                "lease_seconds"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    if not body.get("task_type"):
        raise InvalidArgumentError("a task needs a type: --type TYPE (or task_type in --file)")
    body.setdefault("task_id", f"task-{uuid.uuid4().hex[:16]}")
    body.setdefault("data", {})
    status = ctx.ops().submit(**body)
    ctx.out(status, lambda: f"submitted {status['task_id']} ({status['status']})")
    return 0


def cmd_tasks(ctx: Ctx) -> int:
    info = ctx.ops().tasks(state=ctx.args.state, limit=ctx.args.limit)
    tasks = info.get("tasks") or []

    def human() -> str:
        if not tasks:
            return "no tasks" + (f" in state {ctx.args.state}" if ctx.args.state else "")
        table = _table(
            [(t["task_id"], t["status"], t["task_type"], t["priority"], t["attempt"],
              t.get("worker_id") or "", _when(t.get("updated_at"))) for t in tasks],
            ("ID", "STATE", "TYPE", "PRI", "ATTEMPT", "WORKER", "UPDATED"))
        if len(tasks) >= ctx.args.limit:
            table += f"\n(the first {len(tasks)}; there may be more: --limit N shows N)"
        return table

    ctx.out(info, human)
    return 0


def cmd_task(ctx: Ctx) -> int:
    st = ctx.ops(need_daemon="--owner" if ctx.args.owner else None).task(
        ctx.args.task_id, owner=ctx.args.owner)

    def human() -> str:
        lines = []
        for key in ("task_id", "status", "task_type", "priority", "attempt", "max_attempts",
                    "worker_id", "owner", "tags", "requires", "result_cid", "error"):
            if key in st and st[key] not in (None, [], ""):
                lines.append(f"{key:<13}{_short(st[key], 200)}")
        for key in ("submitted_at", "claimed_at", "completed_at", "updated_at"):
            if st.get(key):
                lines.append(f"{key:<13}{_when(st[key])}")
        if "data" in st:  # a remote task's status has none: the owner keeps it
            lines.append(f"{'data':<13}{_short(st['data'], 200)}")
        if st.get("result") is not None:
            lines.append("result")
            lines += ["  " + line for line in json.dumps(st["result"], indent=2).splitlines()]
        return "\n".join(lines)

    ctx.out(st, human)
    return 0


def cmd_cancel(ctx: Ctx) -> int:
    st = ctx.ops().cancel(ctx.args.task_id)
    ctx.out(st, f"{st['task_id']}: {st['status']}")
    return 0


_RESERVED = ("type", "ts", "node", "seq", "sig", "prev", "cid", "input_cid", "output_cid")


def cmd_logs(ctx: Ctx) -> int:
    args = ctx.args
    ops = ctx.ops()
    if args.cid:
        records = [ops.record(args.cid)]
    else:
        filters: dict[str, Any] = {}
        if args.record_type:
            filters["type"] = args.record_type
        if args.task_id:
            filters["task_id"] = args.task_id
        for item in args.where:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidArgumentError(f"--where must be KEY=VALUE, got {item!r}")
            filters[key] = _json_value(value)
        records = ops.logs(filters, limit=args.limit, since=_parse_time(args.since, "since"),
                           until=_parse_time(args.until, "until"))["records"]
    if ctx.json:  # JSON lines: one record per line, easy to stream into jq
        for r in records:
            print(json.dumps(r, separators=(",", ":"), default=str))
        return 0
    if not records:
        print("no matching records")
        return 0
    rows = []
    for r in records:
        fields = {k: v for k, v in r.items() if k not in _RESERVED}
        ts = r.get("ts")
        rows.append((_when(ts / 1000 if isinstance(ts, (int, float)) else None),
                     r.get("type"), str(r.get("node", ""))[-8:], r.get("cid"),
                     _short(fields, 70)))
    print(_table(rows, ("TIME", "TYPE", "NODE", "CID", "FIELDS")))
    return 0


def cmd_verify(ctx: Ctx) -> int:
    from node.errors import VerificationError

    try:
        res = ctx.ops().verify(ctx.args.cid)
    except VerificationError as exc:
        doc = {"ok": False, "cid": getattr(exc, "cid", None), "error": str(exc)}
        if ctx.json:
            print(json.dumps(doc, indent=2))
        else:
            print(f"FAILED: {exc}", file=sys.stderr)
        return EXIT_ERROR

    def human() -> str:
        if ctx.args.cid:
            return f"ok: record {res.get('cid')} (node {res.get('node')}, seq {res.get('seq')}) " \
                   "verifies"
        return f"ok: chain of {res.get('records')} record(s) by {res.get('node')} verifies" + (
            f" (head {res['head']})" if res.get("head") else "")

    ctx.out(res, human)
    return 0


def cmd_worker(ctx: Ctx) -> int:
    from node.daemon.runner import configure_logging
    from node.worker import load_handler, serve

    args = ctx.args
    configure_logging(ctx.settings["log_level"])
    handler = load_handler(args.handler, args.app_dir)
    stats = serve(handler, ctx.settings, capabilities=list(ctx.settings["capabilities"]),
                  concurrency=args.concurrency, worker_id=args.worker_id,
                  poll_interval=args.poll, max_tasks=args.max_tasks,
                  record_provenance=not args.no_provenance)
    ctx.out(stats.as_dict(), "")
    return 0


COMMANDS: dict[str, Callable[[Ctx], int]] = {
    "init": cmd_init, "run": cmd_run, "config": cmd_config, "id": cmd_id,
    "status": cmd_status, "peers": cmd_peers, "add": cmd_add, "get": cmd_get, "ls": cmd_ls,
    "pin": cmd_pin, "submit": cmd_submit, "tasks": cmd_tasks, "task": cmd_task,
    "cancel": cmd_cancel, "logs": cmd_logs, "verify": cmd_verify, "worker": cmd_worker,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ctx = Ctx(args)
        return COMMANDS[args.command](ctx)
    except DaemonNotRunningError as exc:
        print(f"dsi-node: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except DatasetsError as exc:
        print(f"dsi-node: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("dsi-node: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dsi-node logs | head`
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
