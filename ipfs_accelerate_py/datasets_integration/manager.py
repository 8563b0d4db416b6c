"""``DatasetsManager``: audit events, provenance tracking and the node's status in one object.

* ``log_event(event_type, data) -> bool``: writes a signed ``type="event"`` record (fields
  ``event`` and ``data``). Returns ``True`` when the record also reached Kubo, ``False`` when
  it was kept locally only -- in both cases it is stored, chained and queryable (the seed's
  Pattern 2, minus the data loss). With ``enable_audit=False`` nothing is recorded and the
  call returns ``False``.
* ``track_provenance(operation, data) -> cid``: a ``type="provenance"`` record (fields
  ``operation`` and ``data``; ``input_cid``/``output_cid`` keys of ``data`` become links).
  Returns the record's CID whether or not Kubo was reached; ``None`` when
  ``enable_provenance=False``.
* ``get_status() -> dict``: see :meth:`DatasetsManager.get_status`.

Query these records with ``ProvenanceLogger.query_logs``, e.g.
``{"type": "event", "event": "model_loaded"}`` or ``{"type": "provenance", "model": ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from node.config import datasets_enabled_mode

from ._facade import Facade
from .provenance import require_name, split_link_fields


class DatasetsManager(Facade):
    """Audit and provenance front door (``DatasetsManager(config=None, **kw)``)."""

    def log_event(self, event_type: str, data: Mapping[str, Any] | None = None) -> bool:
        """Record an audit event; True = it also reached IPFS (Kubo), False = local only."""
        require_name(event_type, "event_type")
        if not self.config.enable_audit:
            return False
        rest, input_cid, output_cid = split_link_fields(data)
        _cid, reached = self.services.provenance.append(
            "event", {"event": event_type, "data": rest},
            input_cid=input_cid, output_cid=output_cid,
        )
        return reached

    def track_provenance(self, operation: str, data: Mapping[str, Any] | None = None) -> str | None:
        """Record a provenance step and return its CID (None when provenance is disabled)."""
        require_name(operation, "operation")
        if not self.config.enable_provenance:
            return None
        rest, input_cid, output_cid = split_link_fields(data)
        cid, _reached = self.services.provenance.append(
            "provenance", {"operation": operation, "data": rest},
            input_cid=input_cid, output_cid=output_cid,
        )
        return cid

    def sync(self) -> dict[str, Any]:
        """Push records written while Kubo was away: ``{"pushed", "remaining", ...}``."""
        return self.services.provenance.sync()

    def get_status(self) -> dict[str, Any]:
        """What this manager runs on.

        Keys: ``enabled`` (the IPFS side is not switched off by ``IPFS_DATASETS_ENABLED``),
        ``mode`` (auto/on/off), ``available`` (Kubo answers now), ``services`` (audit,
        provenance, p2p flags), ``storage_backend`` (``"kubo+local"`` or ``"local"``),
        ``ipfs_api``, ``cache_dir``, ``counts`` (records by type, pending blocks),
        ``peer_id`` and ``node`` (peer id and chain head).
        """
        mode = datasets_enabled_mode()
        available = False
        kubo: dict[str, Any] | None = None
        if mode != "off":
            blocks = self.services.blocks
            available = bool(blocks.kubo_available())
            if available:
                kubo = blocks.kubo_info()
        store = self.services.provenance
        peer_id = self.services.peer_id
        return {
            "enabled": mode != "off",
            "mode": mode,
            "available": available,
            "services": {
                "audit": self.config.enable_audit,
                "provenance": self.config.enable_provenance,
                "p2p": self.config.enable_p2p,
            },
            "storage_backend": "kubo+local" if available else "local",
            "kubo": kubo,
            "ipfs_api": self.config.ipfs_api,
            "cache_dir": str(self.config.cache_dir),
            "counts": store.counts(),
            "peer_id": peer_id,
            "node": {"peer_id": peer_id, "head": store.head(), "p2p_running":
                     self.services.p2p_running},
        }
