"""The CLI commands as real processes, in-process (no daemon) and through a running daemon."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.daemon.testing import NodeProcess, free_port, run_cli, run_cli_json

HELLO_V0 = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
HELLO_V1 = "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"


class Mode:
    def __init__(self, name: str, data: Path, env: dict[str, str]) -> None:
        self.name = name
        self.data = data
        self.env = env

    def run(self, *args: str, **kw: Any) -> Any:
        return run_cli("--cache-dir", str(self.data), *args, env=self.env, **kw)

    def json(self, *args: str, **kw: Any) -> Any:
        return run_cli_json("--cache-dir", str(self.data), *args, env=self.env, **kw)


@pytest.fixture(scope="module", params=["local", "daemon"])
def mode(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Mode]:
    data = tmp_path_factory.mktemp(request.param) / "node"
    env = {"IPFS_API": f"/ip4/127.0.0.1/tcp/{free_port()}"}
    proc = None
    if request.param == "daemon":
        proc = NodeProcess(data, env=env).start().wait_ready()
    try:
        yield Mode(request.param, data, env)
    finally:
        if proc is not None:
            proc.stop()


def test_daemon_is_used_when_running(mode: Mode) -> None:
    st = mode.json("status")
    assert st["daemon"]["running"] is (mode.name == "daemon")


def test_add_get_ls_pin(mode: Mode, tmp_path: Path) -> None:
    hello = tmp_path / "hello.txt"
    hello.write_bytes(b"hello world\n")
    assert mode.run("add", str(hello), "-q").stdout.strip() == HELLO_V0
    info = mode.json("add", str(hello), "--cid-version", "1")
    assert info["cid"] == HELLO_V1 and info["kubo"] is False and info["name"] == "hello.txt"
    human = mode.run("add", str(hello)).stdout
    assert human.startswith(f"added {HELLO_V0} hello.txt") and "stored locally" in human
    # A multi-chunk file with a forced progress bar: the bar goes to stderr, never stdout.
    big = tmp_path / "big.bin"
    payload = os.urandom(2 << 20)
    big.write_bytes(payload)
    res = mode.run("add", str(big), "-q", "--progress")
    big_cid = res.stdout.strip()
    assert big_cid.startswith("Qm") and "100.0%" in res.stderr and "MiB" in res.stderr
    out = tmp_path / "out.bin"
    got = mode.json("get", big_cid, str(out), "--no-progress")
    assert got["dest"] == str(out) and out.read_bytes() == payload
    res = mode.run("get", big_cid, str(tmp_path / "out2.bin"), "--progress")
    assert "100.0%" in res.stderr and (tmp_path / "out2.bin").read_bytes() == payload
    assert mode.run("get", HELLO_V0, "-").stdout == "hello world\n"
    # "DIR/" names a folder (created if missing): the file goes into it, named by its CID.
    into = mode.json("get", HELLO_V0, f"{tmp_path / 'fresh'}/", "--no-progress")
    assert into["dest"] == str(tmp_path / "fresh" / HELLO_V0)
    assert (tmp_path / "fresh" / HELLO_V0).read_bytes() == b"hello world\n"
    # Folders: add, ls, get.
    folder = tmp_path / "ds"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a\n")
    (folder / "sub" / "b.txt").write_text("b\n")
    dcid = mode.json("add", str(folder))["cid"]
    entries = mode.json("ls", dcid)["entries"]
    assert [(e["name"], e["type"]) for e in entries] == [("a.txt", "file"), ("sub", "directory")]
    table = mode.run("ls", dcid).stdout.splitlines()
    assert table[0].split() == ["NAME", "TYPE", "SIZE", "CID"] and len(table) == 3
    mode.run("get", dcid, str(tmp_path / "ds-out"))
    assert (tmp_path / "ds-out" / "sub" / "b.txt").read_text() == "b\n"
    # Pins.
    pins = {p["cid"] for p in mode.json("pin", "ls")["pins"]}
    assert {HELLO_V0, big_cid, dcid} <= pins
    mode.run("pin", "rm", big_cid)
    assert big_cid not in {p["cid"] for p in mode.json("pin", "ls")["pins"]}
    assert mode.json("pin", "add", big_cid)["pinned"] is True
    # Errors: clear message, exit code 1, nothing on stdout.
    bad = mode.run("ls", "not-a-cid", check=False)
    assert bad.returncode == 1 and "not a valid CID" in bad.stderr and bad.stdout == ""
    missing = mode.run("add", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    absent = mode.run("get", "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
                      str(tmp_path / "x"), check=False)
    assert absent.returncode == 1 and "not in the local store" in absent.stderr


def test_tasks_submit_list_show_cancel(mode: Mode, tmp_path: Path) -> None:
    st = mode.json("submit", "--id", f"t-{mode.name}", "--type", "inference", "--data",
                   '{"model": "bert", "batch_size": 32}', "--priority", "8", "--tag",
                   "P2P_ELIGIBLE", "--tag", "GPU_PREFERRED", "--requires", "CUDA")
    assert st["status"] == "pending" and st["priority"] == 8
    assert st["tags"] == ["GPU_PREFERRED", "P2P_ELIGIBLE"] and st["requires"] == ["CUDA"]
    spec = tmp_path / "task.json"
    spec.write_text(json.dumps({"task_id": f"f-{mode.name}", "task_type": "echo",
                                "data": {"x": 1}, "priority": 2}))
    from_file = mode.json("submit", "--file", str(spec), "--priority", "3")
    assert from_file["priority"] == 3 and from_file["data"] == {"x": 1}  # flags win
    generated = mode.json("submit", "--type", "echo")
    assert generated["task_id"].startswith("task-")
    same = mode.run("submit", "--file", str(spec), "--priority", "3").stdout
    assert same.strip() == f"submitted f-{mode.name} (pending)"  # idempotent
    conflict = mode.run("submit", "--file", str(spec), "--priority", "9", check=False)
    assert conflict.returncode == 1 and "different body" in conflict.stderr
    listed = mode.json("tasks", "--state", "pending")["tasks"]
    assert {f"t-{mode.name}", f"f-{mode.name}"} <= {t["task_id"] for t in listed}
    table = mode.run("tasks").stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "STATE", "TYPE"] and "--limit" not in table[-1]
    cut = mode.run("tasks", "--limit", "1").stdout.splitlines()
    assert len(cut) == 3 and cut[-1] == "(the first 1; there may be more: --limit N shows N)"
    one = mode.json("task", f"t-{mode.name}")
    assert one["data"] == {"model": "bert", "batch_size": 32}
    assert "status       pending" in mode.run("task", f"t-{mode.name}").stdout
    assert mode.json("cancel", f"f-{mode.name}")["status"] == "cancelled"
    assert mode.json("tasks", "--state", "cancelled")["tasks"][0]["task_id"] == f"f-{mode.name}"
    unknown = mode.run("task", "no-such-task", check=False)
    assert unknown.returncode == 1 and "no task with id 'no-such-task'" in unknown.stderr
    bad = mode.run("submit", "--type", "x", "--data", "{oops", check=False)
    assert bad.returncode == 1 and "--data is not valid JSON" in bad.stderr
    bad = mode.run("submit", "--type", "x", "--priority", "11", check=False)
    assert bad.returncode == 1 and "priority" in bad.stderr


def test_worker_logs_and_verify(mode: Mode) -> None:
    tid = f"wc-{mode.name}"
    mode.run("submit", "--id", tid, "--type", "wordcount", "--priority", "10", "--data",
             '{"text": "a rose is a rose"}')
    stats = mode.json("worker", "--handler", "examples.echo_worker:handle", "--max-tasks", "1",
                      "--capabilities", "CPU", "--worker-id", f"cli-{mode.name}",
                      "--poll", "0.2")
    assert stats["completed"] == 1
    st = mode.json("task", tid)
    assert st["status"] == "completed" and st["result"]["output"]["words"] == 5
    prov = st["result"]["provenance_cid"]
    # logs: JSON lines, filters, one record by CID, and the table.
    lines = mode.run("logs", "--type", "worker_execution", "--task-id", tid,
                     "--json").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["cid"] for r in records] == [prov]
    assert records[0]["worker_id"] == f"cli-{mode.name}"
    assert mode.json("logs", "--cid", prov)["data"]["status"] == "completed"
    by_field = mode.run("logs", "--where", "worker_id=" + f"cli-{mode.name}",
                        "--json").stdout.splitlines()
    assert len(by_field) == 1
    assert mode.run("logs", "--where", "worker_id=nobody").stdout.strip() == \
        "no matching records"
    table = mode.run("logs", "--since", "2000-01-01T00:00").stdout.splitlines()
    assert table[0].split()[:3] == ["TIME", "TYPE", "NODE"] and len(table) >= 2
    assert mode.run("logs", "--since", "yesterday", check=False).returncode == 1
    # verify: the whole chain, and one record.
    chain = mode.json("verify")
    assert chain["ok"] is True and chain["records"] >= 1
    assert mode.json("verify", prov)["ok"] is True
    assert mode.run("verify").stdout.startswith("ok: chain of")


def test_help_and_usage_errors() -> None:
    res = run_cli("--help")
    for command in ("init", "run", "status", "peers", "add", "get", "ls", "pin", "submit",
                    "tasks", "task", "cancel", "logs", "verify", "config", "worker", "id"):
        assert command in res.stdout
    assert run_cli("frobnicate", check=False).returncode == 2
    assert run_cli("--version").stdout.startswith("dsi-node ")
