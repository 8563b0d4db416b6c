"""Construction of the py-libp2p 0.8.1 host and gossipsub router with the settings dsi needs.

Every keyword here was measured (see DESIGN "What py-libp2p 0.8.1 needs"):
- ``sec_opt`` = Noise only: the default also accepts plaintext, secio and TLS peers.
- ``ConnectionConfig(max_connections_per_peer=1)``: otherwise each connect waits a fixed 250 ms.
- The swarm's auto-connector (it dials peerstore entries to reach 150 connections) is stopped
  once the host runs (``stop_auto_connector``): dsi dials its bootstrap peers, with backoff, and
  the owners of tasks it claims - nothing else.
- gossipsub ``heartbeat_interval=1`` (default 120 s), ``adaptive_gossip_enabled=False`` (raises
  the heartbeat to 30 s in small swarms), ``spam_protection_enabled=False`` (10 msg/s per topic,
  own publishes included), protocols ``/meshsub/1.2.0, 1.1.0, 1.0.0``, StrictSign.
These match go-libp2p and js-libp2p defaults (Noise, yamux, StrictSign, identify), so those
implementations interoperate. Where py-libp2p 0.8.1 itself wastes frames or CPU, the
workarounds are in ``_libp2p_fixes`` (installed here).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from node.identity import Identity
from node.p2p import _libp2p_fixes
from node.p2p._libp2p_fixes import DsiGossipSub

MESHSUB_PROTOCOLS = (PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID)


class _ToApplicationHandlers(logging.Handler):
    """Passes py-libp2p's errors to the handlers the application set on the root logger.

    py-libp2p detaches its loggers on import (``propagate = False``, no handler), so its errors
    used to reach stderr bare through logging's last-resort handler. Propagating instead would
    also let through the INFO chatter of the modules that set their own level (the swarm's
    auto-connector), so this handler applies the ERROR threshold to every libp2p record.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        handlers = logging.getLogger().handlers or [logging.lastResort]
        for handler in handlers:
            if handler is not None and record.levelno >= handler.level:
                handler.handle(record)


def quiet_libp2p_logging() -> None:
    """py-libp2p's errors, formatted like the application's logs; its churn and dial failures
    (which reach dsi as exceptions, reported once per owner back-off) left out. LIBP2P_DEBUG
    keeps py-libp2p's own logging set-up instead."""
    if os.environ.get("LIBP2P_DEBUG"):
        return
    lib = logging.getLogger("libp2p")
    lib.setLevel(logging.ERROR)
    if not any(isinstance(h, _ToApplicationHandlers) for h in lib.handlers):
        lib.addHandler(_ToApplicationHandlers())
    logging.getLogger("libp2p.transport.tcp.tcp").setLevel(logging.CRITICAL)


def key_pair_of(identity: Identity) -> KeyPair:
    private = deserialize_private_key(identity.libp2p_bytes())
    return KeyPair(private, private.get_public_key())


@dataclass
class HostParts:
    host: IHost
    pubsub: Pubsub
    gossipsub: DsiGossipSub


def build_host(identity: Identity, listen_addrs: Sequence[str]) -> HostParts:
    quiet_libp2p_logging()
    _libp2p_fixes.install()
    key_pair = key_pair_of(identity)
    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    addrs = [multiaddr.Multiaddr(a) for a in listen_addrs]
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=addrs,
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    _libp2p_fixes.fit_host(host)
    gossipsub = DsiGossipSub(
        protocols=list(MESHSUB_PROTOCOLS),
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=1,
        adaptive_gossip_enabled=False,
        spam_protection_enabled=False,
    )
    pubsub = Pubsub(host, gossipsub, strict_signing=True)
    return HostParts(host=host, pubsub=pubsub, gossipsub=gossipsub)


async def stop_auto_connector(host: IHost) -> None:
    connector = getattr(host.get_network(), "auto_connector", None)
    if connector is not None:
        await connector.stop()
