"""Content-addressed storage: Kubo-identical UnixFS CIDs, a local block store, a Kubo client.

- ``LocalBlockStore``: blocks on disk under ``cache_dir/blocks`` (SQLite for small blocks and
  the index, one file per large block), verified on every read, pins and gc.
- ``BlockService``: local first, Kubo when it answers, a persistent queue and ``sync()`` for
  what Kubo missed; the file-level API (add_file, get_file, add_directory, ls, cat, pin, ...).
- ``KuboClient``: the Kubo RPC API over httpx, a timeout on every call.
- CID helpers: ``parse_cid``, ``format_cid``, ``CID``.
"""

from ._cid import CID, CODECS, cid_from_binary, format_cid, is_cid, parse_cid
from ._kubo import KuboClient, api_url
from ._local import INLINE_MAX, LocalBlockStore
from ._service import BlockService, StoredCID
from ._unixfs import CHUNK_SIZE, MAX_LINKS

__all__ = [
    "CHUNK_SIZE",
    "CID",
    "CODECS",
    "INLINE_MAX",
    "MAX_LINKS",
    "BlockService",
    "KuboClient",
    "LocalBlockStore",
    "StoredCID",
    "api_url",
    "cid_from_binary",
    "format_cid",
    "is_cid",
    "parse_cid",
]
