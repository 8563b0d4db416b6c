"""Daemon settings: TOML file < environment < flags, each value's source, validation, docs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from node.daemon.settings import KEYS, load_settings, parse_control_addr, render_config_file
from node.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PEER = "12D3KooWGUiVifcHK8FRtSEX6UkwBpmHkLW6nAXewoMG2MLePrjn"
REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, "utf-8")
    return path


def test_defaults_without_file(tmp_path: Path) -> None:
    s = load_settings({"cache_dir": str(tmp_path)}, environ={})
    assert s.config_file is None
    assert s.sources["cache_dir"] == "flag:--cache-dir"
    assert all(s.sources[k.name] == "default" for k in KEYS if k.name != "cache_dir")
    assert s.node.enable_p2p is False
    assert (s.control_host, s.control_port) == ("127.0.0.1", 5080)
    assert s.node.cache_dir == tmp_path.resolve()


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    cfg_file = write(tmp_path / "config.toml", f"""
ipfs_api = "/ip4/127.0.0.1/tcp/6001"
capabilities = ["CPU"]
enable_p2p = true
listen_addrs = ["/ip4/127.0.0.1/tcp/4101"]
bootstrap_peers = ["/ip4/127.0.0.1/tcp/4102/p2p/{PEER}"]
control_addr = "127.0.0.1:0"
""")
    env = {"DSI_CAPABILITIES": "GPU,CUDA", "IPFS_API": "/ip4/127.0.0.1/tcp/7001",
           "DSI_CACHE_DIR": str(tmp_path)}
    s = load_settings({"ipfs_api": "/ip4/127.0.0.1/tcp/8001"}, environ=env)
    # The default file is <cache_dir>/config.toml, cache_dir coming from the environment.
    assert s.config_file == cfg_file.resolve()
    assert s.values["ipfs_api"] == "/ip4/127.0.0.1/tcp/8001"
    assert s.sources["ipfs_api"] == "flag:--ipfs-api"
    assert s.values["capabilities"] == ["GPU", "CUDA"]
    assert s.sources["capabilities"] == "env:DSI_CAPABILITIES"
    assert s.values["enable_p2p"] is True
    assert s.sources["enable_p2p"] == f"file:{cfg_file.resolve()}"
    assert s.sources["cache_dir"] == "env:DSI_CACHE_DIR"
    assert s.sources["log_level"] == "default"
    assert s.node.bootstrap_peers == (f"/ip4/127.0.0.1/tcp/4102/p2p/{PEER}",)
    assert s.node.capabilities == ("GPU", "CUDA")
    assert s.control_port == 0
    rows = {r["key"]: r for r in s.describe()}
    assert rows["capabilities"]["env"] == "DSI_CAPABILITIES"
    assert rows["ipfs_api"]["flag"] == "--ipfs-api"


def test_explicit_config_path_and_env(tmp_path: Path) -> None:
    data = tmp_path / "data"
    f = write(tmp_path / "elsewhere.toml", f'cache_dir = "{data}"\nlog_level = "debug"\n')
    s = load_settings({}, config_path=f, environ={})
    assert s.node.cache_dir == data.resolve()
    assert s.values["log_level"] == "debug"
    s2 = load_settings({}, environ={"DSI_CONFIG": str(f)})
    assert s2.config_file == f.resolve()
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({}, config_path=tmp_path / "missing.toml", environ={})


@pytest.mark.parametrize(("text", "match"), [
    ('nonsense_key = 1\n', "unknown key.*nonsense_key"),
    ('enable_p2p = "maybe"\n', "enable_p2p must be a boolean"),
    ('bootstrap_peers = ["/ip4/127.0.0.1/tcp/4001"]\n', "no /p2p/"),
    ('listen_addrs = ["not-a-multiaddr"]\n', "not a valid multiaddr"),
    ('allowed_peers = ["alice"]\n', "not an Ed25519 peer id"),
    ('control_addr = "0.0.0.0:5080"\n', "loopback"),
    ('kubo_timeout = -1\n', "positive"),
    ('log_level = "loud"\n', "log_level must be one of"),
    ('enable_p2p = \n', "not valid TOML"),
])
def test_bad_values_name_the_source(tmp_path: Path, text: str, match: str) -> None:
    f = write(tmp_path / "config.toml", text)
    with pytest.raises(ConfigError, match=match) as info:
        load_settings({"cache_dir": str(tmp_path)}, environ={})
    assert str(f.resolve()) in str(info.value)


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="env:DSI_ENABLE_P2P"):
        load_settings({"cache_dir": str(tmp_path)}, environ={"DSI_ENABLE_P2P": "perhaps"})


def test_control_addr_forms() -> None:
    assert parse_control_addr("localhost:0") == ("127.0.0.1", 0)
    assert parse_control_addr("[::1]:5080") == ("::1", 5080)
    for bad in ("5080", "127.0.0.1:http", "127.0.0.1:70000", "192.168.1.2:5080"):
        with pytest.raises(ConfigError):
            parse_control_addr(bad)


def test_rendered_file_round_trips(tmp_path: Path) -> None:
    s = load_settings({"cache_dir": str(tmp_path), "enable_p2p": True,
                       "listen_addrs": ["/ip4/127.0.0.1/tcp/0"],
                       "bootstrap_peers": [f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"]}, environ={})
    text = render_config_file(s)
    parsed = tomllib.loads(text)
    # Values given at init are active; defaults stay commented so new defaults reach the node.
    assert parsed == {"enable_p2p": True, "listen_addrs": ["/ip4/127.0.0.1/tcp/0"],
                      "bootstrap_peers": [f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"]}
    assert "# ipfs_api = " in text and "# env: DSI_ENABLE_P2P" in text
    write(tmp_path / "config.toml", text)
    again = load_settings({}, environ={"DSI_CACHE_DIR": str(tmp_path)})
    assert again.values == {**s.values}
    assert again.sources["bootstrap_peers"].startswith("file:")


def test_docs_and_example_cover_every_key() -> None:
    doc = (REPO / "docs" / "config.md").read_text("utf-8")
    example = tomllib.loads((REPO / "examples" / "dsi-node.toml").read_text("utf-8"))
    example_text = (REPO / "examples" / "dsi-node.toml").read_text("utf-8")
    for key in KEYS:
        assert re.search(rf"`{key.name}`", doc), f"docs/config.md does not document {key.name}"
        assert key.env in doc, f"docs/config.md does not name {key.env}"
        assert key.name in example_text, f"examples/dsi-node.toml lacks {key.name}"
    # The example file is a valid config (every active key known and valid).
    load_settings({}, config_path=REPO / "examples" / "dsi-node.toml", environ={})
    assert set(example) <= {k.name for k in KEYS}


def test_every_key_has_its_flag_in_the_cli() -> None:
    from node.cli import build_parser

    parser = build_parser()
    samples = {"bool": None, "list": "x", "number": "1.5", "path": "some/dir",
               "address": "127.0.0.1:0", "string": "debug"}
    for key in KEYS:
        argv = [key.flag] if key.kind == "bool" else [key.flag, samples[key.kind]]
        for where in ([*argv, "status"], ["config", "show", *argv]):
            args = parser.parse_args(where)
            assert getattr(args, key.name) is not None, (key.name, where)
