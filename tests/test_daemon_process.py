"""`dsi-node init` / `run` as real processes: lock, control file, signals, held leases."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.daemon.testing import NodeProcess, free_port, run_cli, run_cli_json

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture
def no_kubo() -> dict[str, str]:
    """A closed port as the Kubo API: nothing answers there, quickly and for sure."""
    return {"IPFS_API": f"/ip4/127.0.0.1/tcp/{free_port()}"}


@pytest.fixture
def daemons() -> Iterator[Callable[..., NodeProcess]]:
    started: list[NodeProcess] = []

    def start(cache_dir: Path, *args: str, env: dict[str, str] | None = None,
              ready: bool = True) -> NodeProcess:
        proc = NodeProcess(cache_dir, args, env).start()
        started.append(proc)
        return proc.wait_ready() if ready else proc

    yield start
    for proc in started:
        proc.stop()


def test_status_with_nothing_running(tmp_path: Path, no_kubo: dict[str, str]) -> None:
    data = tmp_path / "fresh"
    st = run_cli_json("--cache-dir", str(data), "status", env=no_kubo)
    assert st["daemon"] == {"running": False}
    assert st["peer_id"] is None  # nothing created: no identity until init or first use
    assert st["storage"]["kubo_available"] is False
    assert st["p2p"] == {"enabled": False, "running": False}
    human = run_cli("--cache-dir", str(data), "status", env=no_kubo).stdout
    assert "not running (start it with `dsi-node run`)" in human
    assert "local only" in human


def test_init_writes_key_config_and_prints_bootstrap_addrs(tmp_path: Path) -> None:
    data = tmp_path / "a"
    out = run_cli_json("--cache-dir", str(data), "init", "--listen", "/ip4/127.0.0.1/tcp/4999",
                       "--capabilities", "GPU,CUDA")
    peer = out["peer_id"]
    assert peer.startswith("12D3KooW") and out["identity_created"] and out["config_written"]
    assert out["bootstrap_addrs"] == [f"/ip4/127.0.0.1/tcp/4999/p2p/{peer}"]
    assert (data / "identity.key").stat().st_mode & 0o777 == 0o600
    assert (data / "control.token").stat().st_mode & 0o777 == 0o600
    text = (data / "config.toml").read_text()
    assert text.startswith("# dsi-node configuration")
    assert tomllib.loads(text) == {"listen_addrs": ["/ip4/127.0.0.1/tcp/4999"],
                                   "capabilities": ["GPU", "CUDA"]}
    # Again: the key and the file are kept; the same id is printed.
    again = run_cli_json("--cache-dir", str(data), "init")
    assert again["peer_id"] == peer
    assert not again["identity_created"] and not again["config_written"]
    human = run_cli("--cache-dir", str(data), "init").stdout
    assert f"/ip4/127.0.0.1/tcp/4999/p2p/{peer}" in human and "bootstrap" in human
    # 0.0.0.0 becomes this machine's addresses, each with the peer id.
    wild = run_cli_json("--cache-dir", str(tmp_path / "b"), "init")
    assert wild["bootstrap_addrs"]
    assert all(a.endswith(f"/tcp/4001/p2p/{wild['peer_id']}") and "0.0.0.0" not in a
               for a in wild["bootstrap_addrs"])


def test_config_show_precedence(tmp_path: Path) -> None:
    data = tmp_path / "n"
    data.mkdir()
    (data / "config.toml").write_text(
        'ipfs_api = "/ip4/127.0.0.1/tcp/6001"\ncapabilities = ["CPU"]\nlog_level = "warning"\n')
    env = {"DSI_CACHE_DIR": str(data), "DSI_CAPABILITIES": "GPU", "IPFS_API":
           "/ip4/127.0.0.1/tcp/7001"}
    doc = run_cli_json("config", "show", "--ipfs-api", "/ip4/127.0.0.1/tcp/8001", env=env)
    s = doc["settings"]
    assert doc["config_file"] == str((data / "config.toml").resolve())
    assert s["ipfs_api"] == {"value": "/ip4/127.0.0.1/tcp/8001", "source": "flag:--ipfs-api"}
    assert s["capabilities"] == {"value": ["GPU"], "source": "env:DSI_CAPABILITIES"}
    assert s["log_level"] == {"value": "warning",
                              "source": f"file:{(data / 'config.toml').resolve()}"}
    assert s["enable_p2p"] == {"value": False, "source": "default"}
    human = run_cli("config", "show", env=env).stdout
    assert "env:DSI_CAPABILITIES" in human and "file:" in human
    bad = run_cli("config", "show", env={**env, "DSI_ENABLE_P2P": "sometimes"}, check=False)
    assert bad.returncode == 1
    assert "enable_p2p must be a boolean" in bad.stderr and "env:DSI_ENABLE_P2P" in bad.stderr


@pytest.mark.slow
def test_run_lock_control_file_and_clean_stop(tmp_path: Path, no_kubo: dict[str, str],
                                              daemons: Callable[..., NodeProcess]) -> None:
    data = tmp_path / "node"
    first = daemons(data, env=no_kubo)
    info = json.loads((data / "control.json").read_text())
    assert info["pid"] == first.pid and info["url"].startswith("http://127.0.0.1:")
    assert (data / "control.token").stat().st_mode & 0o777 == 0o600
    assert "control API on http://127.0.0.1:" in first.log()
    st = run_cli_json("--cache-dir", str(data), "status", env=no_kubo)
    assert st["daemon"]["running"] is True and st["daemon"]["pid"] == first.pid
    # A second run on the same directory is refused, clearly, and leaves the first alone.
    second = run_cli("--cache-dir", str(data), "run", "--control-addr", "127.0.0.1:0",
                     env=no_kubo, check=False, timeout=60)
    assert second.returncode == 1
    assert f"another dsi-node run (pid {first.pid}) is already using" in second.stderr
    assert first.client().health()["pid"] == first.pid
    # SIGTERM: clean exit, control file gone, lock released (a new run starts).
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    assert not (data / "control.json").exists()
    assert "stopped" in first.log()
    gone = run_cli("--cache-dir", str(data), "peers", env=no_kubo, check=False)
    assert gone.returncode == 3 and "no" in gone.stderr and "dsi-node run" in gone.stderr
    third = daemons(data, env=no_kubo)
    third.signal(signal.SIGINT)
    assert third.wait(timeout=30) == 0


@pytest.mark.slow
def test_stop_hands_back_leases_held_through_the_daemon(
        tmp_path: Path, no_kubo: dict[str, str], daemons: Callable[..., NodeProcess]) -> None:
    data = tmp_path / "node"
    proc = daemons(data, "--shutdown-grace", "0.5", env=no_kubo)
    client = proc.client()
    client.submit("held-1", "x", {}, lease_seconds=600)
    client.submit("done-1", "x", {}, priority=9)
    done = client.claim("w", [])
    assert done is not None and done["task_id"] == "done-1"
    client.complete("done-1", done["lease_id"], {"ok": True})
    grant = client.claim("w", [])
    assert grant is not None and grant["task_id"] == "held-1"
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "handed back 1 leased task(s): held-1" in proc.log()
    # Without a daemon the CLI reads the same queue in-process.
    st = run_cli_json("--cache-dir", str(data), "task", "held-1", env=no_kubo)
    assert st["status"] == "pending" and st["attempt"] == 2
    assert "stopped before the task finished" in st["error"]
    assert run_cli_json("--cache-dir", str(data), "task", "done-1",
                        env=no_kubo)["status"] == "completed"


def test_control_port_in_use_is_a_clear_error(tmp_path: Path, no_kubo: dict[str, str]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_cli("--cache-dir", str(tmp_path / "n"), "run", "--control-addr",
                      f"127.0.0.1:{port}", env=no_kubo, check=False, timeout=60)
    assert res.returncode == 1
    assert f"cannot listen on control_addr 127.0.0.1:{port}" in res.stderr
    assert not (tmp_path / "n" / "control.json").exists()
