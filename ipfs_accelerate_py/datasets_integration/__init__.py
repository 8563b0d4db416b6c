"""IPFS datasets integration for ipfs_accelerate_py workers.

A thin synchronous facade over the dsi node (``node`` package): content-addressed storage with
Kubo-identical CIDs, signed provenance, and a durable (optionally peer-to-peer) task queue.
Everything works locally when no IPFS daemon answers; nothing is ever dropped.
"""

from node.errors import (
    ConflictError,
    CorruptBlockError,
    DatasetsError,
    InvalidArgumentError,
    InvalidCIDError,
    LeaseError,
    NotFoundError,
)

from .filesystem import FilesystemHandler
from .manager import DatasetsManager
from .provenance import ProvenanceLogger
from .status import get_datasets_status, is_datasets_available
from .workflow import WorkflowCoordinator

__all__ = [
    "ConflictError",
    "CorruptBlockError",
    "DatasetsError",
    "DatasetsManager",
    "FilesystemHandler",
    "InvalidArgumentError",
    "InvalidCIDError",
    "LeaseError",
    "NotFoundError",
    "ProvenanceLogger",
    "WorkflowCoordinator",
    "get_datasets_status",
    "is_datasets_available",
]
