"""``FilesystemHandler``: files and folders in content-addressed storage with Kubo's CIDs.

Everything is written to the local block store under ``cache_dir`` first, with the CID that
``ipfs add`` would give; when a Kubo RPC API answers at ``ipfs_api`` the content is also put
and pinned there. Adds always return the CID (the data is stored either way). To tell whether
Kubo got it, read the returned value's ``in_kubo`` attribute::

    cid = fs.add_file("model.bin")      # a str subclass: use it as the CID string
    cid.in_kubo                          # True: in Kubo now; False: local only, queued
    fs.sync()                            # later: push what Kubo missed

With ``IPFS_DATASETS_ENABLED=0`` the handler never talks to Kubo.
"""

from __future__ import annotations

import os
from typing import Any

from node.config import NodeConfig, datasets_enabled_mode
from node.storage import BlockService, StoredCID

from ._facade import Facade


class FilesystemHandler(Facade):
    """``FilesystemHandler(config=None, *, ipfs_api=None, cache_dir=None)``."""

    def __init__(
        self,
        config: dict[str, Any] | NodeConfig | None = None,
        *,
        ipfs_api: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, ipfs_api=ipfs_api, cache_dir=cache_dir, **kwargs)
        api = None if datasets_enabled_mode() == "off" else self.config.ipfs_api
        self._blocks: BlockService = self.services.block_service(api)

    @property
    def blocks(self) -> BlockService:
        return self._blocks

    def close(self) -> None:
        if not self._released:
            self._blocks.close()
        super().close()

    # -- adding -------------------------------------------------------------------------------
    def add_file(
        self, path: str | os.PathLike[str], pin: bool = True, cid_version: int = 0
    ) -> StoredCID:
        """Add one file; returns its CID (``.in_kubo`` tells whether Kubo has it)."""
        return self._blocks.add_file(path, pin=pin, cid_version=cid_version)

    def add_directory(
        self,
        path: str | os.PathLike[str],
        recursive: bool = True,
        cid_version: int = 0,
        pin: bool = True,
    ) -> StoredCID:
        """Add a folder (``recursive=False``: only the files directly inside it)."""
        return self._blocks.add_directory(
            path, recursive=recursive, pin=pin, cid_version=cid_version
        )

    # -- reading ------------------------------------------------------------------------------
    def get_file(self, cid: str, dest: str | os.PathLike[str]) -> str:
        """Write the file or folder ``cid`` to ``dest``; returns the path written.

        Looks in the local store, then in Kubo, then (``enable_p2p``) asks connected peers;
        every block is verified against its CID.
        If ``dest`` is an existing folder and ``cid`` a file, the file is written inside it.
        """
        return str(self._blocks.get_file(cid, dest))

    def cat(self, cid: str) -> bytes:
        """The whole content of the file ``cid``."""
        return self._blocks.cat(cid)

    def list_directory(self, cid: str) -> list[dict[str, Any]]:
        """Entries of a folder: ``name``, ``cid``, ``size`` (bytes), ``type`` (file/directory)."""
        return self._blocks.ls(cid)

    def stat(self, cid: str) -> dict[str, Any]:
        return self._blocks.stat(cid)

    # -- pins, gc, sync ---------------------------------------------------------------------------
    def pin(self, cid: str) -> bool:
        """Pin (recursively) here and in Kubo; True when Kubo pinned it too."""
        return self._blocks.pin(cid)

    def unpin(self, cid: str) -> bool:
        """Remove the pin; True if it was pinned locally."""
        return self._blocks.unpin(cid)

    def list_pins(self) -> list[dict[str, Any]]:
        """Local pins as ``{"cid": ..., "type": "recursive" | "direct"}``."""
        return self._blocks.pins()

    def gc(self) -> dict[str, int]:
        """Delete local blocks that no pin, queued sync or provenance record needs."""
        return self._blocks.gc()

    def sync(self) -> dict[str, Any]:
        """Push what was stored while Kubo was away: ``{"pushed", "remaining", ..., "records"}``.

        Content queued by adds goes first; ``records`` reports the provenance records pushed in
        the same call (they are blocks too, and kept by the provenance store's own watermark).
        """
        result = self._blocks.sync()
        if self._blocks.kubo is not None:
            result["records"] = self.services.provenance.sync()
        return result

    def status(self) -> dict[str, Any]:
        return self._blocks.status()


__all__ = ["FilesystemHandler"]
