"""Tunables of the P2P runtime that are not part of the user's NodeConfig.

Defaults suit a real deployment; tests and benchmarks shorten them (short leases, fast
reaping) through ``open_node(cfg, settings=P2PSettings(...))``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class P2PSettings:
    # Every network step (open stream, write, read, dial) has a timeout.
    request_timeout: float = 10.0
    dial_timeout: float = 5.0
    # Owner side: put expired leases back to pending (and re-offer them) this often.
    reap_interval: float = 1.0
    # Owner side: re-announce unclaimed P2P_ELIGIBLE tasks this often (gossip may be lost).
    reannounce_interval: float = 10.0
    reannounce_batch: int = 16
    # Owner side: gossip is expensive in py-libp2p (every RPC carries a signed peer record
    # that every receiver verifies), so announcements are rate-limited (token bucket) and
    # coalesced per task; workers list offers from owners directly for bulk discovery.
    max_announce_rate: float = 20.0
    announce_burst: int = 20
    # Bootstrap redial backoff: doubles from initial to max after each failed dial.
    bootstrap_backoff_initial: float = 0.25
    bootstrap_backoff_max: float = 30.0
    bootstrap_check_interval: float = 0.5
    # Worker side: the remote offers table.
    max_remote_offers: int = 10_000
    remote_offer_ttl: float = 300.0
    # Worker side: ask an owner for its open tasks (ListRequest) at most this often when the
    # table has nothing for us, and in the background this often.
    list_min_interval: float = 0.5
    list_background_interval: float = 5.0
    list_limit: int = 64
    # Owner side: a task listed to one worker is listed last to others for this long.
    list_hint_seconds: float = 5.0
    # Worker side: claim attempts per get_next_task before giving up (ALREADY_CLAIMED races).
    max_claim_attempts: int = 8
    # Workers pick randomly among this many best offers so two workers rarely race for one.
    claim_spread: int = 16
    # Owner unreachable: skip its offers for this long.
    owner_backoff: float = 2.0
    # Block exchange (/dsi/block/1.0.0): one fetch call gives up after this long, and a peer
    # that sent bytes not matching their CID is not asked again for this long.
    block_fetch_timeout: float = 60.0
    block_peer_penalty: float = 60.0
