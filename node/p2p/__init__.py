"""The P2P node (trio): ``async with open_node(config) as node: ...``.

Importing this package imports py-libp2p (about a second); nothing imports it unless P2P is
enabled. The sync facade runs the node through ``node.p2p.portal.P2PHandle``.
"""

from node.p2p.node import HeldLease, Node, OwnerAuthority, open_node
from node.p2p.settings import P2PSettings

__all__ = ["HeldLease", "Node", "OwnerAuthority", "P2PSettings", "open_node"]
