"""``ProvenanceLogger``: signed, queryable lineage records for inference, data and workers.

Every ``log_*`` call writes one record (see ``node.provenance``) and returns its CID: a CIDv1
dag-json string (``bagu...``). The record is stored locally and, when the Kubo API answers, in
Kubo too (same CID); either way it is signed, chained and queryable at once. With
``enable_provenance=False`` the ``log_*`` calls record nothing and return ``None`` (reading,
``verify`` and export keep working on what is already there).

Record layouts (query any of these names, e.g. ``{"type": "pr_activity", "pr_number": 123}``):

=====================  =======================================================================
call                   record
=====================  =======================================================================
log_inference          ``type="inference"``, ``model``, ``data``
log_transformation     ``type="transformation"``, ``operation``, ``data``
log_worker_execution   ``type="worker_execution"``, ``worker_id``, ``task_id``, ``data``
log_pr_activity        ``type="pr_activity"``, ``pr_number``, ``activity``, ``data``
=====================  =======================================================================

``input_cid`` / ``output_cid`` (a CID or a list of CIDs) become IPLD links on the record, which
is what ``get_lineage`` follows; when ``data`` holds keys named ``input_cid`` / ``output_cid``
they are taken out of ``data`` and used the same way. Malformed CIDs raise
``InvalidCIDError``; values JSON cannot hold raise ``EncodingError`` (see the rules in
``node.provenance._records``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from node.errors import InvalidArgumentError

from ._facade import Facade


def require_name(value: Any, what: str) -> str:
    """A record's naming field (model, operation, event type, ids): a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgumentError(f"{what} must be a non-empty string, got {value!r}")
    return value


def split_link_fields(
    data: Mapping[str, Any] | None, input_cid: Any = None, output_cid: Any = None
) -> tuple[dict[str, Any], Any, Any]:
    """Take ``input_cid``/``output_cid`` out of ``data`` (the seed passes them there)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InvalidArgumentError(f"data must be a dict, got {type(data).__name__}")
    rest = dict(data)
    for name in ("input_cid", "output_cid"):
        if name in rest:
            value = rest.pop(name)
            given = input_cid if name == "input_cid" else output_cid
            if given is not None and value is not None and given != value:
                raise InvalidArgumentError(
                    f"{name} given both as an argument ({given!r}) and in data ({value!r})"
                )
            if given is None:
                if name == "input_cid":
                    input_cid = value
                else:
                    output_cid = value
    return rest, input_cid, output_cid


class ProvenanceLogger(Facade):
    """Log and query provenance records of this node (``ProvenanceLogger(config=None, **kw)``)."""

    @property
    def enabled(self) -> bool:
        return self.config.enable_provenance

    def _log(
        self,
        record_type: str,
        fields: dict[str, Any],
        data: Mapping[str, Any] | None,
        input_cid: Any = None,
        output_cid: Any = None,
    ) -> str | None:
        if not self.enabled:
            return None
        rest, input_cid, output_cid = split_link_fields(data, input_cid, output_cid)
        fields["data"] = rest
        cid, _reached_kubo = self.services.provenance.append(
            record_type, fields, input_cid=input_cid, output_cid=output_cid
        )
        return cid

    # --- the seed's calls -----------------------------------------------------------------
    def log_inference(self, model: str, data: Mapping[str, Any] | None = None) -> str | None:
        """An inference run of ``model``; ``data`` holds its inputs/outputs/metrics."""
        return self._log("inference", {"model": require_name(model, "model")}, data)

    def log_transformation(
        self,
        operation: str,
        data: Mapping[str, Any] | None = None,
        input_cid: Any = None,
        output_cid: Any = None,
    ) -> str | None:
        """A data transformation (tokenization, filtering, ...) from inputs to outputs."""
        fields = {"operation": require_name(operation, "operation")}
        return self._log("transformation", fields, data, input_cid, output_cid)

    def log_worker_execution(
        self, worker_id: str, task_id: str, data: Mapping[str, Any] | None = None
    ) -> str | None:
        """A task executed by a worker (the task queue writes these on complete/fail)."""
        fields = {"worker_id": require_name(worker_id, "worker_id"),
                  "task_id": require_name(task_id, "task_id")}
        return self._log("worker_execution", fields, data)

    def log_pr_activity(
        self, pr_number: int, activity_type: str, data: Mapping[str, Any] | None = None
    ) -> str | None:
        """Activity on a pull request (suggestions, reviews, merges)."""
        return self._log(
            "pr_activity",
            {"pr_number": pr_number, "activity": require_name(activity_type, "activity_type")},
            data,
        )

    def query_logs(
        self,
        filters: Mapping[str, Any] | None = None,
        limit: int | None = 100,
        *,
        since: Any = None,
        until: Any = None,
        resolve: bool = False,
    ) -> list[dict[str, Any]]:
        """Records matching every filter, newest first (see ``ProvenanceStore.query``).

        Each record is a dict with its ``cid``; links (``input_cid``, ``prev``, split-out large
        values) are ``Link`` strings. ``resolve=True`` loads split-out values inline.
        """
        return self.services.provenance.query(
            filters, limit, since=since, until=until, resolve=resolve
        )

    # --- lineage, verification, export -----------------------------------------------------
    def sync(self) -> dict[str, Any]:
        """Push records written while Kubo was away: ``{"pushed", "remaining", ...}``."""
        return self.services.provenance.sync()

    def get_record(self, cid: str, *, resolve: bool = True) -> dict[str, Any]:
        """One record by CID, with its large values loaded (``resolve=False``: links)."""
        return self.services.provenance.get(cid, resolve=resolve)

    def get_lineage(
        self, cid: str, direction: str = "upstream", depth: int | None = None
    ) -> list[dict[str, Any]]:
        """Records upstream (what produced ``cid``) or downstream (what used it), each with a
        ``depth`` (1 = direct; 0 = ``cid`` itself when it is a record)."""
        return self.services.provenance.lineage(cid, direction, depth)

    def verify(self, cid: str | None = None) -> dict[str, Any]:
        """Verify one record, or this node's whole chain; raises ``VerificationError`` naming
        the CID that breaks, returns a summary dict when all holds."""
        return self.services.provenance.verify(cid)

    def export_prov(
        self,
        cid: str | None = None,
        *,
        direction: str = "upstream",
        depth: int | None = None,
        filters: Mapping[str, Any] | None = None,
        limit: int = 1000,
    ) -> dict[str, Any]:
        """W3C PROV-JSON of the lineage of ``cid`` (or of the records matching ``filters``)."""
        return self.services.provenance.export_prov(
            cid, direction=direction, depth=depth, filters=filters, limit=limit
        )
