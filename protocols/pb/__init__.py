"""Generated protobuf modules of the dsi wire contract (``proto/dsi/v1``).

Do not edit ``*_pb2.py`` by hand: run ``scripts/gen_proto`` after changing a ``.proto``.
"""

from protocols.pb import block_pb2, task_pb2

__all__ = ["block_pb2", "task_pb2"]
